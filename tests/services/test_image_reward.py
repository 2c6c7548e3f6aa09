"""ImageReward on a tiny seeded release in THUDM/ImageReward's file layout (`save_tiny_image_reward`): equal to the
release's recipe computed independently, preprocessed to the bit, independent of the batch, with named load errors.

The reference recomputes ImageReward.py's `score` from the checkpoint's tensors, without transformers' BLIP. The
image goes through the release's torchvision transform on a PIL image. The image tower is timm's VisionTransformer
(BLIP's vit.py is timm's ViT) loaded with `blip.visual_encoder.*`. The text side is BLIP's med.py BertModel in
mode="multimodal", restated below in plain torch: embeddings + LayerNorm; per layer, bidirectional self-attention
under the padding mask, cross-attention to every image token, the GELU feed-forward, each followed by add & norm;
then token 0, the head's five Linear layers, and (x - mean) / std.

Tolerance: 1e-5 on rewards of magnitude ~2-3 (float32). Both sides compute the same sums in different kernels
(timm's fused SDPA vs transformers' eager attention, F.linear vs nn.Linear); the measured difference is ~1e-6. A
wrong recipe is off by far more: [ENC] in place of [CLS], or the padding left unmasked, moves rewards by > 1e-2.
"""

import functools
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from services.registry import build_reward
from services.rewards.image_reward import (
    CHECKPOINT_FILE,
    DEC_TOKEN,
    ENC_TOKEN,
    MAX_LENGTH,
    MED_CONFIG_FILE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RELEASE_MEAN,
    RELEASE_STD,
    ImageReward,
)
from trainer.local_models.tiny import IMAGE_REWARD_TOKENIZER_DIR, TINY_IMAGE_REWARD, save_tiny_image_reward

ATOL = 1e-5
VISION, TEXT = "blip.visual_encoder.", "blip.text_encoder."
PROMPTS = [
    "a red cube",
    "",
    "two small birds sitting on a telephone wire in the rain, watercolor, soft light, highly detailed, trending "
    "on artstation, by a famous painter of the nineteenth century, with a golden frame",  # > 35 tokens: truncated
    "a cat",
]
# (H, W): square; non-square both ways, down- and upscaled; and the crop cases where transformers' own center crop
# is one pixel off torchvision's (resized long side - 32 = 4k + 3: 35 wide unresized, 70 -> 35 after resizing).
SIZES = [(48, 48), (32, 35), (64, 70), (70, 64), (96, 150), (20, 24), (33, 47)]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("image_reward"), seed=0)


def config(release, **changes):
    return {
        "checkpoint": str(release / CHECKPOINT_FILE),
        "med_config": str(release / MED_CONFIG_FILE),
        "tokenizer": str(release / IMAGE_REWARD_TOKENIZER_DIR),
        **TINY_IMAGE_REWARD,
        **changes,
    }


def loaded(release, **changes):
    reward = build_reward("image_reward", config(release, **changes))
    reward.load("cpu")
    return reward


@pytest.fixture(scope="module")
def reward(release):
    return loaded(release)


def images(sizes=SIZES, seed=0):
    """Smooth gradients with a noise patch: resampling and crop offsets change the pixels the model sees."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        y, x = np.mgrid[0:h, 0:w]
        base = (x * rng.uniform(1, 6) + y * rng.uniform(1, 6)) % 256
        img = np.stack([base, base[::-1], 255 - base], axis=-1).astype(np.uint8)
        img[: h // 3, : w // 3] = rng.integers(0, 256, (h // 3, w // 3, 3), dtype=np.uint8)
        out.append(img)
    return out


# --- the release's recipe, independently ---------------------------------------------------------------------


def release_pixels(arrays, size):
    """ImageReward.py's `_transform(n_px)` on PIL images: (B, 3, S, S)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    transform = Compose(
        [
            Resize(size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(size),
            ToTensor(),
            Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    return torch.stack([transform(Image.fromarray(a)) for a in arrays])


def release_tokens(release, prompts):
    """BLIP's `init_tokenizer` (bos [DEC], additional special [ENC]) and the release's call: 35 tokens, padded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(release / IMAGE_REWARD_TOKENIZER_DIR)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert (tokens["input_ids"][:, 0] == tokenizer.cls_token_id).all()  # [CLS] first, as the release keeps it
    return tokens["input_ids"], tokens["attention_mask"]


def timm_vit(state, heads):
    """BLIP's ViT (vit.py = timm's VisionTransformer, eps 1e-6), sized from the checkpoint, strictly loaded."""
    from timm.models.vision_transformer import VisionTransformer

    vit_state = {k.removeprefix(VISION): v for k, v in state.items() if k.startswith(VISION)}
    width, patch = vit_state["cls_token"].shape[-1], vit_state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(vit_state["pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[1] for k in vit_state if k.startswith("blocks.")})
    vit = VisionTransformer(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=vit_state["blocks.0.mlp.fc1.weight"].shape[0] / width,
        qkv_bias=True,
        num_classes=0,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    vit.load_state_dict(vit_state, strict=True)
    return vit


def multimodal_bert(state, med, input_ids, attention_mask, image_embeds):
    """med.py's BertModel(input_ids, attention_mask, encoder_hidden_states=image_embeds, mode="multimodal"): the
    final hidden state of token 0, (B, W)."""
    heads, eps = med["num_attention_heads"], med["layer_norm_eps"]

    def linear(x, name):
        return F.linear(x, state[f"{TEXT}{name}.weight"], state[f"{TEXT}{name}.bias"])

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{TEXT}{name}.weight"], state[f"{TEXT}{name}.bias"], eps)

    def attention(x, context, additive_mask, name):
        def split(t):  # (B, N, W) -> (B, heads, N, W / heads)
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = (
            split(linear(src, f"{name}.self.{p}")) for src, p in ((x, "query"), (context, "key"), (context, "value"))
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive_mask
        context_layer = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        return norm(linear(context_layer, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

    positions = torch.arange(input_ids.shape[1])
    x = state[f"{TEXT}embeddings.word_embeddings.weight"][input_ids]
    x = norm(x + state[f"{TEXT}embeddings.position_embeddings.weight"][positions], "embeddings.LayerNorm")
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask, (B, 1, 1, L)
    for i in range(med["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        x = attention(x, x, padding, f"{layer}.attention")
        x = attention(x, image_embeds, 0.0, f"{layer}.crossattention")  # the image mask is all ones
        ffn = linear(F.gelu(linear(x, f"{layer}.intermediate.dense")), f"{layer}.output.dense")
        x = norm(ffn + x, f"{layer}.output.LayerNorm")
    return x[:, 0]


@torch.no_grad()
def release_rewards(release, arrays, prompts):
    """(rewards, raw head outputs) by the release's recipe."""
    state = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    med = json.loads((release / MED_CONFIG_FILE).read_text())
    pixels = release_pixels(arrays, TINY_IMAGE_REWARD["image_size"])
    image_embeds = timm_vit(state, TINY_IMAGE_REWARD["vision_heads"]).forward_features(pixels)  # (B, 1 + P, Wv)
    features = multimodal_bert(state, med, *release_tokens(release, prompts), image_embeds)
    x = features
    for i in (0, 2, 4, 6, 7):  # the head's Linear layers; the dropouts between are identities in eval
        x = F.linear(x, state[f"mlp.layers.{i}.weight"], state[f"mlp.layers.{i}.bias"])
    raw = x.squeeze(-1)
    return ((raw - RELEASE_MEAN) / RELEASE_STD).numpy(), raw.numpy()


# --- equivalence ------------------------------------------------------------------------------------------------


def test_preprocessing_is_the_releases_to_the_bit(reward):
    from transformers import CLIPImageProcessorPil

    arrays, size = images(), TINY_IMAGE_REWARD["image_size"]
    want = release_pixels(arrays, size)
    torch.testing.assert_close(reward.pixel_values(arrays), want, atol=0, rtol=0)
    # The crop cases do exercise the difference: with its own center crop, the same processor is one pixel off.
    own = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=Image.Resampling.BICUBIC,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    own_pixels = own(images=arrays[:4], input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    off = (own_pixels - want[:4]).abs().amax(dim=(1, 2, 3))  # (4,)
    assert off[0] == 0 and (off[1:] > 0.1).all()


def test_scores_equal_the_releases_recipe(reward, release):
    arrays = images()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(arrays))]
    outputs = reward.score(arrays, prompts)
    want, want_raw = release_rewards(release, arrays, prompts)
    np.testing.assert_allclose([o.reward for o in outputs], want, atol=ATOL, rtol=0)
    np.testing.assert_allclose([o.components["raw"] for o in outputs], want_raw, atol=ATOL * RELEASE_STD, rtol=0)
    # Not a constant that any weights would match: the image and the prompt both move the score.
    same_prompt = [o.reward for o in reward.score(arrays, ["a red cube"] * len(arrays))]
    same_image = [o.reward for o in reward.score([arrays[0]] * len(PROMPTS), PROMPTS)]
    assert np.ptp(same_prompt) > 0.05 and np.ptp(same_image) > 0.05


def test_the_recipe_details_matter(reward, release):
    # The reference is sensitive to what the reward must get right, so the equivalence above can fail.
    arrays, prompts = images()[:3], PROMPTS[:3]
    want, _ = release_rewards(release, arrays, prompts)
    input_ids, mask = release_tokens(release, prompts)
    enc_first = input_ids.clone()
    enc_first[:, 0] = reward.tokenizer.convert_tokens_to_ids(ENC_TOKEN)  # BLIP's ITM substitution
    with torch.inference_mode():
        pixels = release_pixels(arrays, TINY_IMAGE_REWARD["image_size"])
        image_embeds = reward.vision(pixel_values=pixels).last_hidden_state
        for ids, attention_mask in ((enc_first, mask), (input_ids, torch.ones_like(mask))):
            hidden = reward.text(
                input_ids=ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                is_decoder=False,
            ).last_hidden_state
            wrong = ((reward.head(hidden[:, 0]).squeeze(-1) - RELEASE_MEAN) / RELEASE_STD).numpy()
            assert np.abs(wrong - want).max() > 1e-2


def test_the_tiny_release_has_the_releases_layout(release):
    state = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    prefixes = {k.split(".")[0] if k.startswith("mlp.") else ".".join(k.split(".")[:2]) for k in state}
    assert prefixes == {"blip.visual_encoder", "blip.text_encoder", "blip.vision_proj", "blip.text_proj", "mlp"}
    assert sorted({k.split(".")[2] for k in state if k.startswith("mlp.")}) == ["0", "2", "4", "6", "7"]
    assert state[f"{TEXT}embeddings.position_ids"].shape == (1, 64)  # med.py's persistent buffer
    assert not any("pooler" in k or "token_type" in k for k in state)
    med = json.loads((release / MED_CONFIG_FILE).read_text())
    # As on the hub, encoder_width is not the ViT's width (48 here, 1024 there): the reward must not use it.
    assert med["encoder_width"] != state[f"{VISION}cls_token"].shape[-1]
    assert med["vocab_size"] == 30524 and med["add_cross_attention"] is True


def test_the_tiny_release_is_seeded(release, tmp_path):
    state = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    again = torch.load(save_tiny_image_reward(tmp_path / "again", seed=0) / CHECKPOINT_FILE, weights_only=True)
    other = torch.load(save_tiny_image_reward(tmp_path / "other", seed=1) / CHECKPOINT_FILE, weights_only=True)
    assert all(torch.equal(v, again[k]) for k, v in state.items())
    assert not torch.equal(state["mlp.layers.0.weight"], other["mlp.layers.0.weight"])


def test_a_ddp_wrapped_checkpoint_scores_the_same(reward, release, tmp_path):
    state = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pt")
    wrapped = loaded(release, checkpoint=str(tmp_path / "wrapped.pt"))
    arrays = images()[:3]
    assert [o.reward for o in wrapped.score(arrays, PROMPTS[:3])] == [
        o.reward for o in reward.score(arrays, PROMPTS[:3])
    ]


def test_injected_modules_score_as_the_loaded_ones(reward):
    modules = dict(vision=reward.vision, text=reward.text, head=reward.head, tokenizer=reward.tokenizer)
    injected = ImageReward(reward.config, **modules)
    injected.load("cpu")
    arrays = images()[:2]
    assert [o.reward for o in injected.score(arrays, PROMPTS[:2])] == [
        o.reward for o in reward.score(arrays, PROMPTS[:2])
    ]
    with pytest.raises(ValueError, match="inject all of vision, text, head and tokenizer, or none"):
        ImageReward(reward.config, vision=reward.vision)


def test_info(reward):
    info = reward.info()
    assert np.isneginf(info.min_reward) and np.isposinf(info.max_reward) and info.higher_is_better
    assert [m.role for m in info.models] == ["blip", "blip_config", "tokenizer"]
    assert info.models[0].source.endswith(CHECKPOINT_FILE)


# --- batches ----------------------------------------------------------------------------------------------------


def test_deterministic_and_independent_of_batch_composition(release):
    # Each sample's image and prompt run through the towers in rows of their own, prompts are padded to a fixed 35
    # tokens and every image is cropped alone, so a sample's score depends on the rest of its batch only through
    # batch-size-dependent matmul kernels (one row takes other kernels than many). Tolerance 5e-6, about 20 float32
    # ulps at these rewards (~2.5): measured up to 9e-7. A real dependence (e.g. unmasked padding) is > 1e-2.
    reward = loaded(release, batch_size=3)
    arrays = images()
    prompts = [PROMPTS[i % 2] for i in range(len(arrays))]
    batch = [o.reward for o in reward.score(arrays, prompts)]
    assert [o.reward for o in reward.score(arrays, prompts)] == batch
    alone = [reward.score([a], [p])[0].reward for a, p in zip(arrays, prompts, strict=True)]
    np.testing.assert_allclose(alone, batch, atol=5e-6, rtol=0)
    # One prompt for the whole batch (batches of the same sizes, so exactly), and the batch in reverse order.
    same = [o.reward for o in reward.score(arrays, [PROMPTS[0]] * len(arrays))]
    assert same[::2] == batch[::2]
    reverse = [o.reward for o in reward.score(arrays[::-1], prompts[::-1])]
    np.testing.assert_allclose(reverse[::-1], batch, atol=5e-6, rtol=0)
    assert reward.score([], []) == []


# --- loading errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["checkpoint", "med_config", "tokenizer"])
def test_a_missing_file_names_it(release, tmp_path, field):
    what = "local model path" if field == "tokenizer" else field
    with pytest.raises(FileNotFoundError, match=rf"image_reward reward: {what} '.*absent\.x' does not exist"):
        loaded(release, **{field: str(tmp_path / "absent.x")})


def edited(release, tmp_path, edit):
    """A copy of the tiny checkpoint changed in place by `edit(state)`, as a checkpoint path."""
    state = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    return str(tmp_path / "edited.pt")


@pytest.mark.parametrize(
    "key",
    [
        "blip.visual_encoder.blocks.1.attn.qkv.weight",
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias",
        "mlp.layers.7.bias",
        "blip.text_proj.weight",
    ],
)
def test_a_removed_key_is_named(release, tmp_path, key):
    checkpoint = edited(release, tmp_path, lambda state: state.pop(key))
    with pytest.raises(ValueError, match=rf"edited\.pt.*{re.escape(key)}"):
        loaded(release, checkpoint=checkpoint)


def test_an_extra_key_is_named(release, tmp_path):
    def add(state):
        state["blip.itm_head.weight"] = torch.zeros(2, 32)

    with pytest.raises(ValueError, match=r"edited\.pt' has unexpected keys \['blip\.itm_head\.weight'\]"):
        loaded(release, checkpoint=edited(release, tmp_path, add))


def test_a_head_of_other_widths_is_named(release, tmp_path):
    def narrow(state):  # hidden widths (1024, 64, 64, 16) instead of (1024, 128, 64, 16)
        state["mlp.layers.2.weight"], state["mlp.layers.2.bias"] = torch.zeros(64, 1024), torch.zeros(64)
        state["mlp.layers.4.weight"] = torch.zeros(64, 64)

    with pytest.raises(
        ValueError, match=r"ImageReward head: mlp\.layers\.2\.bias: checkpoint \(64,\) vs model \(128,\)"
    ):
        loaded(release, checkpoint=edited(release, tmp_path, narrow))

    def release_width(state):  # the real head takes 768-wide features, the tiny text encoder gives 32
        state["mlp.layers.0.weight"] = torch.zeros(1024, 768)

    with pytest.raises(ValueError, match=r"mlp\.layers\.0\.weight: checkpoint \(1024, 768\) vs model \(1024, 32\)"):
        loaded(release, checkpoint=edited(release, tmp_path, release_width))


def test_other_formats_are_refused_as_such(release, tmp_path):
    from open_clip.model import CLIP

    from trainer.local_models.tiny import tiny_clip

    vision_cfg = dict(layers=1, width=32, head_width=8, patch_size=8, image_size=32)
    text_cfg = dict(context_length=8, vocab_size=64, width=32, heads=4, layers=1)
    formats = {
        r"CLIP checkpoint \(openai layout\)": {"state_dict": CLIP(16, vision_cfg, text_cfg).state_dict()},
        r"CLIP checkpoint \(transformers layout\)": tiny_clip()[0].state_dict(),
        r"bare MLP head": {f"layers.{i}.{p}": torch.zeros(1) for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")},
    }
    for looks_like, state in formats.items():
        torch.save(state, tmp_path / "other.pt")
        with pytest.raises(ValueError, match=rf"other\.pt' is not an ImageReward checkpoint.*{looks_like}"):
            loaded(release, checkpoint=str(tmp_path / "other.pt"))


def test_config_and_release_mismatches_are_named(release, tmp_path):
    with pytest.raises(ValueError, match=r"does not take 224 px images \(image_size\)"):
        loaded(release, image_size=224)
    with pytest.raises(ValueError, match=r"vision_heads 5 does not divide the checkpoint's ViT width 48"):
        loaded(release, vision_heads=5)
    med = json.loads((release / MED_CONFIG_FILE).read_text())
    (tmp_path / "no_cross.json").write_text(json.dumps({**med, "add_cross_attention": False}))
    with pytest.raises(ValueError, match=r"no_cross\.json' must have add_cross_attention true"):
        loaded(release, med_config=str(tmp_path / "no_cross.json"))
    (tmp_path / "wider.json").write_text(json.dumps({**med, "hidden_size": 36}))
    wider = r"text encoder of med_config '.*wider\.json'.*word_embeddings\.weight: checkpoint \(30524, 32\) vs model"
    with pytest.raises(ValueError, match=wider):
        loaded(release, med_config=str(tmp_path / "wider.json"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(release / IMAGE_REWARD_TOKENIZER_DIR)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"has 30525 tokens with \[DEC\] and \[ENC\].*vocab_size is 30524"):
        loaded(release, tokenizer=str(tmp_path / "tokenizer"))


def test_bfloat16_towers_score_close_to_float32(reward, release):
    # The dtype path (GPUs): towers in bfloat16, the head in float32 on float features, as the release casts them.
    low = loaded(release, dtype="bfloat16")
    assert low.vision.dtype == low.text.dtype == torch.bfloat16 and low.head[0].weight.dtype == torch.float32
    arrays = images()[:4]
    got = [o.reward for o in low.score(arrays, PROMPTS)]
    want = [o.reward for o in reward.score(arrays, PROMPTS)]
    np.testing.assert_allclose(got, want, atol=0.1, rtol=0)  # bfloat16 keeps 8 significant bits

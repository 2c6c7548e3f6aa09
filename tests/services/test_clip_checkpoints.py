"""OpenAI-CLIP / open_clip checkpoints converted to transformers CLIP, checked numerically against open_clip itself.

A tiny seeded open_clip CLIP is the reference: its converted weights, loaded into the transformers model of the same
config, must give the same embeddings. Tolerance: float32, atol 1e-5 on embeddings of norm ~4-8. The two
implementations compute the same sums (measured difference 0 on this CPU); the margin allows other kernels and
reduction orders (fused vs split q/k/v matmuls, SDPA backends). A wrong layout is off by far more: an untransposed
projection by O(1), a GELU where QuickGELU belongs by ~0.02.
"""

import numpy as np
import pytest
import torch

from services.clip_checkpoints import detect_format, load_strict, to_transformers, unwrap
from services.rewards.caption import Caption, CaptionConfig, TextEncoderConfig
from trainer.local_models.tiny import save_tiny_models, tiny_clip, tiny_tokenizer

ATOL = 1e-5
VOCAB, CONTEXT, WIDTH, LAYERS, HEADS, MLP = 64, 16, 32, 2, 4, 64
EOT = VOCAB - 1  # OpenAI CLIP pools at the argmax token id, so the EOT token has the highest id


def open_clip_model(embed_dim=16, quick_gelu=True, seed=0, text=None, **text_overrides):
    """A tiny seeded open_clip CLIP; every parameter is perturbed so that no bias or norm is at its trivial init
    (open_clip zeroes attention biases: a mis-split in_proj_bias would otherwise go unnoticed)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    text_cfg = text or dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS)
    text_cfg = {"mlp_ratio": MLP / WIDTH, **text_cfg, **text_overrides}
    vision_cfg = dict(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, mlp_ratio=MLP / WIDTH)
    vision_cfg.update(patch_size=8, image_size=32)
    model = CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# The tiny towers' widths in transformers' names (both towers share them).
HF_WIDTHS = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS)


def hf_text_config(embed_dim, quick_gelu):
    from transformers import CLIPTextConfig

    # transformers pools at the first eos_token_id (any id but the legacy 2).
    tokens = dict(vocab_size=VOCAB, max_position_embeddings=CONTEXT, bos_token_id=1, pad_token_id=0, eos_token_id=EOT)
    act = "quick_gelu" if quick_gelu else "gelu"
    return CLIPTextConfig(**HF_WIDTHS, **tokens, projection_dim=embed_dim, hidden_act=act)


def hf_text_model(embed_dim, quick_gelu, state_dict):
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(hf_text_config(embed_dim, quick_gelu)).eval()
    load_strict(model, state_dict)
    return model


def token_ids(seed=0, batch=5):
    """(B, CONTEXT) ids: random text, EOT at varying positions, zero padding after it (as open_clip tokenizes)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, EOT, (batch, CONTEXT), generator=g)
    for row, eot in enumerate(torch.randint(2, CONTEXT, (batch,), generator=g).tolist()):
        ids[row, eot] = EOT
        ids[row, eot + 1 :] = 0
    return ids


@torch.no_grad()
def text_embeds(model, ids):
    return model(input_ids=ids).text_embeds  # (B, embed)


def as_hps(state_dict):
    """The layout of HPS checkpoints saved from DDP training: wrapped, every key `module.`-prefixed."""
    return {"state_dict": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}


@pytest.mark.parametrize("embed_dim,quick_gelu", [(16, True), (WIDTH, False)], ids=["openai-quickgelu", "square-gelu"])
@pytest.mark.parametrize("wrap", ["bare", "hps", "model"])
def test_text_tower_matches_open_clip(embed_dim, quick_gelu, wrap):
    reference = open_clip_model(embed_dim, quick_gelu)
    state = reference.state_dict()
    checkpoint = {"bare": state, "hps": as_hps(state), "model": {"model": state}}[wrap]
    assert detect_format(unwrap(checkpoint)) == "openai"
    ids = token_ids()
    with torch.no_grad():
        want = reference.encode_text(ids)  # (B, embed)
    got = text_embeds(hf_text_model(embed_dim, quick_gelu, to_transformers(checkpoint)), ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert want.norm(dim=-1).min() > 0.5  # not a trivially small output that any weights would match


def test_an_untransposed_square_projection_loads_but_is_caught_numerically():
    # width == embed_dim: the projection has the same shape either way round, so only the numbers tell.
    reference = open_clip_model(embed_dim=WIDTH)
    converted = to_transformers(reference.state_dict())
    untransposed = {**converted, "text_projection.weight": reference.state_dict()["text_projection"]}
    ids = token_ids()
    with torch.no_grad():
        want = reference.encode_text(ids)
    got = text_embeds(hf_text_model(WIDTH, True, untransposed), ids)  # loads without complaint
    assert (got - want).abs().max() > 100 * ATOL
    torch.testing.assert_close(text_embeds(hf_text_model(WIDTH, True, converted), ids), want, atol=ATOL, rtol=0)


def test_vision_tower_and_logit_scale_match_open_clip():
    from transformers import CLIPConfig, CLIPModel

    reference = open_clip_model(embed_dim=16)
    text = hf_text_config(16, True).to_dict()
    vision = dict(HF_WIDTHS, image_size=32, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    load_strict(model, to_transformers(as_hps(reference.state_dict()), vision=True))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values=pixels).pooler_output,
            reference.encode_image(pixels),
            atol=ATOL,
            rtol=0,
        )
        assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())


def test_transformers_clip_model_checkpoint_gives_its_text_tower():
    from transformers import CLIPTextModelWithProjection

    clip, processor = tiny_clip(seed=3)
    checkpoint = {"module." + k: v for k, v in clip.state_dict().items()}  # vision tower and logit scale included
    assert detect_format(unwrap(checkpoint)) == "transformers"
    text = CLIPTextModelWithProjection(clip.config.text_config).eval()
    load_strict(text, to_transformers(checkpoint))
    tokens = processor.tokenizer(["a red cube", "three blue birds"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            text(**tokens).text_embeds, clip.get_text_features(**tokens).pooler_output, atol=0, rtol=0
        )


def test_tiny_clip_text_tower_loads_alone_from_the_clip_model_directory(tmp_path):
    # As the cluster profile loads the text tower of openai/clip-vit-large-patch14 (a CLIPModel checkpoint).
    from transformers import CLIPTextModelWithProjection

    clip, processor = tiny_clip(seed=0)
    clip.save_pretrained(tmp_path)
    text = CLIPTextModelWithProjection.from_pretrained(tmp_path).eval()
    tokens = processor.tokenizer(["a red cube", "three blue birds"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            text(**tokens).text_embeds, clip.get_text_features(**tokens).pooler_output, atol=0, rtol=0
        )


# --- through the caption reward ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_paths():
    return save_tiny_models()


def open_clip_like_tiny_clip_text(embed_dim=16, seed=0):
    """An open_clip CLIP of `tiny_clip_text`'s text layout (MiniLM vocab, 32 wide, 37-wide MLP, QuickGELU). It
    pools at [SEP] ('eos' pooling), as transformers does for that tokenizer: BERT's [SEP] is not its highest id."""
    tokenizer = tiny_tokenizer()
    text = dict(context_length=77, vocab_size=len(tokenizer), width=32, heads=4, layers=2, mlp_ratio=37 / 32)
    return open_clip_model(
        embed_dim, True, seed, text=text, pool_type="eos", eos_id=tokenizer.sep_token_id, pad_id=0
    ), tokenizer


def caption_reward(tiny_paths, state_dict):
    text_encoder = TextEncoderConfig(kind="clip", source=str(tiny_paths["clip_text"]), state_dict=str(state_dict))
    reward = Caption(CaptionConfig(captioner=str(tiny_paths["blip2"]), max_new_tokens=4, text_encoder=text_encoder))
    reward.load("cpu")
    return reward


def test_caption_reward_loads_an_hps_like_open_clip_checkpoint(tiny_paths, tmp_path):
    reference, tokenizer = open_clip_like_tiny_clip_text()
    torch.save(as_hps(reference.state_dict()), tmp_path / "hps_like.pt")
    reward = caption_reward(tiny_paths, tmp_path / "hps_like.pt")
    texts = ["a red cube", "three blue birds on a wire", "x"]
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]  # (N, 77)
    with torch.no_grad():
        want = reference.encode_text(ids, normalize=True)  # (N, 16)
    np.testing.assert_allclose(reward.embed(texts).numpy(), want.numpy(), atol=ATOL)


def test_caption_reward_names_an_unrecognised_checkpoint(tiny_paths, tmp_path):
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x\.pt.*unrecognised CLIP checkpoint format.*encoder\.weight"):
        caption_reward(tiny_paths, tmp_path / "x.pt")


def test_caption_reward_names_a_shape_mismatch(tiny_paths, tmp_path):
    reference, _ = open_clip_like_tiny_clip_text(embed_dim=8)  # the tiny CLIP text tower projects to 16
    torch.save(as_hps(reference.state_dict()), tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"text_projection\.weight: checkpoint \(8, 32\) vs model \(16, 32\)"):
        caption_reward(tiny_paths, tmp_path / "narrow.pt")


def test_converter_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match=r"unrecognised CLIP checkpoint format.*'a\.weight'"):
        to_transformers({"a.weight": torch.zeros(1), "b.bias": torch.zeros(1)})
    # Layer scale has no transformers counterpart: converting without it would silently change the model.
    with pytest.raises(ValueError, match=r"cannot convert.*resblocks\.0\.ls_1\.gamma"):
        to_transformers(open_clip_model(ls_init_value=0.1).state_dict())
    # A deeper checkpoint than the model: the extra layer is named.
    deeper = to_transformers(open_clip_model(layers=LAYERS + 1).state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys \['text_model\.encoder\.layers\.2\."):
        hf_text_model(16, True, deeper)

"""The HPS v2.1 reward on a tiny release-format checkpoint, checked against open_clip, the release's own code path.

The reference does what HPSv2's `score.py` does: an open_clip CLIP of the checkpoint's architecture loads
`checkpoint['state_dict']` strictly, open_clip preprocesses the images (`image_transform(..., is_train=False)`) and
tokenizes the prompts (its `SimpleTokenizer`, given the tiny vocabulary's merges), and the score is
`diag(image_features @ text_features.T)`. The reward only shares the checkpoint file with it.

Tolerances: scores (cosines) within 1e-5 of open_clip's, in float32 (measured: at most 2.4e-7; the margin allows
other kernels and reduction orders). The same batch scored twice is bitwise identical; a sample scored alone, in
another batch or in other chunks agrees within 1e-6 (measured 9e-8: GEMMs of other shapes round differently). A
wrong model is off by far more: QuickGELU for GELU by ~5e-3, tanh-approximated GELU by ~1e-4, a one-pixel crop
shift by ~1e-1.
"""

import gzip
import json
import shutil

import numpy as np
import pytest
import torch

from services.registry import build_reward
from services.rewards.aesthetic import HEAD_FILE
from services.rewards.hpsv2 import CHECKPOINT_FILE, Hpsv2, Hpsv2Config
from tests.conftest import random_images
from trainer.local_models.tiny import (
    HPSV2_CLIP_CONFIG_DIR,
    save_tiny_aesthetic,
    save_tiny_hpsv2,
    tiny_clip,
    tiny_hpsv2_open_clip_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
BATCH_ATOL = 1e-6
PROMPTS = [
    "a red disc in a blue sky",
    "two green dogs in the city",
    "A Corgi, riding a SURFBOARD!",
    "a red disc in a blue sky",
    "three red apples on a wooden table " * 12,  # > 77 tokens: truncated, <|endoftext|> kept last
]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return save_tiny_hpsv2(tmp_path_factory.mktemp("hpsv2"))


def hps(checkpoint, clip_config, **fields) -> Hpsv2:
    reward = build_reward("hpsv2", {"checkpoint": str(checkpoint), "clip_config": str(clip_config), **fields})
    reward.load("cpu")
    return reward


@pytest.fixture(scope="module")
def reward(release):
    return hps(release / CHECKPOINT_FILE, release / HPSV2_CLIP_CONFIG_DIR)


class OpenClipHps:
    """HPSv2's scoring with open_clip, on the tiny architecture."""

    def __init__(self, release, tmp_path):
        from open_clip.model import CLIP
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transform import image_transform

        checkpoint = torch.load(release / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        vocab_size = checkpoint["state_dict"]["token_embedding.weight"].shape[0]
        self.model = CLIP(**tiny_hpsv2_open_clip_config(vocab_size), output_dict=True).eval()
        self.model.load_state_dict(checkpoint["state_dict"])
        self.preprocess = image_transform(self.model.visual.image_size, is_train=False)
        # open_clip reads merges as its bpe_simple_vocab_16e6.txt.gz lays them out: a header line, one merge a line.
        tokenizer = json.loads((release / HPSV2_CLIP_CONFIG_DIR / "tokenizer.json").read_text())
        merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
        bpe_path = tmp_path / "bpe.txt.gz"
        with gzip.open(bpe_path, "wt", encoding="utf-8") as f:
            f.write("\n".join(["#version: 0.2", *merges]))  # no trailing newline: open_clip would read a merge ''
        self.tokenizer = SimpleTokenizer(bpe_path=str(bpe_path), context_length=77)

    def pixels(self, images):
        from PIL import Image

        return torch.stack([self.preprocess(Image.fromarray(image)) for image in images])  # (B, 3, 32, 32)

    @torch.no_grad()
    def score(self, images, prompts) -> np.ndarray:
        out = self.model(self.pixels(images), self.tokenizer(list(prompts)))
        return torch.diagonal(out["image_features"] @ out["text_features"].T).numpy()


@pytest.fixture(scope="module")
def reference(release, tmp_path_factory):
    return OpenClipHps(release, tmp_path_factory.mktemp("open_clip"))


def reward_pixels(reward, images):
    processor = reward.processor.image_processor
    return processor(images=list(images), return_tensors="pt", input_data_format="channels_last")["pixel_values"]


def test_the_tokenizers_agree_on_ids(reward, reference):
    ids = reference.tokenizer(PROMPTS)  # (N, 77), zero-padded
    for row, prompt in zip(ids.tolist(), PROMPTS, strict=True):
        hf = reward.processor.tokenizer(prompt, truncation=True)["input_ids"]
        assert row[: len(hf)] == hf and not any(row[len(hf) :])
    assert len(reward.processor.tokenizer(PROMPTS[-1], truncation=True)["input_ids"]) == 77  # truncation exercised


def test_scores_match_open_clip(reward, reference, rng):
    # Images whose preprocessing agrees: already 32 px on the short side (no resampling), crop offsets that agree.
    images = [
        *(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)),
        *random_images(rng, 2, 32),
        rng.integers(0, 256, (32, 40, 3), dtype=np.uint8),  # long side 8 over: offset 4 either way
        rng.integers(0, 256, (37, 32, 3), dtype=np.uint8),  # 5 over: floor(2.5) == round-half-even(2.5)
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    torch.testing.assert_close(reward_pixels(reward, images), reference.pixels(images), atol=1e-6, rtol=0)

    got = np.array([o.reward for o in reward.score(images, prompts)])
    want = reference.score(images, prompts)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.ptp(want) > 100 * ATOL  # the scores tell the samples apart, so matching them means something
    assert all(o.components == {"cosine": o.reward} for o in reward.score(images[:2], prompts[:2]))


def test_a_ddp_prefixed_checkpoint_scores_the_same(release, reward, tmp_path, rng):
    checkpoint = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "ddp.pt")
    images = random_images(rng, 3, 32)
    prefixed = hps(tmp_path / "ddp.pt", release / HPSV2_CLIP_CONFIG_DIR)
    assert [o.reward for o in prefixed.score(images, PROMPTS[:3])] == [
        o.reward for o in reward.score(images, PROMPTS[:3])
    ]


def test_scores_are_deterministic_and_independent_of_the_batch(reward, rng):
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    batch = [o.reward for o in reward.score(images, PROMPTS)]
    assert [o.reward for o in reward.score(images, PROMPTS)] == batch
    alone = [reward.score([image], [prompt])[0].reward for image, prompt in zip(images, PROMPTS, strict=True)]
    np.testing.assert_allclose(alone, batch, atol=BATCH_ATOL, rtol=0)
    # Other neighbours (reversed order, more images) and chunks of 2 per forward pass.
    mixed = reward.score([*images[::-1], *random_images(rng, 3, 32)], [*PROMPTS[::-1], "x", "y", "z"])
    np.testing.assert_allclose([o.reward for o in mixed[:5][::-1]], batch, atol=BATCH_ATOL, rtol=0)
    chunked = Hpsv2(Hpsv2Config(batch_size=2), clip=reward.clip, processor=reward.processor)
    chunked.load("cpu")
    np.testing.assert_allclose([o.reward for o in chunked.score(images, PROMPTS)], batch, atol=BATCH_ATOL, rtol=0)


def test_preprocessing_differs_from_open_clip_only_as_documented(reward, reference, rng):
    # Center crop: torchvision rounds the offset, transformers floors it. 3 (or 7) too wide: 2 (4) vs 1 (3).
    for width, floor, rounded in [(35, 1, 2), (39, 3, 4)]:
        image = rng.integers(0, 256, (32, width, 3), dtype=np.uint8)
        at_floor, at_rounded = (reference.pixels([image[:, left : left + 32].copy()]) for left in (floor, rounded))
        torch.testing.assert_close(reward_pixels(reward, [image]), at_floor, atol=1e-6, rtol=0)
        torch.testing.assert_close(reference.pixels([image]), at_rounded, atol=1e-6, rtol=0)
        assert (at_floor - at_rounded).abs().max() > 0.1
    # Downscaling: torch's antialiased bicubic on uint8 vs PIL's round to at most one uint8 level apart.
    level = 1 / 255 / min(reward.processor.image_processor.image_std)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for size in (96, 224, 512)]
    difference = (reward_pixels(reward, images) - reference.pixels(images)).abs().max().item()
    assert 0 < difference <= level + 1e-6
    got = np.array([o.reward for o in reward.score(images, PROMPTS[:3])])
    np.testing.assert_allclose(got, reference.score(images, PROMPTS[:3]), atol=1e-3, rtol=0)


# --- loading errors ---------------------------------------------------------------------------------------------


def test_missing_files_are_named(release, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*does not exist.*xswu/HPSv2"):
        hps(tmp_path / "nope.pt", release / HPSV2_CLIP_CONFIG_DIR)
    with pytest.raises(FileNotFoundError, match=r"hpsv2 reward.*no_config"):
        hps(release / CHECKPOINT_FILE, tmp_path / "no_config")


def test_a_checkpoint_of_another_format_is_named(release, tmp_path):
    aesthetic = save_tiny_aesthetic(tmp_path) / HEAD_FILE
    with pytest.raises(ValueError, match=r"not an HPS v2 CLIP checkpoint.*unrecognised.*layers\.0\.bias"):
        hps(aesthetic, release / HPSV2_CLIP_CONFIG_DIR)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*garbage\.pt"):
        hps(tmp_path / "garbage.pt", release / HPSV2_CLIP_CONFIG_DIR)


def test_a_transformers_clip_of_other_widths_is_named(release, tmp_path):
    clip, _ = tiny_clip()  # MiniLM vocabulary, 32-wide image tower
    torch.save(clip.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"does not fit the CLIP of clip_config.*checkpoint \(\d+, 32\) vs model"):
        hps(tmp_path / "other.pt", release / HPSV2_CLIP_CONFIG_DIR)


@pytest.mark.parametrize(
    "key,named",
    [
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
        ("transformer.resblocks.1.attn.in_proj_weight", "text_model.encoder.layers.1.self_attn.k_proj.weight"),
    ],
)
def test_a_missing_key_is_named(release, tmp_path, key, named):
    checkpoint = torch.load(release / CHECKPOINT_FILE, weights_only=True)
    del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=rf"missing keys \[[^]]*'{named}'"):
        hps(tmp_path / "partial.pt", release / HPSV2_CLIP_CONFIG_DIR)


def quick_gelu_config(release, tmp_path):
    config_dir = tmp_path / "quick_gelu"
    shutil.copytree(release / HPSV2_CLIP_CONFIG_DIR, config_dir)
    config = json.loads((config_dir / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        config[tower]["hidden_act"] = "quick_gelu"
    (config_dir / "config.json").write_text(json.dumps(config))
    return config_dir


def test_a_quick_gelu_config_is_refused(release, tmp_path):
    with pytest.raises(ValueError, match=r"hidden_act \{'text': 'quick_gelu', 'vision': 'quick_gelu'\}.*GELU"):
        hps(release / CHECKPOINT_FILE, quick_gelu_config(release, tmp_path))


def test_why_quick_gelu_is_refused_by_config_it_loads_and_scores_wrong(release, reward, tmp_path, rng):
    from transformers import CLIPConfig, CLIPModel

    from services.clip_checkpoints import load_strict, to_transformers

    clip = CLIPModel(CLIPConfig.from_pretrained(quick_gelu_config(release, tmp_path))).eval()
    load_strict(clip, to_transformers(torch.load(release / CHECKPOINT_FILE, weights_only=True), vision=True))
    wrong = Hpsv2(clip=clip, processor=reward.processor)
    wrong.load("cpu")
    images = random_images(rng, 3, 32)
    got = np.array([o.reward for o in wrong.score(images, PROMPTS[:3])])
    assert np.abs(got - [o.reward for o in reward.score(images, PROMPTS[:3])]).max() > 100 * ATOL


def test_info_names_the_models_and_the_range(reward, release):
    info = reward.info()
    assert (info.min_reward, info.max_reward, info.higher_is_better) == (-1.0, 1.0, True)
    assert [m.source for m in info.models] == [str(release / CHECKPOINT_FILE), str(release / HPSV2_CLIP_CONFIG_DIR)]

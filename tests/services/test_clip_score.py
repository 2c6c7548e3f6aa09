"""The CLIP score reward on a tiny seeded CLIP saved and loaded through `from_pretrained`: equal to the published
formula computed independently (CLIPModel's joint forward, as TorchMetrics' CLIPScore does), batch-invariant, and
named errors for a missing model."""

import numpy as np
import pytest
import torch

from services.registry import build_reward
from trainer.local_models.tiny import tiny_clip

# float32; the joint forward pads the prompts of all pairs to one length and embeds them in one batch, the reward
# embeds each unique prompt once: the same sums in other orders (measured difference ~1e-7 on cosines of norm 1).
ATOL = 1e-5
PROMPTS = ["two green balls in the city", "a red cube on the beach", "three blue dogs in a forest at night"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    model, processor = tiny_clip(seed=0)
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def reference(clip_dir, images, prompts, scale):
    """scale * max(cos, 0) per (image, prompt) pair, from CLIPModel's own forward (logits_per_image / logit_scale)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        out = model(**inputs)
        cosine = torch.diagonal(out.logits_per_image / model.logit_scale.exp())  # (B,)
    return (scale * cosine.clamp(min=0)).numpy(), cosine.numpy()


@pytest.mark.parametrize("scale", [100.0, 2.5])
def test_scores_equal_the_clipscore_formula(clip_dir, rng, scale):
    reward = build_reward("clip_score", {"clip": str(clip_dir), "scale": scale})
    reward.load("cpu")
    images = [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(9)]
    prompts = [PROMPTS[i % 3] for i in range(9)]
    outputs = reward.score(images, prompts)
    expected, cosine = reference(clip_dir, images, prompts, scale)
    np.testing.assert_allclose([o.reward for o in outputs], expected, atol=ATOL * scale)
    np.testing.assert_allclose([o.components["cosine"] for o in outputs], cosine, atol=ATOL)
    # The random tiny CLIP gives cosines of both signs here, so the clamp at zero is exercised.
    assert (cosine < 0).any() and (cosine > 0).any()
    assert all(0.0 <= o.reward <= scale for o in outputs)


def test_deterministic_and_independent_of_batch_composition(clip_dir, rng):
    reward = build_reward("clip_score", {"clip": str(clip_dir), "batch_size": 4})
    reward.load("cpu")
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    prompts = [PROMPTS[i % 3] for i in range(7)]
    batch = [o.reward for o in reward.score(images, prompts)]
    assert len(set(batch)) > 3
    assert [o.reward for o in reward.score(images, prompts)] == batch
    alone = [reward.score([i], [p])[0].reward for i, p in zip(images, prompts, strict=True)]
    reordered = [o.reward for o in reward.score(images[::-1], prompts[::-1])][::-1]
    # Other batch shapes take other matmul kernels: last-bit differences only (scale 100 x float32 eps).
    np.testing.assert_allclose(alone, batch, atol=1e-4)
    np.testing.assert_allclose(reordered, batch, atol=1e-4)


def test_a_missing_model_names_the_path(tmp_path):
    reward = build_reward("clip_score", {"clip": str(tmp_path / "absent")})
    with pytest.raises(FileNotFoundError, match="clip_score reward.*absent"):
        reward.load("cpu")

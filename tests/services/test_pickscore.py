"""PickScore on a tiny seeded CLIP in the release's layout (a CLIPModel directory, the processor in another one):
equal to the model card's formula computed independently, batch-invariant, named errors."""

import numpy as np
import pytest
import torch

from services.registry import build_reward
from trainer.local_models.tiny import save_tiny_pickscore

ATOL = 1e-5  # on cosines; see tests/services/test_clip_score.py
PROMPTS = ["two green balls in the city", "a red cube on the beach"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(model directory, processor directory), as yuvalkirstain/PickScore_v1 and the laion ViT-H-14 repo are."""
    root = save_tiny_pickscore(tmp_path_factory.mktemp("pickscore"))
    return root / "model", root / "processor"


def features(output):
    return getattr(output, "pooler_output", output)


def model_card_scores(release, images, prompt):
    """The model card's recipe for one prompt and its images: logit_scale.exp() * text_embs @ image_embs.T."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(release[0]).eval(), CLIPProcessor.from_pretrained(release[1])
    image_inputs = processor(images=images, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        # transformers 5 returns the projected embedding as `pooler_output`; older versions, the tensor itself.
        image_embs = features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (text_embs @ image_embs.T)[0]).numpy()


def test_scores_equal_the_model_cards_formula(release, rng):
    reward = build_reward("pickscore", {"model": str(release[0]), "processor": str(release[1])})
    reward.load("cpu")
    images = [rng.integers(0, 256, (48, 40 + 4 * i, 3), dtype=np.uint8) for i in range(6)]
    prompts = [PROMPTS[i % 2] for i in range(6)]
    outputs = reward.score(images, prompts)
    for k, prompt in enumerate(PROMPTS):
        mine = [o.reward for o, p in zip(outputs, prompts, strict=True) if p == prompt]
        expected = model_card_scores(release, images[k::2], prompt)
        np.testing.assert_allclose(mine, expected, atol=ATOL * 60)
    assert all(o.components["logit_scale"] == pytest.approx(60.0) for o in outputs)
    # The builder's logit scale is 60, not CLIP's initial 1 / 0.07: the reward reads the model's own.
    cosines = [o.components["cosine"] for o in outputs]
    np.testing.assert_allclose([o.reward for o in outputs], [60.0 * c for c in cosines], rtol=1e-6)
    assert reward.info().max_reward == pytest.approx(60.0)


def test_deterministic_and_independent_of_batch_composition(release, rng):
    reward = build_reward("pickscore", {"model": str(release[0]), "processor": str(release[1]), "batch_size": 3})
    reward.load("cpu")
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    prompts = [PROMPTS[i % 2] for i in range(5)]
    batch = [o.reward for o in reward.score(images, prompts)]
    assert [o.reward for o in reward.score(images, prompts)] == batch
    alone = [reward.score([i], [p])[0].reward for i, p in zip(images, prompts, strict=True)]
    np.testing.assert_allclose(alone, batch, atol=1e-4)  # last bits of other kernels, x logit_scale 60


@pytest.mark.parametrize("missing", ["model", "processor"])
def test_a_missing_model_or_processor_names_it(release, tmp_path, missing):
    config = {"model": str(release[0]), "processor": str(release[1]), missing: str(tmp_path / "absent")}
    with pytest.raises(FileNotFoundError, match="pickscore reward.*absent"):
        build_reward("pickscore", config).load("cpu")

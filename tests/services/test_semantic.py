"""Semantic segment reward on tiny seeded SAM, CLIP and Llama loaded from disk."""

import numpy as np
import pytest

from services.registry import build_reward
from services.reward import SampleFailure
from services.rewards.semantic import load_vocabulary, prompt_nouns
from trainer.local_models.tiny import TINY_SAM, save_tiny_models

PROMPTS = ["two green dogs in the city", "three red apples on a wooden table", "a corgi riding a surfboard"]


def random_images(rng, n):
    return [rng.integers(0, 256, (72, 96, 3), dtype=np.uint8) for _ in range(n)]


def semantic_config(paths, **overrides):
    """The local profile's semantic config, with overrides per section."""
    sam = {
        **TINY_SAM,
        "checkpoint": str(paths["sam"] / "sam_tiny.pth"),
        "points_per_side": 4,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "box_nms_thresh": 1.0,
        "max_segments": 6,
    }
    config = {"sam": sam, "labeler": {"clip": str(paths["clip"])}, "llm": {"model": str(paths["llama"])}}
    for section, values in overrides.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    return config


@pytest.fixture(scope="module")
def paths():
    return save_tiny_models()


@pytest.fixture(scope="module")
def reward(paths):
    r = build_reward("semantic", semantic_config(paths))
    r.load("cpu")
    return r


def test_prompt_nouns_are_singular_objects():
    assert prompt_nouns("two green dogs in the city") == ["dog", "city"]
    assert prompt_nouns("Three red apples on a wooden table") == ["apple", "table"]
    assert prompt_nouns("a box of berries and two foxes") == ["box", "berry", "fox"]


def test_builtin_vocabulary_has_coco_and_ade20k_names():
    vocab = load_vocabulary()
    assert len(vocab) == len(set(vocab)) == 210
    assert {"person", "traffic light", "teddy bear", "chest of drawers", "skyscraper", "sky"} <= set(vocab)


def test_label_vocabulary_includes_the_prompts_nouns(reward):
    vocab = reward.vocabulary_for("a corgi riding a surfboard in a lagoon")
    assert vocab[: len(reward.vocabulary)] == reward.vocabulary
    assert {"corgi", "lagoon", "surfboard"} <= set(vocab)
    assert vocab.count("surfboard") == 1  # already a COCO name: not added twice


def test_every_sample_gets_segments_and_a_reward(reward, rng):
    outputs = reward.score(random_images(rng, 3), PROMPTS)
    for out in outputs:
        assert out.segments and 0.0 <= out.reward <= 1.0
        labels = [s.label for s in out.segments]
        assert len(labels) == len(set(labels))  # same-label regions merged
        assert all(0.0 < s.area_fraction <= 1.0 and 0.0 <= s.likelihood <= 1.0 for s in out.segments)
        assert all(0.0 < s.label_confidence <= 1.0 for s in out.segments)
        assert out.components["num_segments"] == len(out.segments)
        assert out.reward == pytest.approx(np.mean([s.likelihood for s in out.segments]))


def test_deterministic_and_independent_of_batch_composition(reward, rng):
    images = random_images(rng, 3)
    batch = reward.score(images, PROMPTS)
    again = reward.score(images, PROMPTS)
    alone = [reward.score([img], [p])[0] for img, p in zip(images, PROMPTS, strict=True)]
    reordered = reward.score(images[::-1], PROMPTS[::-1])[::-1]
    for outs in (again, alone, reordered):
        for a, b in zip(outs, batch, strict=True):
            assert [s.label for s in a.segments] == [s.label for s in b.segments]
            np.testing.assert_allclose(a.reward, b.reward, atol=1e-5)
            np.testing.assert_allclose(
                [s.likelihood for s in a.segments], [s.likelihood for s in b.segments], atol=1e-5
            )


def test_area_weighted_aggregate(paths, rng):
    r = build_reward("semantic", semantic_config(paths, aggregate="area_weighted"))
    r.load("cpu")
    (out,) = r.score(random_images(rng, 1), PROMPTS[:1])
    areas = np.array([s.area_fraction for s in out.segments])
    lik = np.array([s.likelihood for s in out.segments])
    assert out.reward == pytest.approx(float((areas * lik).sum() / areas.sum()))
    assert out.components["area_weighted_likelihood"] == out.reward


def test_no_segment_gives_the_documented_empty_reward(paths, rng):
    r = build_reward("semantic", semantic_config(paths, sam={"min_area_fraction": 1.01}, empty_reward=0.25))
    r.load("cpu")
    (out,) = r.score(random_images(rng, 1), PROMPTS[:1])
    assert out.segments == [] and out.reward == 0.25 and out.components["num_segments"] == 0


def test_rating_mode_unparseable_reply_is_a_sample_failure_not_a_crash(paths, rng):
    r = build_reward("semantic", semantic_config(paths, llm={"mode": "rating", "rating_max_new_tokens": 8}))
    r.load("cpu")
    outputs = r.score(random_images(rng, 2), PROMPTS[:2])
    assert all(isinstance(o, SampleFailure) and o.code == "SCORING_FAILED" for o in outputs)


def test_missing_sam_checkpoint_names_the_path(paths, tmp_path):
    missing = str(tmp_path / "sam_vit_h_missing.pth")
    with pytest.raises(FileNotFoundError, match="sam_vit_h_missing.pth"):
        build_reward("semantic", semantic_config(paths, sam={"checkpoint": missing})).load("cpu")


@pytest.mark.integration
def test_served_semantic_matches_in_process(fleet, rng):
    from deploy.fleet import LOCAL_PROFILE
    from services.client import RewardClient
    from services.config import load_yaml

    app = next(a for a in load_yaml(LOCAL_PROFILE)["applications"] if a["name"] == "semantic")
    local = build_reward("semantic", app["args"]["reward_config"])
    local.load("cpu")
    images = random_images(rng, 3)
    results = RewardClient(fleet.grpc_target, "semantic").score(images, PROMPTS)
    expected = local.score(images, PROMPTS)
    for r, e in zip(results, expected, strict=True):
        assert r.ok and r.segments
        assert [s.label for s in r.segments] == [s.label for s in e.segments]
        np.testing.assert_allclose(r.reward, e.reward, atol=1e-5)
        np.testing.assert_allclose(
            [s.area_fraction for s in r.segments], [s.area_fraction for s in e.segments], atol=1e-6
        )

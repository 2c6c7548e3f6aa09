"""The alignment reward's model directory, loading and scoring, on a tiny CLIP and a random head."""

import numpy as np
import pytest
import torch

from services.clip import clip_embeddings
from services.registry import build_reward
from services.rewards.alignment import HeadConfig, build_head, save_alignment_model
from trainer.local_models.tiny import tiny_clip


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("alignment")
    clip, processor = tiny_clip(seed=0)
    clip.save_pretrained(out / "clip")
    processor.save_pretrained(out / "clip")
    torch.manual_seed(0)
    head_config = HeadConfig(embed_dim=clip.config.projection_dim, hidden_sizes=(8,))
    save_alignment_model(out, "clip", build_head(head_config).eval(), head_config, note="test")
    return out


def test_scores_are_probabilities_with_the_clip_score_component(reward_dir, rng):
    reward = build_reward("alignment", {"model_dir": str(reward_dir)})
    reward.load("cpu")
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["two green balls in the city", "a red cube on the beach", "two green balls in the city"]
    outputs = reward.score(images, prompts)
    assert all(0.0 <= o.reward <= 1.0 for o in outputs)
    image_emb, text_emb = clip_embeddings(reward.clip, reward.processor, images, prompts, "cpu")
    np.testing.assert_allclose(
        [o.components["clip_score"] for o in outputs], (image_emb * text_emb).sum(-1), atol=1e-6
    )
    alone = [reward.score([img], [p])[0].reward for img, p in zip(images, prompts, strict=True)]
    np.testing.assert_allclose(alone, [o.reward for o in outputs], atol=1e-6)


def test_the_directory_moves_as_a_whole(reward_dir, tmp_path, rng):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(reward_dir, moved)
    a, b = (
        build_reward("alignment", {"model_dir": str(reward_dir)}),
        build_reward("alignment", {"model_dir": str(moved)}),
    )
    a.load("cpu")
    b.load("cpu")
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert a.score([image], ["p"])[0].reward == b.score([image], ["p"])[0].reward


def test_a_residual_head_round_trips_through_the_directory(reward_dir, tmp_path, rng):
    import json
    import shutil

    from services.rewards.alignment import head_logits, set_cosine_affine

    shutil.copytree(reward_dir / "clip", tmp_path / "clip")
    embed_dim = json.loads((reward_dir / "alignment_reward.json").read_text())["head"]["embed_dim"]
    head_config = HeadConfig(embed_dim=embed_dim, hidden_sizes=(8,), residual=True)
    torch.manual_seed(1)
    head = build_head(head_config)
    set_cosine_affine(head, 7.0, -0.5)
    torch.nn.init.normal_(head["mlp"][-1].weight)  # a trained-looking residual, not the zero it starts at
    save_alignment_model(tmp_path, "clip", head.eval(), head_config)

    reward = build_reward("alignment", {"model_dir": str(tmp_path)})
    reward.load("cpu")
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["two green balls in the city", "a red cube on the beach", "one blue ball"]
    image_emb, text_emb = clip_embeddings(reward.clip, reward.processor, images, prompts, "cpu")
    with torch.no_grad():
        expected = torch.sigmoid(head_logits(head, image_emb, text_emb))
    np.testing.assert_allclose([o.reward for o in reward.score(images, prompts)], expected, atol=1e-6)


def test_missing_model_dir_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_reward/alignment_reward.json does not exist"):
        build_reward("alignment", {"model_dir": str(tmp_path / "no_reward")}).load("cpu")


@pytest.mark.integration
def test_served_trained_reward_matches_in_process(fleet, tiny_alignment_reward):
    """The fleet's `alignment` app serves a reward trained by train_reward (on a tiny testbed)."""
    from services.client import RewardClient
    from trainer.local_models.scenes import random_attrs, render_image, render_prompt

    local = build_reward("alignment", {"model_dir": tiny_alignment_reward})
    local.load("cpu")
    rng = np.random.default_rng(0)
    attrs = [random_attrs(rng) for _ in range(6)]
    images = [render_image(a, rng) for a in attrs]
    prompts = [render_prompt(a) for a in attrs]
    results = RewardClient(fleet.grpc_target, "alignment").score(images, prompts)
    expected = local.score(images, prompts)
    # float32, but the replica and this process may reduce in a different order (threads, batch): 1e-6 apart was seen.
    np.testing.assert_allclose([r.reward for r in results], [e.reward for e in expected], atol=1e-5)
    np.testing.assert_allclose(
        [r.components["clip_score"] for r in results], [e.components["clip_score"] for e in expected], atol=1e-5
    )

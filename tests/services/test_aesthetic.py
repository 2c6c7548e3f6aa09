"""The LAION aesthetic reward on the tiny CLIP and a tiny head in the release's layout, checked against the published
recipe restated here (simple_inference.py of improved-aesthetic-predictor): CLIP image features, L2-normalised, then
the five affine maps of `layers.{0,2,4,6,7}`, computed in float64 NumPy from the file's tensors.

Tolerances: ratings (about 5.5 on the tiny head) within 1e-5 of the recipe (measured: 2.3e-7, float32 against
float64); the same batch scored twice is bitwise identical, and a sample alone, among others or in other chunks
agrees within 1e-5 (measured: 0 here; float32 GEMMs of other shapes may round differently).
"""

from itertools import pairwise

import numpy as np
import pytest
import torch

from services.registry import build_reward
from services.rewards.aesthetic import HEAD_FILE, Aesthetic, AestheticConfig
from tests.conftest import random_images
from trainer.local_models.tiny import TINY_AESTHETIC_INPUT, save_tiny_aesthetic, tiny_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
RELEASE_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    clip, processor = tiny_clip(seed=0)
    clip.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def head_path(tmp_path_factory):
    return save_tiny_aesthetic(tmp_path_factory.mktemp("aesthetic")) / HEAD_FILE


def aesthetic(clip_dir, head, **fields) -> Aesthetic:
    reward = build_reward("aesthetic", {"clip": str(clip_dir), "head": str(head), **fields})
    reward.load("cpu")
    return reward


@pytest.fixture(scope="module")
def reward(clip_dir, head_path):
    return aesthetic(clip_dir, head_path)


def images_of_many_sizes(rng):
    return [
        *random_images(rng, 2, 32),
        *random_images(rng, 2, 64),
        rng.integers(0, 256, (48, 40, 3), dtype=np.uint8),
        rng.integers(0, 256, (32, 90, 3), dtype=np.uint8),
    ]


def recipe(reward, head_path, images) -> np.ndarray:
    """The published recipe: embed, normalise, apply the five affine maps (no activations)."""
    pixels = reward.processor(images=images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    with torch.no_grad():
        features = reward.clip.get_image_features(pixel_values=pixels)
    features = getattr(features, "pooler_output", features).numpy().astype(np.float64)  # (B, D)
    x = features / np.linalg.norm(features, axis=-1, keepdims=True)
    state = torch.load(head_path, weights_only=True)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
    return x[:, 0]


def test_scores_match_the_published_recipe(reward, head_path, rng):
    images = images_of_many_sizes(rng)
    got = np.array([o.reward for o in reward.score(images, ["a red cube"] * len(images))])
    want = recipe(reward, head_path, images)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.ptp(want) > 100 * ATOL  # the ratings tell the images apart, so matching them means something
    assert all(o.components == {} for o in reward.score(images[:1], ["p"]))


def test_the_score_ignores_the_prompt(reward, rng):
    images = random_images(rng, 3, 32)
    a = [o.reward for o in reward.score(images, ["a red cube", "a blue sky", "x"])]
    assert a == [o.reward for o in reward.score(images, ["", "two green dogs in the city", "a red cube"])]


def test_scores_are_deterministic_and_independent_of_the_batch(reward, rng):
    images = images_of_many_sizes(rng)
    prompts = ["p"] * len(images)
    batch = [o.reward for o in reward.score(images, prompts)]
    assert [o.reward for o in reward.score(images, prompts)] == batch
    alone = [reward.score([image], ["p"])[0].reward for image in images]
    np.testing.assert_allclose(alone, batch, atol=ATOL, rtol=0)
    mixed = reward.score([*random_images(rng, 3, 40), *images[::-1]], ["p"] * (len(images) + 3))
    np.testing.assert_allclose([o.reward for o in mixed[3:][::-1]], batch, atol=ATOL, rtol=0)
    chunked = Aesthetic(AestheticConfig(batch_size=2), clip=reward.clip, processor=reward.processor, head=reward.head)
    chunked.load("cpu")
    np.testing.assert_allclose([o.reward for o in chunked.score(images, prompts)], batch, atol=ATOL, rtol=0)


def test_the_tiny_head_has_the_release_layout(head_path):
    state = torch.load(head_path, weights_only=True)
    assert list(state) == RELEASE_KEYS
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, TINY_AESTHETIC_INPUT),
        (128, 1024),
        (64, 128),
        (16, 64),
        (1, 16),
    ]
    assert TINY_AESTHETIC_INPUT == tiny_clip()[0].config.projection_dim


def test_info_gives_the_heads_exact_range_on_unit_embeddings(reward, head_path, rng):
    state = {k: v.double().numpy() for k, v in torch.load(head_path, weights_only=True).items()}
    weight, bias = np.eye(TINY_AESTHETIC_INPUT), np.zeros(TINY_AESTHETIC_INPUT)  # the composed affine map x @ w + b
    for i in (0, 2, 4, 6, 7):
        weight, bias = (
            weight @ state[f"layers.{i}.weight"].T,
            bias @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"],
        )
    norm = np.linalg.norm(weight)
    info = reward.info()
    np.testing.assert_allclose([info.min_reward, info.max_reward], [bias[0] - norm, bias[0] + norm], atol=1e-4)
    scores = [o.reward for o in reward.score(random_images(rng, 4, 32), ["p"] * 4)]
    assert info.min_reward < min(scores) <= max(scores) < info.max_reward
    assert [m.role for m in info.models] == ["clip", "head"]
    assert Aesthetic().info().min_reward == float("-inf")  # not loaded: no range known yet


# --- loading errors ---------------------------------------------------------------------------------------------


def head_state(widths=(16, 1024, 128, 64, 16, 1), indices=(0, 2, 4, 6, 7)) -> dict:
    state = {}
    for (width_in, width_out), i in zip(pairwise(widths), indices, strict=True):
        state[f"layers.{i}.weight"], state[f"layers.{i}.bias"] = (
            torch.zeros(width_out, width_in),
            torch.zeros(width_out),
        )
    return state


def test_a_missing_head_is_named(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"aesthetic reward: head .*nope\.pth.*does not exist"):
        aesthetic(clip_dir, tmp_path / "nope.pth")


def test_a_state_dict_of_another_model_is_named(clip_dir, tmp_path):
    clip, _ = tiny_clip()
    torch.save(clip.state_dict(), tmp_path / "clip.pth")
    with pytest.raises(
        ValueError, match=r"not the improved-aesthetic-predictor head.*missing keys \['layers\.0\.bias'"
    ):
        aesthetic(clip_dir, tmp_path / "clip.pth")
    # The ReLU variant's Sequential puts its Linears at 0, 3, 6, 9, 11.
    torch.save(head_state(indices=(0, 3, 6, 9, 11)), tmp_path / "relu.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['layers\.11\.bias', 'layers\.11\.weight', 'layers\.3"):
        aesthetic(clip_dir, tmp_path / "relu.pth")
    torch.save({"state_dict": head_state(), "epoch": 3}, tmp_path / "lightning.pth")
    with pytest.raises(ValueError, match=r"not a flat state dict of tensors \(found \['epoch', 'state_dict'\]\)"):
        aesthetic(clip_dir, tmp_path / "lightning.pth")


def test_shapes_that_do_not_chain_are_named(clip_dir, tmp_path):
    state = head_state()
    state["layers.2.weight"] = torch.zeros(128, 1000)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"do not chain at layers\.2: layers\.0\.weight \(1024, 16\).*\(128, 1000\)"):
        aesthetic(clip_dir, tmp_path / "broken.pth")
    torch.save(head_state(widths=(16, 1024, 128, 64, 16, 2)), tmp_path / "two.pth")
    with pytest.raises(ValueError, match=r"must output one number, layers\.7 outputs 2"):
        aesthetic(clip_dir, tmp_path / "two.pth")


def test_an_input_width_other_than_the_clips_is_named(clip_dir, tmp_path):
    torch.save(head_state(widths=(768, 1024, 128, 64, 16, 1)), tmp_path / "vit_l.pth")
    with pytest.raises(ValueError, match=r"takes 768-wide embeddings \(layers\.0\.weight \(1024, 768\)\).* 16 dim"):
        aesthetic(clip_dir, tmp_path / "vit_l.pth")

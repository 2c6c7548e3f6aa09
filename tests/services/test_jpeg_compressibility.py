import io

import numpy as np
from PIL import Image

from services.registry import build_reward
from tests.conftest import random_images


def _reward(**config):
    reward = build_reward("jpeg_compressibility", config)
    reward.load("cpu")
    return reward


def test_reward_is_minus_jpeg_kilobytes_at_the_configured_quality(rng):
    image = random_images(rng, 1, 96)[0]
    for quality in (95, 50):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        (out,) = _reward(quality=quality).score([image], ["a prompt"])
        assert out.reward == -buf.tell() / 1000 and out.components == {"jpeg_kb": buf.tell() / 1000}


def test_simpler_images_score_higher(rng):
    flat = np.full((128, 128, 3), 127, np.uint8)
    noise = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    flat_out, noise_out = _reward().score([flat, noise], ["x", "x"])
    assert flat_out.reward > noise_out.reward
    assert noise_out.reward < 0 and flat_out.reward < 0  # range (-inf, 0]
    assert _reward().info().max_reward == 0.0


def test_batch_composition_does_not_change_scores(rng):
    images = random_images(rng, 6)
    reward = _reward()
    together = [o.reward for o in reward.score(images, ["p"] * 6)]
    alone = [reward.score([img], ["p"])[0].reward for img in images]
    assert together == alone
    assert len(set(together)) > 1

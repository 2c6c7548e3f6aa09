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


def test_scores_from_the_threads_memory_file_equal_an_in_memory_save_at_any_size_order(rng):
    """The reward encodes into one memory file per thread (for the GIL, see its docstring): a small image after a
    large one must not count the large one's bytes, and threads scoring at once do not share a file."""
    from concurrent.futures import ThreadPoolExecutor

    def size(image):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        return buf.tell()

    images = [rng.integers(0, 256, (s, s + 3, 3), dtype=np.uint8) for s in (256, 8, 64, 1, 128)]
    expected = [-size(img) / 1000 for img in images]
    reward = _reward()
    assert [o.reward for o in reward.score(images, ["p"] * 5)] == expected
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda k: [o.reward for o in reward.score(images[k:] + images[:k], ["p"] * 5)], range(5)))
    assert all(run == expected[k:] + expected[:k] for k, run in enumerate(runs))

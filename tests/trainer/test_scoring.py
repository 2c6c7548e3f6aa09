"""Background scoring against the served rewards: order kept, failures loud (never a silent 0)."""

import numpy as np
import pytest

from services.client import RewardClient
from tests.conftest import LIMITED, free_port, random_images
from trainer.config import RewardsConfig
from trainer.scoring import BackgroundScorer, RewardRoundError

pytestmark = pytest.mark.integration


def test_batches_come_back_in_submission_order_with_the_served_scores(fleet, rng):
    images = np.stack(random_images(rng, 10, size=32))
    prompts = [f"prompt {i}" for i in range(10)]
    scorer = BackgroundScorer(
        RewardsConfig(target=fleet.grpc_target, weights={"jpeg_compressibility": 1.0, "jpeg_limited": 1.0})
    )
    try:
        scorer.submit(images[:6], prompts[:6], [str(i) for i in range(6)])
        scorer.submit(images[6:], prompts[6:], [str(i) for i in range(6, 10)])
        scores = scorer.collect()
        assert scorer.wait_s > 0
        assert scorer.collect() == {
            "jpeg_compressibility": pytest.approx(np.zeros(0)),
            "jpeg_limited": pytest.approx(np.zeros(0)),
        }
    finally:
        scorer.close()
    with RewardClient(fleet.grpc_target, "jpeg_compressibility") as client:
        direct = [r.reward for r in client.score(list(images), prompts)]
    np.testing.assert_allclose(scores["jpeg_compressibility"], direct)
    np.testing.assert_allclose(scores["jpeg_limited"], direct)  # same reward, split into requests of 4


def test_a_per_sample_error_fails_the_round(fleet, rng):
    side = int(np.sqrt(LIMITED["max_image_pixels"])) + 8  # over jpeg_limited's pixel limit
    images = np.stack(random_images(rng, 2, size=side))
    scorer = BackgroundScorer(RewardsConfig(target=fleet.grpc_target, weights={"jpeg_limited": 1.0}))
    try:
        scorer.submit(images, ["a", "b"], ["x0", "x1"])
        with pytest.raises(
            RewardRoundError, match="'jpeg_limited' returned 2 per-sample error.*sample x0: NOT_SENT: sample of"
        ):
            scorer.collect()
    finally:
        scorer.close()


def test_an_unreachable_fleet_fails_after_retries():
    config = RewardsConfig(target=f"127.0.0.1:{free_port()}", max_retries=1, timeout_s=5)
    scorer = BackgroundScorer(config)
    try:
        with pytest.raises(RewardRoundError, match="not reachable"):
            scorer.check()
        scorer.submit(np.zeros((1, 16, 16, 3), np.uint8), ["a"], ["0"])
        with pytest.raises(RewardRoundError, match="failed after retries"):
            scorer.collect()
    finally:
        scorer.close()

"""The deployment's logic, in-process (the gRPC path itself is covered in test_grpc_fleet.py)."""

from dataclasses import dataclass

import numpy as np
import pytest

from protos.reward.v1 import reward_pb2
from services.registry import register
from services.reward import Reward, RewardInfo, RewardOutput
from services.serving import RewardAppArgs, RewardDeployment


@dataclass(frozen=True)
class _FailingConfig:
    # Prompts on which the whole batch raises.
    poison: str = "poison"


@register("failing_for_tests")
class _Failing(Reward):
    """Scores the mean pixel; raises for the whole batch if any prompt is the poison prompt."""

    Config = _FailingConfig

    def load(self, device="cpu"):
        pass

    def score(self, images, prompts):
        if self.config.poison in prompts:
            raise RuntimeError("poisoned batch")
        return [RewardOutput(float(img.mean())) for img in images]

    def info(self):
        return RewardInfo("mean pixel", 0.0, 255.0)


def _deployment(**args):
    # The class under the Serve decorator, built in-process.
    return RewardDeployment.func_or_class(RewardAppArgs(**args))


def test_a_raising_batch_is_rescored_one_by_one_so_only_the_bad_sample_fails():
    dep = _deployment(reward="failing_for_tests", device="cpu")
    items = [(np.full((4, 4, 3), v, np.uint8), p) for v, p in [(1, "ok"), (2, "poison"), (3, "ok")]]
    out = dep.score_isolating(items)
    assert [o.reward for o in (out[0], out[2])] == [1.0, 3.0]
    assert out[1].code == "SCORING_FAILED" and "poisoned batch" in out[1].message


def test_request_problems_are_named_before_decoding():
    dep = _deployment(reward="jpeg_compressibility", max_samples_per_request=2, max_request_bytes=100)
    sample = reward_pb2.Sample(prompt="p", encoded=b"x" * 57)  # 57 + 3 (prompt) + 2 (tag, length) = 62 bytes
    assert dep.request_problem(reward_pb2.ScoreRequest()) == "ScoreRequest has no samples"
    assert "3 samples, more than the limit of 2" in dep.request_problem(reward_pb2.ScoreRequest(samples=[sample] * 3))
    assert "124 bytes of samples, more than the limit of 100" in dep.request_problem(
        reward_pb2.ScoreRequest(samples=[sample] * 2)
    )
    assert "unknown option(s) ['beam']" in dep.request_problem(
        reward_pb2.ScoreRequest(samples=[sample], options={"beam": "4"})
    )
    assert dep.request_problem(reward_pb2.ScoreRequest(samples=[sample])) is None


def test_app_args_reject_unknown_keys():
    with pytest.raises(ValueError, match="max_batch"):
        RewardAppArgs(reward="jpeg_compressibility", max_batch=4)

"""The deployment's logic, in-process (the gRPC path itself is covered in test_grpc_fleet.py)."""

import numpy as np
import pytest
from pydantic import Field

from protos.reward.v1 import reward_pb2
from services.config import Config
from services.registry import register
from services.reward import Reward, RewardInfo, RewardOutput
from services.serving import RewardAppArgs, RewardDeployment


class _FailingConfig(Config):
    poison: str = Field(default="poison", description="Prompts on which the whole batch raises.")


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
    assert dep.admission.request_problem(reward_pb2.ScoreRequest()) == "ScoreRequest has no samples"
    assert "3 samples, more than the limit of 2" in dep.admission.request_problem(
        reward_pb2.ScoreRequest(samples=[sample] * 3)
    )
    assert "124 bytes of samples, more than the limit of 100" in dep.admission.request_problem(
        reward_pb2.ScoreRequest(samples=[sample] * 2)
    )
    assert "unknown option(s) ['beam']" in dep.admission.request_problem(
        reward_pb2.ScoreRequest(samples=[sample], options={"beam": "4"})
    )
    assert dep.admission.request_problem(reward_pb2.ScoreRequest(samples=[sample])) is None


def test_app_args_reject_unknown_keys():
    with pytest.raises(ValueError, match="max_batch"):
        RewardAppArgs(reward="jpeg_compressibility", max_batch=4)


class _Context:
    """The part of a gRPC context the admission uses."""

    def __init__(self, metadata):
        self.metadata, self.code, self.details = metadata, None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_admission_rejects_before_parsing_and_parses_bytes_once_admitted():
    import grpc

    from services.admission import Admission, AdmissionArgs
    from services.metrics import RewardMetrics

    admission = Admission(
        app_name="app",
        reward_name="r",
        token=b"s3cret",
        limits=AdmissionArgs(max_samples_per_request=1),
        metrics=RewardMetrics("r"),
        provenance=reward_pb2.Provenance(reward_name="r"),
    )
    request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt="p", encoded=b"x")])
    bearer = ("authorization", "Bearer s3cret")
    unauthenticated = _Context([("application", "app")])
    assert admission.score_request(b"\xff", unauthenticated) == reward_pb2.ScoreResponse()
    assert unauthenticated.code == grpc.StatusCode.UNAUTHENTICATED
    elsewhere = _Context([bearer, ("application", "other")])
    assert admission.score_request(request.SerializeToString(), elsewhere) == reward_pb2.ScoreResponse()
    assert elsewhere.code == grpc.StatusCode.NOT_FOUND
    garbage = _Context([bearer])
    assert admission.score_request(b"\xff", garbage).provenance.reward_name == "r"
    assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid reward.v1.ScoreRequest" in garbage.details
    admitted = _Context([bearer, ("application", "app")])
    assert admission.score_request(request.SerializeToString(), admitted) == request and admitted.code is None


def test_the_byte_limit_counts_samples_whether_the_request_came_as_bytes_or_parsed():
    dep = _deployment(reward="jpeg_compressibility", max_request_bytes=100)
    sample = reward_pb2.Sample(prompt="p", encoded=b"x" * 57)  # 62 bytes serialized
    for samples, over in (([sample], False), ([sample] * 2, True)):
        wire = reward_pb2.ScoreRequest(samples=samples).SerializeToString()
        parsed = dep.admission.score_request(wire, None)
        assert isinstance(parsed, reward_pb2.ScoreResponse) == over
        assert (dep.admission.request_problem(reward_pb2.ScoreRequest(samples=samples)) is not None) == over


def test_max_concurrent_batches_must_be_positive():
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        RewardAppArgs(reward="jpeg_compressibility", max_concurrent_batches=0)

"""Prometheus metrics: score through the real gRPC proxy, then read them from the node's metrics agent (loopback)."""

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.reward.v1 import reward_pb2, reward_pb2_grpc
from services.client import make_sample
from tests.conftest import random_images
from tests.services.test_auth import TOKEN, deploy_auth_app

pytestmark = pytest.mark.integration

APP = "jpeg_metrics"


@pytest.fixture(scope="module")
def metrics_app(fleet):
    # Its own application, so the counters hold only this module's traffic.
    from ray import serve

    deploy_auth_app(APP, fleet.grpc_target, device="cpu", max_samples_per_request=4)
    yield APP
    serve.delete(APP)


def scrape() -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of this app's rewardfleet series, from every node's metrics export port."""
    import ray

    values: dict[tuple[str, frozenset], float] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        # One local node in the tests: its agent listens on every interface, loopback included.
        url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_rewardfleet_") and s.labels.get("application") == APP:
                    labels = frozenset((k, v) for k, v in s.labels.items() if k in ("error_code", "status_code", "le"))
                    assert s.labels["reward"] == "jpeg_compressibility" and s.labels["deployment"] == "reward"
                    values[(s.name, labels)] = values.get((s.name, labels), 0.0) + s.value
    return values


def test_scoring_updates_the_replica_metrics(fleet, metrics_app, rng):
    images = random_images(rng, 3)
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        auth = (("application", APP), ("authorization", f"Bearer {TOKEN}"))
        # 1. Two rejected requests: no token, then more samples than the limit of 4.
        one = [make_sample("a", "p", images[0])]
        with pytest.raises(grpc.RpcError) as no_token:
            stub.Score(reward_pb2.ScoreRequest(samples=one), metadata=(("application", APP),), timeout=30)
        with pytest.raises(grpc.RpcError) as too_many:
            stub.Score(reward_pb2.ScoreRequest(samples=one * 5), metadata=auth, timeout=30)
        assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # 2. Two samples scored, two per-sample errors.
        samples = [
            make_sample("good0", "p", images[1]),
            reward_pb2.Sample(id="corrupt", prompt="p", encoded=b"\x89PNG not really"),
            make_sample("blank", "  ", images[2]),
            make_sample("good1", "p", images[2]),
        ]
        results = stub.Score(reward_pb2.ScoreRequest(samples=samples), metadata=auth, timeout=30).results
    assert [r.HasField("error") for r in results] == [False, True, True, False]

    expected = {
        ("ray_rewardfleet_samples_scored_total", frozenset()): 2.0,
        ("ray_rewardfleet_sample_errors_total", frozenset({("error_code", "INVALID_IMAGE")})): 1.0,
        ("ray_rewardfleet_sample_errors_total", frozenset({("error_code", "INVALID_PROMPT")})): 1.0,
        ("ray_rewardfleet_request_rejections_total", frozenset({("status_code", "UNAUTHENTICATED")})): 1.0,
        ("ray_rewardfleet_request_rejections_total", frozenset({("status_code", "INVALID_ARGUMENT")})): 1.0,
    }

    def batched_samples(values):
        # Exact from the buckets (Ray exports histogram sums from bucket midpoints): batches of 1 and of 2.
        ones = values.get(("ray_rewardfleet_batch_size_bucket", frozenset({("le", "1.0")})), 0.0)
        up_to_two = values.get(("ray_rewardfleet_batch_size_bucket", frozenset({("le", "2.0")})), 0.0)
        return ones + 2 * (up_to_two - ones)

    # Replicas push metrics to the node's agent every few seconds: poll, bounded.
    deadline = time.monotonic() + 90
    values = scrape()
    while time.monotonic() < deadline and (
        any(values.get(k) != v for k, v in expected.items()) or batched_samples(values) != 2
    ):
        time.sleep(1)
        values = scrape()
    assert {k: values.get(k) for k in expected} == expected
    # Both valid samples went through the model, in one batch or two; each model call was timed.
    assert batched_samples(values) == 2
    batches = values[("ray_rewardfleet_batch_size_count", frozenset())]
    assert batches in (1, 2)
    assert values[("ray_rewardfleet_model_latency_seconds_count", frozenset())] == batches

"""A replica's Prometheus metrics (`RewardMetrics`), shared by the reward and assemble applications.

They are exported through `ray.serve.metrics`, which adds the application, deployment and replica tags; Ray's
exporter prefixes each name with `ray_` and suffixes counters with `_total` (README, "Observability"). Outside a
Serve replica (in-process tests, benchmarks) recording is a no-op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ray.serve import metrics

from protos.reward.v1 import reward_pb2

# Buckets of the histograms: batch sizes up to a large max_batch_size, model time from ms (JPEG) to a minute (LLM).
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class RewardMetrics:
    """The metrics of one replica, every one tagged with the reward (or "assemble") it serves."""

    def __init__(self, reward_name: str):
        self.samples_scored = metrics.Counter(
            "rewardfleet_samples_scored", description="Samples that got a reward.", tag_keys=("reward",)
        )
        self.sample_errors = metrics.Counter(
            "rewardfleet_sample_errors",
            description="Samples answered with a per-sample error, by reward.v1.ErrorCode name.",
            tag_keys=("reward", "error_code"),
        )
        self.batch_size = metrics.Histogram(
            "rewardfleet_batch_size",
            description="Samples per model call (cross-request @serve.batch batches).",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("reward",),
        )
        self.model_latency = metrics.Histogram(
            "rewardfleet_model_latency_seconds",
            description="Seconds the reward model took per batch (including one-by-one rescoring after a failure).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("reward",),
        )
        self.request_rejections = metrics.Counter(
            "rewardfleet_request_rejections",
            description="Requests the replica ended with a non-OK gRPC status, by status code name.",
            tag_keys=("reward", "status_code"),
        )
        for metric in (
            self.samples_scored,
            self.sample_errors,
            self.batch_size,
            self.model_latency,
            self.request_rejections,
        ):
            metric.set_default_tags({"reward": reward_name})

    def record_results(self, results: Sequence[reward_pb2.SampleResult]) -> None:
        """Counts a response's results: scored ones, and errors by code."""
        errors = Counter(reward_pb2.ErrorCode.Name(r.error.code) for r in results if r.HasField("error"))
        if len(results) > sum(errors.values()):
            self.samples_scored.inc(len(results) - sum(errors.values()))
        for code, n in errors.items():
            self.sample_errors.inc(n, tags={"error_code": code})

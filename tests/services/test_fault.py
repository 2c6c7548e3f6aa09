"""A reward replica killed under load: Serve replaces it, and every sample is still answered.

The test deploys its own two-replica application on the session fleet's proxy (the shared applications' replicas
are left alone), kills one replica with `ray.kill` while four clients score continuously, and checks that every
call returned every sample with its exact in-process score. Two layers recover the requests the victim held: Ray
2.60's router re-sends a request to another replica when the chosen one dies before accepting it, and a request the
victim had accepted fails INTERNAL, which the client retries. Which layer answers depends on where the kill lands
(one run of the suite saw no client retry at all), so the test asserts that calls were in flight across the kill,
not which layer answered them.
"""

import threading
import time

import numpy as np
import pytest
import ray
from ray import serve
from ray.serve.context import _get_global_client

from services.client import RewardClient
from services.registry import build_reward
from services.serving import RewardAppArgs, RewardDeployment
from tests.conftest import random_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "jpeg_fault"


def _replicas(app: str) -> dict[str, str]:
    """Replica actor name -> state of the app's `reward` deployment, as the Serve controller reports them."""
    details = _get_global_client().get_serve_details()
    return {r["actor_name"]: r["state"] for r in details["applications"][app]["deployments"]["reward"]["replicas"]}


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s}s")
        time.sleep(0.2)


@pytest.fixture
def fault_app(fleet):
    """Two replicas of the JPEG reward on the fleet's gRPC proxy; deleted afterwards."""
    args = RewardAppArgs(
        reward="jpeg_compressibility",
        device="cpu",
        # Batches wait up to 0.25 s to fill (they never fill here), so every request spends most of its life
        # inside a replica: the kill always lands on requests in flight, not between them.
        max_batch_size=64,
        batch_wait_timeout_s=0.25,
    )
    deployment = RewardDeployment.options(
        num_replicas=2,
        max_ongoing_requests=16,
        ray_actor_options={"num_cpus": 0.5},
        # Notice the dead replica within seconds rather than the default 10 s period.
        health_check_period_s=1,
        health_check_timeout_s=5,
    )
    serve.run(deployment.bind(args.model_dump()), name=APP, route_prefix=f"/{APP}")
    yield fleet.grpc_target
    serve.delete(APP)


def test_a_killed_replica_loses_no_sample(fault_app):
    images = random_images(np.random.default_rng(0), 8, size=96)
    reward = build_reward("jpeg_compressibility")
    reward.load("cpu")
    expected = [np.float32(o.reward) for o in reward.score(images, ["p"] * 8)]

    stop = threading.Event()
    answered: list[list[float]] = []  # the rewards of each successful call
    spans: list[tuple[float, float]] = []  # (start, end) of each successful call, monotonic
    failures: list[str] = []
    retries: list[int] = []

    def score_continuously():
        # 8 images in requests of 2, two in flight: each call is 4 requests, all of them retried on their own.
        with RewardClient(fault_app, APP, max_samples_per_request=2, max_in_flight=2, max_retries=10) as client:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    results = client.score(images, "a red cube")
                except Exception as e:  # a lost call: recorded and asserted on below
                    failures.append(repr(e))
                    continue
                spans.append((start, time.monotonic()))
                answered.append([r.reward if r.ok else r.error_code for r in results])
            retries.append(client.stats.retries)

    threads = [threading.Thread(target=score_continuously, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(answered) >= 8, 60, "8 calls answered before the kill")
        before = _replicas(APP)
        assert list(before.values()) == ["RUNNING", "RUNNING"]
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        # Serve replaces it; clients keep scoring through the gap and for a while after the replacement.
        def replaced():
            now = _replicas(APP)
            return victim not in now and list(now.values()) == ["RUNNING", "RUNNING"]

        _wait_for(replaced, 120, "the killed replica replaced")
        after_replacement = len(answered)
        _wait_for(lambda: len(answered) >= after_replacement + 8, 60, "8 calls answered after the replacement")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    assert failures == []
    assert all(rewards == expected for rewards in answered), "a sample came back with an error or a wrong score"
    # The kill landed on calls in flight (8 requests in flight, each waiting up to 0.25 s in a batch), and those
    # calls were answered in full: by Serve re-routing them or by the client's retries (counted here: `retries`).
    assert any(start < killed_at < end for start, end in spans), "no call was in flight across the kill"
    print(f"\nclient retries after the kill: {sum(retries)}")

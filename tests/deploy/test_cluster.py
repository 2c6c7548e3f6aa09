"""The fleet on a Ray cluster of several nodes (deploy/local_cluster.py: `ray start` nodes on this machine).

Three nodes: a GPU-less head (the Serve controller, CPU replicas; custom resource `cpu_pool`) and two workers that
declare 2 logical GPUs each and the custom resource `reward_node`. Placement is Ray's own, as on a real cluster;
the devices are not there, so GPU replicas run with `device: auto` (CPU). Every proxy listens on the same gRPC port
(`proxy_location: EveryNode`; gRPC sets SO_REUSEPORT, so on one machine the kernel spreads connections over them).

`make test` runs one ramp and one node kill, with short holds, and JPEG replicas alone; `make test-cluster`
(`--cluster-full`) runs the full set: the caption reward's tiny models among the GPU replicas, the CUDA-less replica
(`cluster_full`), two ramps, a kill of each worker node in turn, 60 s of overload. Figures: benchmarks/README.md.
"""

from __future__ import annotations

import copy
import time

import psutil
import pytest

from deploy.fleet import LOCAL_PROFILE, load_serve_config
from tests.conftest import free_port, loopback_cluster
from tests.deploy.load import Load, p99

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

GPU_NODE = {"num_cpus": 4, "num_gpus": 2, "resources": {"reward_node": 1}}


@pytest.fixture(scope="module")
def cluster(local_artifacts):
    """A GPU-less head with `cpu_pool` and two GPU workers, this process their driver."""
    with loopback_cluster({"num_cpus": 4, "resources": {"cpu_pool": 1}}, GPU_NODE, GPU_NODE) as running:
        yield running


def _app(base: dict, name: str, *, deployment: dict, **args) -> dict:
    app = copy.deepcopy(base)
    app.update(name=name, route_prefix=f"/{name}")
    app["args"].update(args)
    app["deployments"] = [{"name": "reward", **deployment}]
    return app


def cluster_shaped_profile(grpc_port: int, with_caption: bool = True) -> dict:
    """The cluster profile's shape on the tiny models: the caption reward as deploy/cluster.yaml places it (0.5 GPU
    a replica) on the local profile's tiny captioner, weight-free JPEG replicas at 0.5 GPU filling the rest of the
    4 GPUs, and a CPU-only JPEG replica pinned to the head by a custom resource."""
    from services.config import load_yaml

    local = load_serve_config(LOCAL_PROFILE, grpc_port=grpc_port, http_port=free_port())
    cluster_caption = next(a for a in load_yaml("deploy/cluster.yaml")["applications"] if a["name"] == "caption")
    jpeg = next(a for a in local["applications"] if a["name"] == "jpeg_compressibility")
    caption = next(a for a in local["applications"] if a["name"] == "caption")
    gpu_options = {"num_gpus": cluster_caption["deployments"][0]["ray_actor_options"]["num_gpus"], "num_cpus": 0.1}
    assert gpu_options["num_gpus"] == 0.5
    local["proxy_location"] = "EveryNode"
    # Without the caption reward (make test: its two replicas load transformers), JPEG replicas fill its GPU share.
    n_caption = 2 if with_caption else 0
    caption_app = _app(
        caption, "caption", deployment={"num_replicas": 2, "ray_actor_options": gpu_options}, device="auto"
    )
    local["applications"] = [
        *([caption_app] if with_caption else []),
        # Weight-free: it runs on the CPU wherever it is placed (no torch import), a stand-in for a GPU reward.
        _app(
            jpeg,
            "jpeg_gpu",
            deployment={"num_replicas": 8 - n_caption, "ray_actor_options": gpu_options},
            device="cpu",
        ),
        _app(
            jpeg,
            "jpeg_cpu",
            deployment={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1, "resources": {"cpu_pool": 0.1}}},
            device="cpu",
        ),
    ]
    return local


def replicas(app: str) -> list[dict]:
    """Serve's replicas of an application's `reward` deployment: state, node id and IP, pid."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"].get(app)
    if details is None:
        return []
    return [dict(r) for r in details["deployments"]["reward"]["replicas"]]


def running(app: str) -> list[dict]:
    return [r for r in replicas(app) if r["state"] == "RUNNING"]


def wait_for(condition, timeout_s: float, what: str, period_s: float = 0.25) -> float:
    """Polls until `condition()` is true; returns when (time.monotonic()), or fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(period_s)
    return time.monotonic()


def deploy(config: dict, timeout_s: float = 240.0):
    from deploy.fleet import start_fleet

    return start_fleet(config, timeout_s=timeout_s)


def check_every_sample_answered(calls) -> None:
    """Every request came back with one result per sample, in order, or failed loudly; none was lost."""
    assert calls, "no request was made"
    for call in calls:
        if call.failure is None:
            assert call.result_ids == call.ids, f"client {call.client}: results {call.result_ids} for {call.ids}"
    answered = [i for c in calls if c.failure is None for i in c.result_ids]
    assert len(answered) == len(set(answered)), "a sample was answered twice"


@pytest.fixture(scope="module")
def placed(cluster, request):
    config = cluster_shaped_profile(free_port(), with_caption=request.config.getoption("cluster_full"))
    fleet = deploy(config)
    yield fleet, config


def test_replicas_pack_two_per_gpu_never_on_the_gpu_less_head(cluster, placed):
    import ray

    head_id = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    assert head_id == cluster.nodes[0].node_id
    gpu_replicas = running("caption") + running("jpeg_gpu")
    assert len(gpu_replicas) == 8
    per_node: dict[str, int] = {}
    for r in gpu_replicas:
        per_node[r["node_id"]] = per_node.get(r["node_id"], 0) + 1
    # 8 replicas of 0.5 GPU on 2 nodes of 2 GPUs: only two per GPU fits, 4 a node, none on the head.
    assert head_id not in per_node
    assert sorted(per_node.values()) == [4, 4]
    # The CPU-only replica asked for the head's custom resource and got it.
    assert [r["node_id"] for r in running("jpeg_cpu")] == [head_id]
    # Every GPU is taken: Ray's own accounting agrees.
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0)


def test_status_shows_replicas_per_node(cluster, placed):
    import json

    from typer.testing import CliRunner

    from deploy.cli import app

    fleet, _ = placed
    result = CliRunner().invoke(app, ["status", "--target", fleet.grpc_target, "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = {r["application"]: r for r in json.loads(result.output)}
    nodes = rows["jpeg_gpu"]["deployments"][0]["nodes"]
    worker_ips = {n.ip for n in cluster.nodes[1:]}
    assert set(nodes) <= worker_ips and sum(nodes.values()) == len(running("jpeg_gpu")) >= 6
    assert all(r["health"] == "ok" for r in rows.values())
    table = CliRunner().invoke(app, ["status", "--target", fleet.grpc_target])
    assert table.exit_code == 0
    line = next(x for x in table.output.splitlines() if x.startswith("jpeg_gpu"))
    for ip, n in nodes.items():
        assert f"{ip} x{n}" in line


@pytest.mark.cluster_full
def test_a_cuda_replica_without_cuda_fails_naming_device_auto(cluster, placed):
    from ray import serve

    _, config = placed
    broken = copy.deepcopy(next(a for a in config["applications"] if a["name"] == "jpeg_cpu"))
    broken.update(name="jpeg_cuda", route_prefix="/jpeg_cuda")
    broken["args"]["device"] = "cuda"
    broken["deployments"][0]["ray_actor_options"] = {"num_cpus": 0.1, "resources": {"cpu_pool": 0.1}}
    broken["deployments"][0]["max_constructor_retry_count"] = 1  # one failed start is enough to report it
    with pytest.raises(RuntimeError) as failed:
        deploy({**config, "applications": [*config["applications"], broken]}, timeout_s=120)
    message = str(failed.value)
    assert "jpeg_cuda" in message and "torch sees no CUDA device" in message and "device: auto" in message
    serve.delete("jpeg_cuda")
    # The others kept serving.
    assert len(running("jpeg_gpu")) >= 6


def test_every_nodes_proxy_answers(cluster, placed):
    """One proxy per node on the same port; many connections all get answers, and every node's proxy served some."""
    from ray.serve.context import _get_global_client

    fleet, _ = placed

    def proxies() -> dict:
        return _get_global_client().get_serve_details()["proxies"]

    assert {p["node_id"] for p in proxies().values()} == {n.node_id for n in cluster.nodes}
    # A node's proxy starts once the node runs a replica, so the workers' can still be starting.
    wait_for(lambda: all(p["status"] == "HEALTHY" for p in proxies().values()), 60, "every proxy healthy")
    # 24 clients with a connection each (as separate client machines have; channels of one process otherwise share
    # one): the kernel spreads the connections over the three proxies.
    load = Load(
        fleet.grpc_target,
        "jpeg_gpu",
        clients=24,
        samples_per_request=2,
        channel_options=[("grpc.use_local_subchannel_pool", 1)],
    )
    load.start()
    time.sleep(3)
    calls = load.stop()
    check_every_sample_answered(calls)
    assert all(c.failure is None for c in calls)
    served = _requests_per_proxy_node(cluster)
    assert all(served.get(n.ip, 0) > 0 for n in cluster.nodes), served


def _requests_per_proxy_node(cluster) -> dict[str, int]:
    """gRPC requests each node's proxy handled, from the proxy's access log on that node."""
    counts = {}
    for node in cluster.nodes:
        n = 0
        for log in node.temp_dir.glob("session_*/logs/serve/proxy_*.log"):
            lines = log.read_text(errors="replace").splitlines()
            n += sum("/reward.v1.RewardService/Score jpeg_gpu OK" in line for line in lines)
        counts[node.ip] = n
    return counts


def test_a_rolling_update_switches_fingerprints_once_and_fails_no_request(cluster, placed):
    """Redeploying with a changed config under load: every request answered, and by send time the responses' config
    fingerprint goes old -> new once (all old replicas leave the routers before any new one joins)."""
    fleet, config = placed
    app = next(a for a in config["applications"] if a["name"] == "jpeg_cpu")
    rolling = _app(
        app,
        "jpeg_rolling",
        deployment={
            "num_replicas": 2,
            "rolling_update_percentage": 1.0,
            "ray_actor_options": {"num_cpus": 0.1, "resources": {"cpu_pool": 0.1}},
        },
    )
    deploy({**config, "applications": [*config["applications"], rolling]})
    load = Load(fleet.grpc_target, "jpeg_rolling", clients=4, raw_stub=True).start()
    time.sleep(2)
    old = {r["replica_id"] for r in replicas("jpeg_rolling")}
    updated = copy.deepcopy(rolling)
    updated["args"]["reward_config"] = {"quality": 80}
    deploy({**config, "applications": [*config["applications"], updated]})
    wait_for(
        lambda: len(running("jpeg_rolling")) == 2 and not old & {r["replica_id"] for r in replicas("jpeg_rolling")},
        120,
        "the update finishing",
    )
    time.sleep(2)
    calls = sorted(load.stop(), key=lambda c: c.sent_s)
    assert [c.failure for c in calls if c.failure] == []
    check_every_sample_answered(calls)
    fingerprints = [c.fingerprint for c in calls]
    switches = sum(a != b for a, b in zip(fingerprints, fingerprints[1:], strict=False))
    assert len(set(fingerprints)) == 2 and switches == 1, _runs(fingerprints)


def _runs(values: list[str]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for v in values:
        if out and out[-1][0] == v[:8]:
            out[-1] = (v[:8], out[-1][1] + 1)
        else:
            out.append((v[:8], 1))
    return out


def _rss_mb(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 1e6
        except psutil.NoSuchProcess:
            pass
    return out


def _proxy_pids(cluster) -> list[int]:
    pids = []
    for node in cluster.nodes:
        for pid in node.pids():
            try:
                if "ProxyActor" in " ".join(psutil.Process(pid).cmdline()):
                    pids.append(pid)
            except psutil.Error:
                continue
    return pids


def test_overload_is_shed_with_resource_exhausted_and_memory_stays_bounded(cluster, placed, request):
    """4x the load a replica sustains: the excess is shed at the proxies' queues (RESOURCE_EXHAUSTED), the clients
    back off and retry, and the proxies' and replica's memory stays flat."""
    fleet, config = placed
    app = next(a for a in config["applications"] if a["name"] == "jpeg_cpu")
    # One batch of one at a time, a queue of 2 per proxy: 3 requests in flight are what it sustains.
    shed = _app(
        app,
        "jpeg_shed",
        deployment={
            "num_replicas": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 2,
            "ray_actor_options": {"num_cpus": 0.1, "resources": {"cpu_pool": 0.1}},
        },
        max_batch_size=1,
        batch_wait_timeout_s=0.02,
    )
    deploy({**config, "applications": [*config["applications"], shed]})
    hold_s = 60.0 if request.config.getoption("cluster_full") else 10.0
    pids = _proxy_pids(cluster) + [r["pid"] for r in running("jpeg_shed")]
    load = Load(fleet.grpc_target, "jpeg_shed", clients=12, samples_per_request=1, max_retries=3).start()
    time.sleep(5)  # warm-up: allocators and gRPC buffers settle
    before = _rss_mb(pids)
    samples = [before]
    end = time.monotonic() + hold_s
    while time.monotonic() < end:
        time.sleep(2)
        samples.append(_rss_mb(pids))
    calls = load.stop()
    check_every_sample_answered(calls)
    failures = [c.failure for c in calls if c.failure]
    assert set(failures) <= {"RESOURCE_EXHAUSTED"}, set(failures)
    assert load.retries > 0, "nothing was shed"
    assert sum(c.failure is None for c in calls) > len(calls) / 2
    for pid, start in before.items():
        peak = max(s.get(pid, start) for s in samples)
        assert peak - start < 40, f"pid {pid} grew from {start:.0f} MB to {peak:.0f} MB under overload"
    print(
        f"\noverload {hold_s:.0f}s: {len(calls)} calls, {len(failures)} shed for good, {load.retries} retries; "
        + ", ".join(f"{pid}: {before[pid]:.0f}->{samples[-1].get(pid, float('nan')):.0f} MB" for pid in before)
    )


def test_autoscaling_follows_a_load_ramp_up_and_back_down(cluster, placed, request):
    fleet, config = placed
    app = next(a for a in config["applications"] if a["name"] == "jpeg_cpu")
    scaled = _app(
        app,
        "jpeg_autoscale",
        deployment={
            "max_ongoing_requests": 8,
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 1,
                "downscale_delay_s": 4,
                "look_back_period_s": 2,
                "metrics_interval_s": 0.5,
            },
            "ray_actor_options": {"num_cpus": 0.1},
        },
        # Slower batches make requests overlap at the replica, which is what the autoscaler counts.
        batch_wait_timeout_s=0.05,
        max_batch_size=4,
    )
    deploy({**config, "applications": [*config["applications"], scaled]})
    ramps = 2 if request.config.getoption("cluster_full") else 1
    for ramp in range(ramps):
        assert len(running("jpeg_autoscale")) == 1
        load = Load(fleet.grpc_target, "jpeg_autoscale", clients=16, ramp_s=4.0).start()
        up_at = wait_for(lambda: len(running("jpeg_autoscale")) == 3, 90, "scaling up to 3 replicas")
        scale_up_s = up_at - load.started_s
        time.sleep(3)
        calls = load.stop()
        stopped_at = time.monotonic()
        down_at = wait_for(lambda: len(replicas("jpeg_autoscale")) == 1, 90, "scaling back down to 1 replica")
        check_every_sample_answered(calls)
        assert [c.failure for c in calls if c.failure] == []
        latencies = [c.latency_s for c in calls]
        print(
            f"\nramp {ramp + 1}: 1 -> 3 replicas {scale_up_s:.1f}s after the ramp began, back to 1 "
            f"{down_at - stopped_at:.1f}s after it ended; {len(calls)} calls, p99 {p99(latencies) * 1000:.0f} ms"
        )


def test_losing_a_worker_node_under_load_loses_no_sample(cluster, placed, request):
    """SIGKILL a GPU node's raylet (and its processes) while clients score: every request is answered within the
    client's retry budget, and Serve reschedules the lost replicas onto the remaining GPU node."""
    from ray import serve

    fleet, config = placed
    # Free the GPUs the placement test filled, so the survivors have room for the lost replicas.
    for name in ("jpeg_gpu", "caption"):
        if name in serve.status().applications:
            serve.delete(name)
    app = next(a for a in config["applications"] if a["name"] == "jpeg_gpu")
    survivor = _app(app, "jpeg_survivor", deployment=copy.deepcopy(app["deployments"][0]))
    survivor["deployments"][0]["num_replicas"] = 2
    deploy({**config, "applications": [survivor]})
    kills = 2 if request.config.getoption("cluster_full") else 1
    for kill in range(kills):
        victims = [n for n in cluster.nodes[1:] if n.process.poll() is None]
        on_node = {n.node_id: n for n in victims}
        victim = on_node[running("jpeg_survivor")[0]["node_id"]]
        load = Load(fleet.grpc_target, "jpeg_survivor", clients=8).start()
        time.sleep(3)
        killed_at = cluster.kill_node(victim)
        back_at = wait_for(
            lambda v=victim: (
                len(running("jpeg_survivor")) == 2 and all(r["node_id"] != v.node_id for r in running("jpeg_survivor"))
            ),
            120,
            "the lost replicas rescheduled on the remaining nodes",
        )
        time.sleep(2)
        calls = load.stop()
        check_every_sample_answered(calls)
        assert [c.failure for c in calls if c.failure] == []
        gap = max((c.latency_s for c in calls if c.sent_s >= killed_at - load.started_s - 1), default=0.0)
        print(
            f"\nnode kill {kill + 1}: {len(calls)} calls, none lost, {load.retries} retries; replicas back to 2 "
            f"{back_at - killed_at:.1f}s after the kill; slowest call around it {gap:.1f}s"
        )
        # A replacement machine joins (what a cluster's autoscaler or KubeRay does), for the next round.
        cluster.add_node(**GPU_NODE)

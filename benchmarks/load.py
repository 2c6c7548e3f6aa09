"""Load test (not a test): N concurrent clients for T seconds against one application, over loopback gRPC.

    .venv/bin/python benchmarks/load.py                        # caption, 1 and 2 replicas in one run
    .venv/bin/python benchmarks/load.py --app jpeg_compressibility --size 512 --batch 8
    .venv/bin/python benchmarks/load.py --target 127.0.0.1:9000 --app caption   # a fleet that is already running

Each client is an async `RewardClient` with its own channel, sending one request of `--batch` samples at a time,
back to back. Reported per case: samples/s and requests/s, p50/p99 request latency, failed requests by gRPC status
code and per-sample errors by code. Clients do not retry (`--max-retries 0`), so every failure is counted. With its
own fleet it also reports the cores each part used during the case (CPU time from psutil): the replicas, Serve's
proxy, the clients (this process) and the rest of the machine, which shows when other work competed for the cores.

Without `--target`, the script starts its own local fleet on free ports: the application of deploy/local.yaml once
per replica count in `--replicas` (as `<app>_x1`, `<app>_x2`, ...), each replica with `num_cpus: 1` and one torch
thread, and measures them one after the other. Idle replicas use next to no CPU, so each case has the machine. The
scaling ratio is the samples/s of the largest replica count over the smallest. An in-process baseline (the same
reward, one torch thread, batch 32) gives one replica's ceiling.

Default workload: the caption reward (tiny BLIP-2 + MiniLM) on 64x64 images, 8 clients x 16 samples. Its model
costs about 9 ms per sample while a 64x64 raw sample is 12 KB on the wire, so the replicas, not the client or
Serve's proxy, bound the throughput: that is what more replicas can speed up. The tiny BLIP-2 resizes every image to
32x32, so larger images would only add transport; 16 samples per request keep the per-request cost of the proxy
and the client (a few ms of CPU each) small, and 128 samples in flight fill both replicas' batches of 32. The JPEG
reward at 512x512 is the opposite case: its serving path costs more CPU than the reward (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from serving import make_images  # benchmarks/serving.py, next to this script

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet_config(app: str, replica_counts: list[int]) -> dict:
    """deploy/local.yaml reduced to `app`, once per replica count, on free ports; 1 CPU and 1 torch thread each."""
    from deploy.fleet import LOCAL_PROFILE, load_serve_config

    config = load_serve_config(LOCAL_PROFILE, grpc_port=free_port(), http_port=free_port())
    base = next(a for a in config["applications"] if a["name"] == app)
    base["args"]["torch_threads"] = 1
    apps = []
    for n in replica_counts:
        copied = copy.deepcopy(base)
        copied.update(name=f"{app}_x{n}", route_prefix=f"/{app}_x{n}")
        (deployment,) = copied["deployments"]
        deployment["num_replicas"] = n
        deployment.setdefault("ray_actor_options", {})["num_cpus"] = 1
        apps.append(copied)
    config["applications"] = apps
    return config


def serving_pids(app: str, grpc_port: int) -> dict[str, int]:
    """Label -> PID of each replica of `app` (from the Serve controller) and of the proxy (listening on the port)."""
    import psutil
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"]["reward"]["replicas"]
    pids = {f"replica{i}": r["pid"] for i, r in enumerate(sorted(replicas, key=lambda r: r["actor_name"]))}
    # The controller does not report proxy PIDs; the proxy is the process that listens on the gRPC port.
    (pids["proxy"],) = {
        c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == grpc_port
    }
    return pids


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of the processes so far (a process that is gone counts 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def cpu_snapshot(replica_pids: list[int], proxy_pid: int) -> dict[str, float]:
    """CPU seconds so far: the replicas, the proxy, this process (the clients), and the whole machine (busy time)."""
    import psutil

    machine = psutil.cpu_times()
    return {
        "replicas": cpu_seconds(replica_pids),
        "proxy": cpu_seconds([proxy_pid]),
        "clients": cpu_seconds([os.getpid()]),
        "machine": machine.user + machine.nice + machine.system + machine.irq + machine.softirq + machine.steal,
    }


def cores_used(before: dict[str, float], after: dict[str, float], elapsed: float) -> dict[str, float]:
    """Average cores each part used between two snapshots; "rest" is everything else on the machine (Ray's own
    processes and anyone else's work)."""
    used = {k: (after[k] - before[k]) / elapsed for k in before}
    used["rest"] = used.pop("machine") - used["replicas"] - used["proxy"] - used["clients"]
    return used


@dataclass
class Run:
    """What the clients of one measurement saw."""

    latencies: list[float] = field(default_factory=list)  # seconds per successful request
    samples: int = 0  # samples answered with a score
    sample_errors: Counter = field(default_factory=Counter)  # per-sample error code -> count
    request_errors: Counter = field(default_factory=Counter)  # gRPC status of failed requests -> count
    elapsed: float = 0.0


async def drive(target: str, app: str, samples, clients: int, seconds: float, max_retries: int) -> Run:
    """`clients` concurrent clients, each sending `samples` as one request, back to back, for `seconds`."""
    from services.client import RewardClient, RewardServiceError

    run = Run()
    pool = [
        RewardClient(target, app, max_samples_per_request=len(samples), max_in_flight=1, max_retries=max_retries)
        for _ in range(clients)
    ]
    await asyncio.gather(*(c.adescribe() for c in pool))  # connect before the clock starts
    stop = time.perf_counter() + seconds

    async def one_client(client):
        while time.perf_counter() < stop:
            start = time.perf_counter()
            try:
                results = await client.ascore_samples(samples)
            except RewardServiceError as e:
                run.request_errors[e.status] += 1
                continue
            run.latencies.append(time.perf_counter() - start)
            for r in results:
                if r.ok:
                    run.samples += 1
                else:
                    run.sample_errors[r.error_code] += 1

    begin = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in pool))
    run.elapsed = time.perf_counter() - begin
    await asyncio.gather(*(c.aclose() for c in pool))
    return run


def in_process_rate(app_args: dict, images, prompt: str, seconds: float) -> float:
    """Samples/s of the reward itself at batch 32, one torch thread: one replica's ceiling."""
    import torch

    from services.registry import build_reward

    torch.set_num_threads(1)
    reward = build_reward(app_args["reward"], app_args.get("reward_config"))
    reward.load("cpu")
    batch = (images * 32)[:32]
    reward.score(batch[:2], [prompt] * 2)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        reward.score(batch, [prompt] * 32)
        n += 32
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="caption", help="application of deploy/local.yaml (or of --target's fleet)")
    parser.add_argument("--target", default=None, help="host:port of a running fleet; default: start one")
    parser.add_argument("--replicas", default="1,2", help="replica counts to compare (own fleet only)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--batch", type=int, default=16, help="samples per request")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (raw transport)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each measurement")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="load before each measurement, not counted")
    parser.add_argument("--max-retries", type=int, default=0, help="client retries (0: count every failure)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process baseline")
    args = parser.parse_args()

    from deploy.fleet import start_fleet, stop_fleet
    from services.client import make_sample

    prompt = "a red disc in a blue sky"
    images = make_images(args.batch, args.size)
    samples = [make_sample(str(i), prompt, image) for i, image in enumerate(images)]
    load_before = os.getloadavg()

    if args.target is not None:
        cases = [(args.app, None)]
        target, config = args.target, None
    else:
        counts = [int(n) for n in args.replicas.split(",")]
        config = fleet_config(args.app, counts)
        cases = [(f"{args.app}_x{n}", n) for n in counts]
    baseline = None
    if config is not None and not args.no_baseline:
        baseline = in_process_rate(config["applications"][0]["args"], images, prompt, seconds=5.0)

    rows = []  # (application, replicas, Run, cores used by each part or None)
    started = False
    try:
        if config is not None:
            # Enough logical CPUs for every replica of every case (they are deployed together, used one at a time).
            fleet = start_fleet(config, num_cpus=sum(n for _, n in cases) + 1)
            target, started = fleet.grpc_target, True
        for app, replicas in cases:
            asyncio.run(drive(target, app, samples, args.clients, args.warmup_s, args.max_retries))
            pids = serving_pids(app, int(target.rsplit(":", 1)[1])) if started else None
            if pids:
                before = cpu_snapshot([v for k, v in pids.items() if k != "proxy"], pids["proxy"])
            run = asyncio.run(drive(target, app, samples, args.clients, args.seconds, args.max_retries))
            cores = None
            if pids:
                after = cpu_snapshot([v for k, v in pids.items() if k != "proxy"], pids["proxy"])
                cores = cores_used(before, after, run.elapsed)
            rows.append((app, replicas, run, cores))
    finally:
        if started:
            stop_fleet()

    print(
        f"\n{args.app}: {args.clients} clients x {args.batch} samples per request, {args.size}x{args.size} raw, "
        f"{args.seconds:.0f}s per case, {os.cpu_count()} cores; load average before start {load_before[0]:.2f}"
    )
    if baseline is not None:
        print(f"in-process reward, 1 torch thread, batch 32: {baseline:.1f} samples/s (one replica's ceiling)")
    print(
        f"{'application':<24} {'replicas':>8} {'samples/s':>10} {'requests/s':>10} {'p50 ms':>8} {'p99 ms':>8}  "
        f"{'cores: replicas proxy clients rest':<35}  errors"
    )
    for app, replicas, run, cores in rows:
        lat = np.array(run.latencies) * 1000.0 if run.latencies else np.array([np.nan])
        errors = {**run.request_errors, **{f"sample:{k}": v for k, v in run.sample_errors.items()}}
        used = "{replicas:>15.2f} {proxy:>5.2f} {clients:>7.2f} {rest:>4.2f}".format(**cores) if cores else "-"
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        print(
            f"{app:<24} {replicas if replicas else '-':>8} {run.samples / run.elapsed:>10.1f} "
            f"{len(run.latencies) / run.elapsed:>10.1f} {p50:>8.1f} {p99:>8.1f}  {used:<35}  {errors or 'none'}"
        )
    if len(rows) > 1:
        (_, low, first, _), (_, high, last, _) = rows[0], rows[-1]
        ratio = (last.samples / last.elapsed) / (first.samples / first.elapsed)
        print(f"\nscaling {low} -> {high} replicas: {ratio:.2f}x samples/s")
    print("\"rest\": every other process on the machine, Ray's own (GCS, raylet, Serve controller) and other users'.")


if __name__ == "__main__":
    main()

"""Multi-node soak (not a test): minutes of scoring on a 3-node cluster with a replica killed every 2 minutes.

    .venv/bin/python benchmarks/soak_cluster.py --minutes 10                  # the recorded run
    .venv/bin/python benchmarks/soak_cluster.py --minutes 3 --kill-every-s 60

Starts a loopback cluster (deploy/local_cluster.py): a GPU-less head and two workers with 2 logical GPUs each.
Serves the JPEG reward with `--replicas` replicas of 0.5 GPU (so they land on the workers) behind a proxy on every
node, and keeps `--clients` async clients scoring back to back, each with its own connection and the client's
default retry budget. Every `--kill-every-s` seconds one replica is killed (`ray.kill`, as a crash or OOM would),
round robin over the workers; Serve starts a replacement.

Every `--interval-s` seconds it reads the RSS of each proxy, of the Serve controller and of each live replica.
Summary: samples scored, requests that failed after their retries and per-sample errors (by code), and per process
the RSS after the warm-up, at the end and the growth rate (least squares, MB/hour); a replica that was killed or
started during the run is listed with how long it lived instead.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import time
from collections import Counter

import numpy as np
from load import make_images
from soak import growth, rss_mb

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serving_processes(app: str) -> dict[str, int]:
    """Label -> PID of each running replica (by replica id)."""
    return {f"replica {r['replica_id']}": r["pid"] for r in _replica_details(app) if r["state"] == "RUNNING"}


def infrastructure_pids(cluster) -> dict[str, int]:
    """The proxies (one per node) and the Serve controller, found by their process titles among the nodes'."""
    import psutil

    out = {}
    for node in cluster.nodes:
        for pid in node.pids():
            try:
                title = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::ProxyActor"):
                out[f"proxy {node.ip}"] = pid
            elif title.startswith("ray::ServeController"):
                out["controller"] = pid
    return out


async def soak(cluster, target: str, app: str, args) -> None:
    import ray

    from services.client import RewardClient, RewardServiceError

    images = make_images(args.batch, args.size)
    prompts = ["a red disc in a blue sky"] * args.batch
    scored = 0
    failed: Counter = Counter()
    stop = time.perf_counter() + args.minutes * 60.0

    async def one_client(index: int):
        nonlocal scored
        # Own connection: clients spread over the nodes' proxies as separate machines would.
        client = RewardClient(target, app, channel_options=[("grpc.use_local_subchannel_pool", 1)])
        seq = 0
        while time.perf_counter() < stop:
            ids = [f"{index}-{seq}-{k}" for k in range(args.batch)]
            seq += 1
            try:
                results = await client.ascore(images, prompts, ids=ids)
            except RewardServiceError as e:
                failed[e.status] += 1
                continue
            assert [r.id for r in results] == ids
            scored += sum(r.ok for r in results)
            failed.update(f"sample:{r.error_code}" for r in results if not r.ok)
        await client.aclose()

    infra = infrastructure_pids(cluster)
    first_seen: dict[str, float] = {}
    last_seen: dict[str, float] = {}
    series: dict[str, list[tuple[float, float]]] = {}
    kills: list[str] = []

    async def monitor():
        start = time.perf_counter()
        next_kill = start + args.kill_every_s
        last_scored, last_t = 0, start
        while time.perf_counter() < stop:
            await asyncio.sleep(min(args.interval_s, max(0.0, stop - time.perf_counter())))
            now = time.perf_counter()
            t = now - start
            replicas = await asyncio.to_thread(serving_processes, app)
            # Proxies start on a node once it runs a replica: look again each time.
            infra.update(await asyncio.to_thread(infrastructure_pids, cluster))
            memory = rss_mb({**infra, **replicas})
            for label, mb in memory.items():
                if not np.isnan(mb):
                    first_seen.setdefault(label, t)
                    last_seen[label] = t
                    series.setdefault(label, []).append((t, mb))
            rate = (scored - last_scored) / (now - last_t)
            last_scored, last_t = scored, now
            infra_mb = " ".join(f"{k}={memory[k]:.0f}" for k in infra)
            print(f"{t:>6.0f}s {rate:>8.1f} samples/s  {len(replicas)} replicas  {infra_mb} MB", flush=True)
            if now >= next_kill and now < stop - 10:
                next_kill += args.kill_every_s
                victim = sorted(replicas)[len(kills) % len(replicas)]
                actor = next(
                    a["actor_name"]
                    for a in (await asyncio.to_thread(_replica_details, app))
                    if f"replica {a['replica_id']}" == victim
                )
                ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
                kills.append(victim)
                print(f"{t:>6.0f}s killed {victim}", flush=True)

    await asyncio.gather(monitor(), *(one_client(i) for i in range(args.clients)))

    end = args.minutes * 60.0
    print(
        f"\n{app}: {args.replicas} replicas on 2 worker nodes, a proxy on each of 3 nodes, {args.clients} clients x "
        f"{args.batch} samples of {args.size}x{args.size}, {args.minutes:g} min, a replica killed every "
        f"{args.kill_every_s:g}s ({len(kills)} kills), {os.cpu_count()} cores"
    )
    print(f"samples scored: {scored}; failures: {dict(failed) or 'none'}")
    print(f"{'process':<28} {'RSS after warm-up':>18} {'RSS at end':>11} {'MB/hour':>9}")
    for label, points in sorted(series.items()):
        after = [(t, mb) for t, mb in points if t >= args.warmup_s]
        lived = f"lived {first_seen[label]:.0f}-{last_seen[label]:.0f}s"
        if label.startswith("replica") and (first_seen[label] > args.interval_s * 1.5 or last_seen[label] < end - 15):
            print(f"{label:<28} {lived} ({'killed' if label in kills else 'started during the run'})")
            continue
        if len(after) < 6:
            print(f"{label:<28} too few samples ({lived})")
            continue
        per_hour, _ = growth([t for t, _ in after], [mb for _, mb in after])
        print(f"{label:<28} {after[0][1]:>15.1f} MB {after[-1][1]:>8.1f} MB {per_hour:>9.1f}")


def _replica_details(app: str) -> list[dict]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return details["applications"][app]["deployments"]["reward"]["replicas"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every-s", type=float, default=120.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="samples per request")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    args = parser.parse_args()

    import ray
    from load import free_port

    from deploy.fleet import LOCAL_PROFILE, load_serve_config, start_fleet
    from deploy.local_cluster import CLUSTER_ENV, LoopbackCluster

    os.environ.update(CLUSTER_ENV)
    config = load_serve_config(LOCAL_PROFILE, grpc_port=free_port(), http_port=free_port())
    jpeg = copy.deepcopy(next(a for a in config["applications"] if a["name"] == "jpeg_compressibility"))
    jpeg["deployments"][0].update(num_replicas=args.replicas, ray_actor_options={"num_cpus": 0.5, "num_gpus": 0.5})
    config.update(proxy_location="EveryNode", applications=[jpeg])
    with LoopbackCluster() as cluster:
        cluster.add_node(num_cpus=4)
        cluster.add_node(num_cpus=4, num_gpus=2)
        cluster.add_node(num_cpus=4, num_gpus=2)
        ray.init(address=cluster.address, log_to_driver=False)
        fleet = start_fleet(config)
        try:
            asyncio.run(soak(cluster, fleet.grpc_target, "jpeg_compressibility", args))
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()

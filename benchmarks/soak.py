"""Soak test (not a test): scores continuously for minutes and tracks the memory of the serving processes.

    .venv/bin/python benchmarks/soak.py --minutes 10            # the full run
    .venv/bin/python benchmarks/soak.py --minutes 3 --app caption

Starts its own local fleet on free ports (one application of deploy/local.yaml, `--replicas` replicas, num_cpus 1
and one torch thread each, as benchmarks/load.py) and keeps `--clients` async clients scoring back to back. Every
`--interval-s` seconds it reads the resident memory (RSS, via psutil) of each replica process (PIDs from the Serve
controller) and of Serve's proxy (the process listening on the gRPC port), and prints one row: samples/s over the
interval, RSS per process.

Summary: per process, RSS after the warm-up and at the end, and the growth rate from a least-squares line through
every sample after the warm-up (MB/hour and %/hour of the post-warm-up RSS), and through the second half of them
alone (a leak keeps its rate, warm-up slows down); throughput in the first and last minute; failed requests by
status code. Allocators and caches grow during the first requests, so the first `--warmup-s` seconds are left out
of the fit. A replica that restarts (new PID) is reported, and its growth is not.

Default workload: the JPEG reward on 128x128 images, 8 per request. It is cheap, so requests are many (about 90 per
second on 2 cores): a per-request leak in the gRPC path, the proxy or the replica shows up within minutes.
`--app caption` soaks the model path instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import Counter

import numpy as np
from load import fleet_config, make_images, serving_pids

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    """RSS in MB of each process; NaN for one that is gone."""
    import psutil

    out = {}
    for label, pid in pids.items():
        try:
            out[label] = psutil.Process(pid).memory_info().rss / 1e6
        except psutil.NoSuchProcess:
            out[label] = float("nan")
    return out


def growth(times_s: list[float], values: list[float]) -> tuple[float, float]:
    """(MB/hour, %/hour): the slope of a least-squares line through the samples, and relative to its first value."""
    slope_per_s = np.polyfit(np.array(times_s), np.array(values), 1)[0]
    per_hour = slope_per_s * 3600.0
    return per_hour, 100.0 * per_hour / values[0]


async def soak(target: str, app: str, samples, args) -> None:
    from services.client import RewardClient, RewardServiceError

    grpc_port = int(target.rsplit(":", 1)[1])
    pids = serving_pids(app, grpc_port)
    labels = list(pids)
    scored = 0
    failed: Counter = Counter()
    stop = time.perf_counter() + args.minutes * 60.0

    async def one_client():
        nonlocal scored
        client = RewardClient(target, app, max_samples_per_request=len(samples), max_in_flight=1, max_retries=0)
        while time.perf_counter() < stop:
            try:
                results = await client.ascore_samples(samples)
            except RewardServiceError as e:
                failed[e.status] += 1
                continue
            scored += sum(r.ok for r in results)
            failed.update(f"sample:{r.error_code}" for r in results if not r.ok)
        await client.aclose()

    rows: list[tuple[float, float, dict[str, float]]] = []  # (elapsed s, samples/s in the interval, RSS MB)

    async def sample_memory():
        start = last_t = time.perf_counter()
        last_scored = 0
        print(f"{'t s':>6} {'samples/s':>10} " + " ".join(f"{label + ' MB':>12}" for label in labels), flush=True)
        while time.perf_counter() < stop:
            await asyncio.sleep(min(args.interval_s, max(0.0, stop - time.perf_counter())))
            now = time.perf_counter()
            rate = (scored - last_scored) / (now - last_t)
            memory = rss_mb(pids)
            rows.append((now - start, rate, memory))
            last_t, last_scored = now, scored
            print(f"{now - start:>6.0f} {rate:>10.1f} " + " ".join(f"{memory[k]:>12.1f}" for k in labels), flush=True)

    await asyncio.gather(sample_memory(), *(one_client() for _ in range(args.clients)))

    replaced = {label for label, pid in serving_pids(app, grpc_port).items() if pids.get(label) != pid}
    after = [(t, rate, m) for t, rate, m in rows if t >= args.warmup_s]
    print(
        f"\n{app}: {args.replicas} replica(s), {args.clients} clients x {len(samples)} samples per request, "
        f"{args.size}x{args.size} raw, {args.minutes:g} min, RSS every {args.interval_s:g}s, "
        f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.2f}"
    )
    header = ("process", "RSS after warm-up", "RSS at end", "growth MB", "MB/hour", "%/hour", "MB/hour, 2nd half")
    print("{:<10} {:>18} {:>11} {:>10} {:>9} {:>7} {:>18}".format(*header))
    for label in labels:
        times = [t for t, _, m in after if not np.isnan(m[label])]
        values = [m[label] for _, _, m in after if not np.isnan(m[label])]
        if label in replaced or len(values) < 6:
            print(f"{label:<10} {'restarted during the run' if label in replaced else 'too few samples'}")
            continue
        per_hour, percent = growth(times, values)
        # A leak grows at a steady rate; allocator and cache warm-up slows down. Compare with the second half alone.
        half = len(values) // 2
        late_per_hour, _ = growth(times[half:], values[half:])
        print(
            f"{label:<10} {values[0]:>15.1f} MB {values[-1]:>8.1f} MB {values[-1] - values[0]:>10.1f} "
            f"{per_hour:>9.1f} {percent:>7.2f} {late_per_hour:>18.1f}"
        )
    first = [rate for t, rate, _ in rows if t <= 60.0]
    last = [rate for t, rate, _ in rows if t >= rows[-1][0] - 60.0]
    print(
        f"throughput: first minute {np.mean(first):.1f} samples/s, last minute {np.mean(last):.1f} samples/s; "
        f"{scored} samples scored; failures: {dict(failed) or 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to score")
    parser.add_argument("--app", default="jpeg_compressibility", help="application of deploy/local.yaml")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--batch", type=int, default=8, help="samples per request")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (raw transport)")
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="left out of the growth fit")
    args = parser.parse_args()

    from deploy.fleet import start_fleet, stop_fleet
    from services.client import make_sample

    images = make_images(args.batch, args.size)
    samples = [make_sample(str(i), "a red disc in a blue sky", image) for i, image in enumerate(images)]
    config = fleet_config(args.app, [args.replicas])
    fleet = start_fleet(config, num_cpus=args.replicas + 1)
    try:
        asyncio.run(soak(fleet.grpc_target, fleet.applications[0], samples, args))
    finally:
        stop_fleet()


if __name__ == "__main__":
    main()

"""Serving benchmark (not a test): the cost of serving a reward over gRPC, and the gain of batching, in one run.

    make bench            # or: .venv/bin/python benchmarks/serving.py --size 512 --seconds 10

Measures, side by side on the same machine and images:
1. in-process `reward.score` on batches of 32 vs the same batches served over gRPC (1 and 4 requests in flight);
2. 64 concurrent single-sample clients against the reward with cross-request batching vs batching disabled;
3. raw vs PNG transport at batch 32 (PNG encoding on the client included).
Reward: jpeg_compressibility (weight-free, so this measures the serving path, not a model).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import time

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Natural-ish images: smooth colour fields, a few discs, mild noise (JPEG cost like real samples)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        img = np.stack([np.sin(x * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)], axis=-1) * 0.3 + 0.5
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 1, 3)
        img += rng.normal(0, 0.02, img.shape)
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return images


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0


def run_for(seconds: float, fn) -> tuple[int, list[float], float]:
    """Calls fn() repeatedly for `seconds`; returns (calls, latencies, elapsed)."""
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    return len(latencies), latencies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--clients", type=int, default=64, help="concurrent single-sample clients")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()

    from deploy.fleet import LOCAL_PROFILE, load_serve_config, start_fleet, stop_fleet
    from services.client import RewardClient
    from services.registry import build_reward

    images = make_images(64, args.size)
    batch = images[:32]
    prompts = ["a red disc in a blue sky"] * 32
    rows: list[tuple[str, float, str, str]] = []  # (case, images/s, p50 ms, p99 ms)

    # 1a. In-process.
    reward = build_reward("jpeg_compressibility")
    reward.load("cpu")
    calls, lat, elapsed = run_for(args.seconds, lambda: reward.score(batch, prompts))
    in_process = calls * 32 / elapsed
    rows.append(("in-process, batch 32", in_process, f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}"))

    # The local profile's reward (batched) plus the same reward with batching disabled.
    config = load_serve_config(LOCAL_PROFILE)
    base = next(a for a in config["applications"] if a["name"] == "jpeg_compressibility")
    unbatched = copy.deepcopy(base)
    unbatched.update(name="jpeg_unbatched", route_prefix="/jpeg_unbatched")
    unbatched["args"]["max_batch_size"] = 1
    config["applications"] = [base, unbatched]
    fleet = start_fleet(config, num_cpus=args.num_cpus)
    try:
        # 1b. Served, batch 32: one request at a time (latency), then 4 in flight (throughput).
        client = RewardClient(fleet.grpc_target, "jpeg_compressibility", max_samples_per_request=32, max_in_flight=4)
        client.score(batch, prompts)  # warm-up
        calls, lat, elapsed = run_for(args.seconds, lambda: client.score(batch, prompts))
        p50, p99 = f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}"
        rows.append(("served, batch 32, 1 in flight", calls * 32 / elapsed, p50, p99))
        # 4 requests of 32 per call; client-side preparation counted, as in the 1-in-flight case.
        calls, lat, elapsed = run_for(args.seconds, lambda: client.score(images[:32] * 4, prompts * 4))
        served4 = calls * 128 / elapsed
        rows.append(("served, batch 32, 4 in flight", served4, "-", "-"))

        # 3. PNG transport (client-side encoding counted), 4 in flight.
        png_client = RewardClient(
            fleet.grpc_target, "jpeg_compressibility", max_samples_per_request=32, max_in_flight=4, image_format="png"
        )
        calls, lat, elapsed = run_for(args.seconds, lambda: png_client.score(images[:32] * 4, prompts * 4))
        rows.append(("served, batch 32, 4 in flight, PNG transport", calls * 128 / elapsed, "-", "-"))

        # 2. Many concurrent single-sample clients: batched vs unbatched.
        def concurrent(app: str) -> tuple[float, list[float]]:
            async def go():
                client = RewardClient(fleet.grpc_target, app, max_samples_per_request=1)
                samples = client.make_samples(images[: args.clients], prompts[:1] * args.clients)
                await client.ascore_samples(samples[:1])  # warm-up and limit discovery
                latencies: list[float] = []
                stop = time.perf_counter() + args.seconds

                async def one_client(sample):
                    while time.perf_counter() < stop:
                        t = time.perf_counter()
                        await client.ascore_samples([sample])
                        latencies.append(time.perf_counter() - t)

                start = time.perf_counter()
                await asyncio.gather(*(one_client(s) for s in samples))
                elapsed = time.perf_counter() - start
                await client.aclose()
                return len(latencies) / elapsed, latencies

            return asyncio.run(go())

        for app, label in [("jpeg_compressibility", "batched (max 32)"), ("jpeg_unbatched", "batching disabled")]:
            rate, lat = concurrent(app)
            rows.append(
                (f"{args.clients} single-sample clients, {label}", rate, f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}")
            )
    finally:
        stop_fleet()

    by_case = {case: rate for case, rate, _, _ in rows}
    print(f"\njpeg_compressibility, {args.size}x{args.size} images, {os.cpu_count()} cores, {args.seconds:.0f}s each")
    print(f"{'case':<52} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for case, rate, p50, p99 in rows:
        print(f"{case:<52} {rate:>9.1f} {p50:>8} {p99:>8}")
    batched = by_case[f"{args.clients} single-sample clients, batched (max 32)"]
    unbatched_rate = by_case[f"{args.clients} single-sample clients, batching disabled"]
    print(f"\nserved (4 in flight) / in-process at batch 32: {served4 / in_process:.2f}x   (goal >= 0.9)")
    print(
        f"batched / unbatched, {args.clients} concurrent single-sample clients: {batched / unbatched_rate:.2f}x"
        "   (goal >= 4)"
    )
    print(f"PNG / raw transport: {by_case['served, batch 32, 4 in flight, PNG transport'] / served4:.2f}x")


if __name__ == "__main__":
    main()

"""Serving benchmark (not a test): the cost of serving a reward over gRPC, and the gain of batching, in one run.

    make bench            # or: .venv/bin/python benchmarks/serving.py --app caption --size 256 --seconds 10

Measures one application of the local profile, side by side on the same machine and images:
1. in-process `reward.score` at batch 1 and 32 vs the same served over gRPC (1 and 4 requests in flight);
2. raw vs PNG transport at batch 32 (PNG encoding on the client included);
3. 64 concurrent single-sample clients with cross-request batching vs batching disabled.
The in-process reward and the replica each get one torch thread. `--direct-ingress` serves through Serve's direct
ingress instead of its proxy; `--resize-to-input` has every served client resize to the reward's declared input;
`--shared-memory` has the raw clients pass pixels in shared memory (services/shared_memory.py).
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


# Serve's direct ingress gives each replica its own gRPC port, from the first of its range up.
DIRECT_PORT = 40000


def direct_targets(apps: list[str], timeout_s: float = 60) -> dict[str, str]:
    """{application: 127.0.0.1:<its replica's direct-ingress port>} for one-replica applications. A replica answers
    only calls to its own application (NOT_FOUND for another), so each port is asked for each application not yet
    found. A replica opens its port a moment after Serve reports it running: this retries for up to `timeout_s`."""
    from services.client import RewardClient, RewardServiceError

    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for port in range(DIRECT_PORT, DIRECT_PORT + len(apps)):
            for app in [a for a in apps if a not in found]:
                try:
                    RewardClient(f"127.0.0.1:{port}", app, timeout_s=2).describe()
                except RewardServiceError:
                    continue
                found[app] = f"127.0.0.1:{port}"
        if len(found) == len(apps):
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"direct ingress: found {found} of {apps} on ports {DIRECT_PORT} and up")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", default="jpeg_compressibility", help="application of deploy/local.yaml to measure")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--clients", type=int, default=64, help="concurrent single-sample clients")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--batch-wait-s", type=float, default=None, help="override the app's batch_wait_timeout_s")
    parser.add_argument(
        "--resize-to-input",
        action="store_true",
        help="every served client resizes raw images to the input resolution the reward declares in Describe",
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="the raw clients pass pixels in shared memory (RewardClient(shared_memory=True); same host)",
    )
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1): each replica serves gRPC on its own port "
        f"from {DIRECT_PORT} up and the clients call it there, not through Serve's proxy",
    )
    args = parser.parse_args()

    import torch

    from deploy.fleet import LOCAL_PROFILE, load_serve_config, start_fleet, stop_fleet
    from services.client import RewardClient
    from services.registry import build_reward
    from trainer.local_models.artifacts import build_local_artifacts

    # The profile's application, plus the same one with batching disabled; nothing else competes for the cores.
    config = load_serve_config(LOCAL_PROFILE)
    base = next(a for a in config["applications"] if a["name"] == args.app)
    base["args"]["torch_threads"] = 1  # one torch thread on each side of the comparison
    if args.batch_wait_s is not None:
        base["args"]["batch_wait_timeout_s"] = args.batch_wait_s
    unbatched = copy.deepcopy(base)
    unbatched.update(name=f"{args.app}_unbatched", route_prefix=f"/{args.app}_unbatched")
    unbatched["args"]["max_batch_size"] = 1
    config["applications"] = [base, unbatched]

    images = make_images(64, args.size)
    batch = images[:32]
    prompts = ["a red disc in a blue sky"] * 32
    rows: list[tuple[str, float, str, str]] = []  # (case, images/s, p50 ms, p99 ms)

    def measure(case: str, n_images: int, fn) -> float:
        calls, lat, elapsed = run_for(args.seconds, fn)
        rate = calls * n_images / elapsed
        rows.append((case, rate, f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}"))
        return rate

    # 1. In-process, the same reward and config as served (the local profile's models: `rewardfleet build-local`).
    build_local_artifacts(alignment=args.app == "alignment")
    torch.set_num_threads(1)
    reward = build_reward(base["args"]["reward"], base["args"].get("reward_config"))
    reward.load("cpu")
    reward.score(batch[:2], prompts[:2])  # warm-up
    measure("in-process, batch 1", 1, lambda: reward.score(batch[:1], prompts[:1]))
    in_process = measure("in-process, batch 32", 32, lambda: reward.score(batch, prompts))
    reward = None  # free its memory before the replicas load the same models

    if args.direct_ingress:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # read by the Ray cluster start_fleet starts
    fleet = start_fleet(config, num_cpus=args.num_cpus)
    try:
        targets = {a["name"]: fleet.grpc_target for a in config["applications"]}
        if args.direct_ingress:
            targets = direct_targets(list(targets))
        # 2. Served: batch 1 and 32 with one request in flight (latency), 32 with 4 in flight (throughput).
        resize = {"resize_to_input": args.resize_to_input}
        raw = {**resize, "shared_memory": args.shared_memory}
        client = RewardClient(targets[args.app], args.app, max_samples_per_request=32, max_in_flight=4, **raw)
        client.score(batch, prompts)  # warm-up
        measure("served, batch 1, 1 in flight", 1, lambda: client.score(batch[:1], prompts[:1]))
        measure("served, batch 32, 1 in flight", 32, lambda: client.score(batch, prompts))
        served4 = measure("served, batch 32, 4 in flight", 128, lambda: client.score(images[:32] * 4, prompts * 4))

        # 3. PNG transport (client-side encoding counted), 4 in flight.
        png_client = RewardClient(
            targets[args.app], args.app, max_samples_per_request=32, max_in_flight=4, image_format="png", **resize
        )
        png = measure(
            "served, batch 32, 4 in flight, PNG", 128, lambda: png_client.score(images[:32] * 4, prompts * 4)
        )

        # 4. Many concurrent single-sample clients: cross-request batching vs batching disabled.
        def concurrent(app: str) -> tuple[float, list[float]]:
            async def go():
                client = RewardClient(targets[app], app, max_samples_per_request=1, **raw)
                await client.ascore(images[:1], prompts[:1])  # warm-up; Describe: limits, resolution, host
                samples = client.frame_samples(images[: args.clients], prompts[:1] * args.clients)
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

        rates = {}
        for app, label in [(args.app, "batched (max 32)"), (f"{args.app}_unbatched", "batching disabled")]:
            rate, lat = concurrent(app)
            rates[label] = rate
            rows.append(
                (f"{args.clients} single-sample clients, {label}", rate, f"{pct(lat, 50):.1f}", f"{pct(lat, 99):.1f}")
            )
    finally:
        stop_fleet()

    resized = ""
    if args.resize_to_input:
        declared = client.input_resolution  # None: the reward declares none, or the client's versions differ
        resized = f", client resizes to {declared.target_size(args.size, args.size) if declared else 'nothing'}"
    ingress = ", direct ingress" if args.direct_ingress else ""
    print(
        f"\n{args.app}, {args.size}x{args.size} images, {os.cpu_count()} cores, {args.seconds:.0f}s each"
        f"{resized}{ingress}"
    )
    print(f"{'case':<52} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for case, rate, p50, p99 in rows:
        print(f"{case:<52} {rate:>9.1f} {p50:>8} {p99:>8}")
    print(f"\nserved (4 in flight) / in-process at batch 32: {served4 / in_process:.2f}x   (goal >= 0.9)")
    batching = rates["batched (max 32)"] / rates["batching disabled"]
    print(f"batched / unbatched, {args.clients} concurrent single-sample clients: {batching:.2f}x   (goal >= 4)")
    print(f"PNG / raw transport: {png / served4:.2f}x")


if __name__ == "__main__":
    main()

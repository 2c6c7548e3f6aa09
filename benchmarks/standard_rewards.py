"""Standard rewards benchmark (not a test): images/s of clip_score, aesthetic, pickscore, hpsv2 and image_reward on
the local profile's tiny models, in-process and served over gRPC at batch 32, side by side in one run.

    .venv/bin/python benchmarks/standard_rewards.py --size 512 --seconds 8

For each reward: in-process `reward.score` on batches of 32 (one torch thread), then the same application of
deploy/local.yaml served alone (one replica, one torch thread) with batches of 32 raw images and 4 requests in
flight. The tiny models are a few thousand parameters, so at 512 px the figures are mostly image preprocessing
(resize to the model's input) and transport: what a fast GPU model would leave of the serving path.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.serving import make_images, pct, run_for  # noqa: E402

STANDARD = ["clip_score", "aesthetic", "pickscore", "hpsv2", "image_reward"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--rewards", nargs="+", default=STANDARD, choices=STANDARD)
    args = parser.parse_args()

    import torch

    from deploy.fleet import LOCAL_PROFILE, load_serve_config, start_fleet, stop_fleet
    from services.client import RewardClient
    from services.registry import build_reward
    from trainer.local_models.artifacts import build_local_artifacts

    build_local_artifacts(alignment=False)
    torch.set_num_threads(1)
    config = load_serve_config(LOCAL_PROFILE)
    images = make_images(32, args.size)
    prompts = [f"{n} red discs in a blue sky" for n in ("one", "two", "three", "four")] * 8
    rows = []  # (reward, case, images/s, p50 ms, p99 ms)
    for name in args.rewards:
        (app,) = [a for a in config["applications"] if a["name"] == name]
        app["args"]["torch_threads"] = 1

        # 1. In-process.
        reward = build_reward(name, app["args"]["reward_config"])
        reward.load("cpu")
        reward.score(images[:2], prompts[:2])  # warm-up
        calls, lat, elapsed = run_for(args.seconds, lambda r=reward: r.score(images, prompts))
        rows.append((name, "in-process, batch 32", calls * 32 / elapsed, pct(lat, 50), pct(lat, 99)))
        del reward

        # 2. Served alone: batch 32, 4 requests in flight.
        fleet = start_fleet({**config, "applications": [app]}, num_cpus=2)
        try:
            client = RewardClient(fleet.grpc_target, name, max_samples_per_request=32, max_in_flight=4)
            client.score(images, prompts)  # warm-up
            calls, lat, elapsed = run_for(args.seconds, lambda c=client: c.score(images * 4, prompts * 4))
            rows.append((name, "served, batch 32, 4 in flight", calls * 128 / elapsed, pct(lat, 50), pct(lat, 99)))
            client.close()
        finally:
            stop_fleet()

    print(f"\nstandard rewards on the tiny models, {args.size}x{args.size} images, {os.cpu_count()} cores")
    print(f"{'reward':<13} {'case':<32} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'served/in-process':>18}")
    for i, (name, case, rate, p50, p99) in enumerate(rows):
        ratio = f"{rate / rows[i - 1][2]:.2f}x" if case.startswith("served") else ""
        print(f"{name:<13} {case:<32} {rate:>9.1f} {p50:>8.1f} {p99:>8.1f} {ratio:>18}")


if __name__ == "__main__":
    main()

"""`make demo`: start the local fleet, score example images over gRPC, run a short fine-tuning job, shut down.

Example images are generated (seeded) into demo_out/images: flat, gradients, shapes, noise, plus one corrupt file
to show that a bad image gets its own error while the others are scored. Then 3 rounds of RAFT fine-tune the tiny
Stable Diffusion pipeline against the fleet's jpeg_compressibility reward (trainer/configs/local.yaml).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from services.codec import encode_image

OUT = Path("demo_out")


def make_example_images(folder: Path, seed: int = 0) -> list[Path]:
    """Writes a few seeded images of increasing visual complexity (and one corrupt PNG); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    size = 256
    y, x = np.mgrid[0:size, 0:size]
    images = {
        "01_flat_grey": np.full((size, size, 3), 128, np.uint8),
        "02_gradient": np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8),
        "03_red_disc_on_sky": np.where(
            ((x - 128) ** 2 + (y - 140) ** 2 < 60**2)[..., None], [220, 30, 30], [120, 170, 230]
        ).astype(np.uint8),
        "04_checkerboard": (((x // 16 + y // 16) % 2) * 255)[..., None].repeat(3, axis=2).astype(np.uint8),
        "05_noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
    }
    paths = []
    for name, array in images.items():
        path = folder / f"{name}.png"
        path.write_bytes(encode_image(array, "PNG"))
        paths.append(path)
    corrupt = folder / "06_corrupt.png"
    corrupt.write_bytes(paths[1].read_bytes()[:300])  # a truncated PNG
    return [*paths, corrupt]


def finetune(target: str, rounds: int = 3) -> bool:
    """Runs the local fine-tuning preset for a few rounds against the fleet; prints the rounds. True if it ran."""
    from deploy.tables import format_rounds
    from trainer.config import load_finetune_config
    from trainer.finetune import improvement_summary, run_finetune

    config = load_finetune_config(
        None,
        [f"rewards.target={target}", f"run.rounds={rounds}", f"run.output_dir={OUT / 'finetune'}", "run.name=demo"],
    )
    shutil.rmtree(OUT / "finetune", ignore_errors=True)  # a fresh run, not a resume of the last demo's
    t0 = time.perf_counter()
    result = run_finetune(config)
    print(format_rounds(result.rows, list(config.rewards.weights)))
    summary = improvement_summary(result.rows, config.rewards.primary)
    print(
        f"[demo] held-out jpeg_compressibility {summary['base_mean']:.4f} -> {summary['final_mean']:.4f} "
        f"({summary['gain_in_se']:+.1f} SE of the base model's seed spread), win rate vs base "
        f"{summary['final_win_rate']:.2f}; {time.perf_counter() - t0:.0f}s"
    )
    print(f"[demo] outputs in {result.output_dir}: metrics.jsonl, grids/, reward_curve.png, tensorboard/")
    return len(result.rows) == rounds + 1


def main() -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from deploy.fleet import LOCAL_PROFILE, start_fleet
    from deploy.scoring import score_files
    from deploy.tables import format_table
    from trainer.local_models.artifacts import build_local_artifacts

    # 1. Example images.
    images = make_example_images(OUT / "images")
    print(f"[demo] wrote {len(images)} example images to {OUT / 'images'}")

    # 2. The local profile's models, as `rewardfleet build-local` builds them into ~/.cache/rewardfleet: the first
    # time (the testbed alignment reward trains for a few minutes on 2 cores, once); cached after that.
    print("[demo] building the local profile's models (first use only: a few minutes; then cached)")
    t0 = time.perf_counter()
    build_local_artifacts(progress=True)
    print(f"[demo] models ready in {time.perf_counter() - t0:.1f}s")

    # 3. The local fleet (embedded profile: CPU, weight-free / tiny models), with default options as `rewardfleet
    # serve`: Ray gets one logical CPU per core, and the profile and the 2 Train workers fit a 2-core laptop. Ray's
    # and Serve's own INFO and WARNING lines stay in Ray's log folder: this output is for a person.
    import ray.serve  # noqa: F401  (importing Serve sets its logger to INFO; quiet it after)

    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    t0 = time.perf_counter()
    fleet = start_fleet(LOCAL_PROFILE)
    elapsed = time.perf_counter() - t0
    print(f"[demo] fleet up on {fleet.grpc_target} in {elapsed:.1f}s: {', '.join(fleet.applications)}")
    print("[demo] local profile: caption and semantic run tiny random-weight models (captions are random words),")
    print("[demo] alignment was trained on the synthetic feedback testbed; cluster.yaml serves real checkpoints.")
    try:
        # 4. Score every example image with every reward application, over gRPC.
        prompt = "a red disc in a blue sky"
        pairs = [(p.name, p, prompt) for p in images]
        for application in fleet.applications:
            rows = score_files(pairs, fleet.grpc_target, application, progress=False)
            print(f"\n[demo] {application} (prompt: {prompt!r})")
            print(format_table(rows))
            scored = [r for r in rows if r["reward"] is not None]
            print(f"[demo] {len(scored)} scored, {len(rows) - len(scored)} with a per-sample error")
            if len(rows) != len(images):
                print("[demo] FAILED: not every image came back", file=sys.stderr)
                return 1
        # 5. A short fine-tuning run against the fleet: RAFT on jpeg_compressibility with the tiny pipeline.
        print("\n[demo] fine-tuning the tiny Stable Diffusion pipeline (RAFT on jpeg_compressibility, 2 Ray Train")
        print("[demo] workers, trainer/configs/local.yaml with 3 rounds; the full run is `rewardfleet train`)")
        if not finetune(fleet.grpc_target):
            return 1
    finally:
        # 6. Shut down: the demo's own Ray cluster, and the fleet on it (nothing to drain).
        ray.shutdown()
        print("\n[demo] fleet stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

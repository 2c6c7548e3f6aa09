"""`make demo`: start the local fleet, score images of the testbed world over gRPC, fine-tune its model, shut down.

The local profile's rewards serve models trained on the synthetic testbed world (trainer/local_models/): counted,
coloured objects on four backgrounds, with every fact about an image known. The demo renders one scene for a prompt,
three scenes that each get one attribute of it wrong, an image of noise and a corrupt file (a bad image gets its own
error while the others are scored), and shows what each reward makes of them, captions included. Then a few rounds
of RAFT fine-tune the world's text-to-image model against the learned alignment reward (trainer/configs/local.yaml),
and the testbed oracle reads the held-out prompts' images before and after.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from services.codec import encode_image

OUT = Path("demo_out")


# The demo's prompt, and one-attribute changes of it: each example image shows one of these.
PROMPT = {"count": 2, "color": "red", "object": "ball", "background": "beach"}
CHANGES = {"count": 3, "color": "blue", "background": "snow"}
ATTRS = ("count", "color", "object", "background")
# The standard image rewards of the local profile (tiny random models): shown together in one table.
STANDARD_REWARDS = ("clip_score", "aesthetic", "pickscore", "hpsv2", "image_reward")


def make_example_images(folder: Path, seed: int = 0) -> list[Path]:
    """Writes seeded renders of PROMPT and of each one-attribute change of it, noise and a corrupt PNG; returns
    their paths, in that order."""
    from trainer.local_models.scenes import render_image, render_prompt

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = {"01_as_prompted": PROMPT} | {
        f"{i:02d}_wrong_{key}": {**PROMPT, key: value} for i, (key, value) in enumerate(CHANGES.items(), start=2)
    }
    images = {name: render_image(attrs, rng, 32) for name, attrs in scenes.items()}
    images["05_noise"] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    paths = []
    for name, array in images.items():
        stem = name if name not in scenes or name == "01_as_prompted" else f"{name}_{render_prompt(scenes[name])}"
        path = folder / f"{stem.replace(' ', '_')}.png"
        path.write_bytes(encode_image(array, "PNG"))
        paths.append(path)
    corrupt = folder / "06_corrupt.png"
    corrupt.write_bytes(paths[0].read_bytes()[:100])  # a truncated PNG
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
    print(format_rounds(result.rows, list(config.rewards.scored)))
    primary = config.rewards.primary
    summary = improvement_summary(result.rows, primary)
    base, final = result.rows[0], result.rows[-1]
    print(
        f"[demo] held-out {primary} {summary['base_mean']:.4f} -> {summary['final_mean']:.4f} "
        f"({summary['gain_in_se']:+.1f} SE of the base model's seed spread), win rate vs base "
        f"{summary['final_win_rate']:.2f}; {time.perf_counter() - t0:.0f}s"
    )
    print(
        "[demo] the testbed oracle reads the held-out prompts' images (prompts no model of the world has seen): all "
        f"four attributes right {base['eval/oracle/all/mean']:.1%} (base model) -> {final['eval/oracle/all/mean']:.1%}"
        f" after {rounds} rounds"
    )
    print(
        "[demo]   per attribute: "
        + ", ".join(f"{a} {base[f'eval/oracle/{a}/mean']:.0%} -> {final[f'eval/oracle/{a}/mean']:.0%}" for a in ATTRS)
    )
    print(f"[demo] outputs in {result.output_dir}: grids/ (base beside each round), reward_curve.png, metrics.jsonl")
    return len(result.rows) == rounds + 1


def main() -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from deploy.fleet import LOCAL_PROFILE, start_fleet
    from deploy.scoring import score_files
    from deploy.tables import format_score_grid, format_table
    from trainer.local_models.artifacts import build_local_artifacts
    from trainer.local_models.scenes import render_prompt

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
    print("[demo] local profile: alignment and caption serve models trained on the testbed world (semantic's and")
    print("[demo] the standard rewards' are random); deploy/cluster.yaml serves the real checkpoints.")
    try:
        # 4. Score every example image with every reward application, over gRPC: the papers' rewards one table
        # each, the standard rewards (tiny random models) side by side in one.
        prompt = render_prompt(PROMPT)
        pairs = [(p.name, p, prompt) for p in images]
        standard = [a for a in fleet.applications if a in STANDARD_REWARDS]
        # The standard rewards scale from zero: their first requests start their replicas, all at once.
        with ThreadPoolExecutor(max(1, len(standard))) as pool:
            started = {a: pool.submit(score_files, pairs, fleet.grpc_target, a, progress=False) for a in standard}
            for application in [a for a in fleet.applications if a not in STANDARD_REWARDS]:
                rows = score_files(pairs, fleet.grpc_target, application, progress=False)
                if len(rows) != len(images):
                    print(f"[demo] FAILED: not every image came back from {application}", file=sys.stderr)
                    return 1
                print(f"\n[demo] {application} (prompt: {prompt!r})")
                print(format_table(rows))
                scored = [r for r in rows if r["reward"] is not None]
                print(f"[demo] {len(scored)} scored, {len(rows) - len(scored)} with a per-sample error")
            columns = {a: future.result() for a, future in started.items()}
        if any(len(rows) != len(images) for rows in columns.values()):
            print("[demo] FAILED: not every image came back from a standard reward", file=sys.stderr)
            return 1
        if columns:
            print(f"\n[demo] the standard rewards (prompt: {prompt!r}) on tiny random models in each release's own")
            print("[demo] file format (their replicas start on first use): the scores mean nothing here, the loading")
            print("[demo] and serving paths are the cluster's")
            print(format_score_grid(columns))
        # 5. A short fine-tuning run against the fleet: RAFT on alignment with the world's text-to-image model.
        print("\n[demo] fine-tuning the world's text-to-image model: RAFT on the alignment reward, caption and")
        print("[demo] jpeg_compressibility monitored, 2 Ray Train workers (trainer/configs/local.yaml with 3 rounds;")
        print("[demo] the full run is `rewardfleet train --with-fleet deploy/local.yaml`)")
        if not finetune(fleet.grpc_target):
            return 1
    finally:
        # 6. Shut down: the demo's own Ray cluster, and the fleet on it (nothing to drain).
        ray.shutdown()
        print("\n[demo] fleet stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

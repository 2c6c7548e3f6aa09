"""Fine-tuning methods on the testbed world, side by side: does the job align the world's model with its prompts?

    .venv/bin/python benchmarks/alignment_finetune.py                      # every method, seeds 0-2
    .venv/bin/python benchmarks/alignment_finetune.py --methods raft_alignment jpeg_control --seeds 0 --rounds 2
    .venv/bin/python benchmarks/alignment_finetune.py --selection-lift    # best of K by alignment vs the average

Starts the local fleet (deploy/local.yaml: its rewards serve the world's trained models) once, then runs the local
preset (trainer/configs/local.yaml: the world's text-to-image model, held-out prompts unseen by every model of the
world, the testbed oracle and the fidelity figure every round) once per method and seed, each method differing only
in what it optimises and how:

- rwl_alignment_beta / rwl_alignment_beta0: reward-weighted likelihood with the learned alignment reward (Lee et
  al.), with and without the beta * pre-training loss on rendered pairs of the training prompts;
- raft_alignment, raft_caption: RAFT (best of K) on one reward;
- assemble: FineRewards' assemble over caption + alignment (per-prompt rank fusion of both);
- jpeg_control: RAFT on jpeg_compressibility, a reward unrelated to the prompt (it should gain no alignment).

Prints one table: oracle all-attribute accuracy on held-out prompts, base vs after R rounds (mean over seeds +- SE
over seeds), per-attribute gains, fidelity (base -> final; lower = closer to rendered images) and the share of each
round the job waited on the rewards. Results (every round of every run) go to --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ATTRIBUTES = ("count", "color", "object", "background")
PRETRAIN = "~/.cache/rewardfleet/world/pretrain"
MONITORED = ("alignment", "caption", "jpeg_compressibility")
# What each method changes in the local preset (dotted overrides; rewards.weights replaces the preset's).
METHODS = {
    "rwl_alignment_beta": {
        "rewards.weights": {"alignment": 1.0},
        "selection.strategy": "weighted",
        "optim.pretrain_data": PRETRAIN,
        "optim.beta": 1.0,
    },
    "rwl_alignment_beta0": {"rewards.weights": {"alignment": 1.0}, "selection.strategy": "weighted"},
    "raft_alignment": {"rewards.weights": {"alignment": 1.0}, "selection.strategy": "raft"},
    "raft_caption": {"rewards.weights": {"caption": 1.0}, "selection.strategy": "raft"},
    "assemble": {"rewards.weights": {"caption": 1.0, "alignment": 1.0}, "selection.strategy": "assemble"},
    "jpeg_control": {"rewards.weights": {"jpeg_compressibility": 1.0}, "selection.strategy": "raft"},
}


def method_config(method: str, seed: int, rounds: int, target: str, out: Path, extra: list[str]):
    """The local preset with `method`'s changes, this seed and round count, and --set overrides last."""
    from services.config import apply_overrides, from_dict, load_yaml
    from trainer.config import CONFIG_DIR, FinetuneConfig

    data = load_yaml(CONFIG_DIR / "local.yaml")
    for key, value in METHODS[method].items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    # Every reward of the world is recorded every round: what a method does not optimise, it monitors.
    data["rewards"]["monitor"] = [r for r in MONITORED if r not in data["rewards"]["weights"]]
    data = apply_overrides(
        data,
        [
            f"rewards.target={target}",
            f"run.rounds={rounds}",
            f"run.seed={seed}",
            f"run.output_dir={out / method / f'seed{seed}'}",
            f"run.name={method}_seed{seed}",
            *extra,
        ],
    )
    return from_dict(FinetuneConfig, data, where=f"{method} (seed {seed})")


def _mean_se(values, digits: int = 1) -> str:
    """Mean over seeds, +- the SE over seeds when there are several."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return f"{values.mean():+.{digits}f}"
    return f"{values.mean():+.{digits}f} +- {values.std(ddof=1) / np.sqrt(len(values)):.{digits}f}"


def summarise(results: dict[str, dict[int, list[dict]]]) -> str:
    """One markdown row per method, over its seeds."""
    lines = [
        "| method | oracle all: base -> final | gain (points) | "
        + " | ".join(f"{a} gain" for a in ATTRIBUTES)
        + " | optimised reward gain (base SE) | fidelity base -> final | wait |",
        "|" + "---|" * (6 + len(ATTRIBUTES)),
    ]
    for method, runs in results.items():
        if not runs:
            continue
        base = [rows[0] for rows in runs.values()]
        final = [rows[-1] for rows in runs.values()]

        def gain(key, base=base, final=final):
            return [
                100 * (f[f"eval/oracle/{key}/mean"] - b[f"eval/oracle/{key}/mean"])
                for b, f in zip(base, final, strict=True)
            ]

        primary = next(iter(METHODS[method]["rewards.weights"]))
        reward_gain = [
            (f[f"eval/{primary}/mean"] - b[f"eval/{primary}/mean"]) / b[f"eval/{primary}/se"]
            for b, f in zip(base, final, strict=True)
        ]

        def mean(key, rows):
            return float(np.mean([row[key] for row in rows]))

        fid = (mean("eval/fidelity/mean", base), mean("eval/fidelity/mean", final))
        wait = np.mean([r["time/wait_fraction"] for rows in runs.values() for r in rows])
        accuracy = (
            np.mean([b["eval/oracle/all/mean"] for b in base]),
            np.mean([f["eval/oracle/all/mean"] for f in final]),
        )
        lines.append(
            f"| {method} | {accuracy[0]:.3f} -> {accuracy[1]:.3f} | {_mean_se(gain('all'))} | "
            + " | ".join(_mean_se(gain(a)) for a in ATTRIBUTES)
            + f" | {primary} {_mean_se(reward_gain)} | {fid[0]:.4f} -> {fid[1]:.4f} | {100 * wait:.0f}% |"
        )
    return "\n".join(lines)


def selection_lift(prompts: int = 48, k: int = 8) -> str:
    """Is a reward's best of K better aligned than the average sample? The oracle's all-attribute accuracy of the
    alignment reward's pick per prompt vs all K samples of the world's base model (in-process, no fleet)."""
    from services.rewards.alignment import Alignment, AlignmentConfig
    from trainer.config import load_finetune_config
    from trainer.local_models.artifacts import build_local_artifacts
    from trainer.local_models.oracle import read_attributes
    from trainer.local_models.scenes import parse_prompt
    from trainer.sampling import load_pipeline, sample_images, set_scheduler

    paths = build_local_artifacts(progress=True)
    config = load_finetune_config(None)
    pipe = load_pipeline(config.model)
    set_scheduler(pipe, config.sampling)
    chosen = paths["world/train_prompts"].read_text().splitlines()[:prompts]
    flat = [p for p in chosen for _ in range(k)]
    images = sample_images(pipe, flat, list(range(len(flat))), config.sampling, config.model.resolution).images
    right = np.array(
        [[read_attributes(i)[a] == parse_prompt(p)[a] for a in ATTRIBUTES] for i, p in zip(images, flat, strict=True)]
    ).reshape(len(chosen), k, len(ATTRIBUTES))  # (P, K, 4) bool
    reward = Alignment(AlignmentConfig(model_dir=str(paths["alignment"])))
    reward.load("cpu")
    scores = np.array([o.reward for o in reward.score(list(images), flat)]).reshape(len(chosen), k)  # (P, K)
    picked = right[np.arange(len(chosen)), scores.argmax(axis=1)]  # (P, 4)
    gains = ", ".join(
        f"{a} {100 * (picked[:, i].mean() - right[..., i].mean()):+.0f}" for i, a in enumerate(ATTRIBUTES)
    )
    return (
        f"{len(chosen)} training prompts x K = {k}: all four right {picked.all(axis=1).mean():.3f} for the alignment "
        f"reward's best of K vs {right.all(axis=2).mean():.3f} on average (points: {gains})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4, help="R: fine-tuning rounds per run (<= 8).")
    parser.add_argument("--out", type=Path, default=Path("runs/alignment_finetune"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run.")
    parser.add_argument("--selection-lift", action="store_true", help="Only the best-of-K check (selection_lift).")
    args = parser.parse_args()
    if args.selection_lift:
        print(selection_lift())
        return 0

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.serve  # noqa: F401  (quiet Serve's INFO lines after importing it)

    from deploy.fleet import LOCAL_PROFILE, start_fleet
    from trainer.finetune import run_finetune
    from trainer.local_models.artifacts import build_local_artifacts

    build_local_artifacts(progress=True)
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    fleet = start_fleet(LOCAL_PROFILE)
    shutil.rmtree(args.out, ignore_errors=True)
    results: dict[str, dict[int, list[dict]]] = {m: {} for m in args.methods}
    try:
        for method in args.methods:
            for seed in args.seeds:
                config = method_config(method, seed, args.rounds, fleet.grpc_target, args.out, args.overrides)
                start = time.perf_counter()
                rows = run_finetune(config).rows
                results[method][seed] = rows
                print(
                    f"{method} seed {seed}: oracle all {rows[0]['eval/oracle/all/mean']:.3f} -> "
                    f"{rows[-1]['eval/oracle/all/mean']:.3f} in {time.perf_counter() - start:.0f}s",
                    flush=True,
                )
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    finally:
        ray.shutdown()
    print(f"\n{len(args.seeds)} seeds, {args.rounds} rounds; mean over seeds +- SE over seeds\n")
    print(summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

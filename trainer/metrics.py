"""The fine-tuning job's metrics: held-out statistics, the per-round row, metrics.jsonl, the reward curve and grids.

Each round writes one row to metrics.jsonl (and TensorBoard): per reward, the held-out mean, max, standard error over
seeds and win rate against the base model (round 0), the training samples' mean and max, the loss, and timings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from services.config import read_jsonl

METRICS_FILE = "metrics.jsonl"


def win_rate(current: np.ndarray, base: np.ndarray) -> float:
    """Fraction of (prompt, seed) pairs where `current` beats `base` (ties count half)."""
    return float(np.mean((current > base) + 0.5 * (current == base)))


def eval_stats(scores: np.ndarray) -> dict[str, float]:
    """Held-out scores (P prompts, E seeds): mean, max, and the standard error of the mean over seeds.

    The SE is the spread of the per-seed means (each over every prompt) divided by sqrt(E): how much the mean
    moves when only the sampling noise changes.
    """
    per_seed = scores.mean(axis=0)  # (E,)
    se = float(per_seed.std(ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else float("nan")
    return {"mean": float(scores.mean()), "max": float(scores.max()), "se": se}


def improvement_summary(rows: list[dict], reward: str) -> dict[str, float]:
    """Base vs final held-out mean of `reward`, and the gain in base standard errors."""
    base, final = rows[0], rows[-1]
    se = base[f"eval/{reward}/se"]
    gain = final[f"eval/{reward}/mean"] - base[f"eval/{reward}/mean"]
    return {
        "base_mean": base[f"eval/{reward}/mean"],
        "base_se": se,
        "final_mean": final[f"eval/{reward}/mean"],
        "gain": gain,
        "gain_in_se": gain / se if se and se > 0 else float("inf"),
        "final_win_rate": final[f"eval/{reward}/win_rate"],
        "rounds": final["round"],
    }


def save_grid(images: np.ndarray, columns: int, path: Path, tile: int = 96) -> None:
    """A grid PNG of (N, H, W, 3) uint8 images, `columns` per row, each tile upscaled to `tile` pixels."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for i, image in enumerate(images):
        tile_image = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
        grid.paste(tile_image, ((i % columns) * tile, (i // columns) * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def plot_reward_curve(rows: list[dict], rewards: list[str], path: Path) -> None:
    """Held-out mean (+- SE) and training mean of each reward per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.6), squeeze=False)
    for ax, name in zip(axes[0], rewards, strict=True):
        rounds = [r["round"] for r in rows]
        mean = np.array([r[f"eval/{name}/mean"] for r in rows])
        se = np.array([r[f"eval/{name}/se"] for r in rows])
        ax.plot(rounds, mean, marker="o", label="held-out mean")
        ax.fill_between(rounds, mean - se, mean + se, alpha=0.25, label="+- SE over seeds")
        train = [(r["round"], r[f"train/{name}/mean"]) for r in rows if f"train/{name}/mean" in r]
        if train:
            ax.plot(*zip(*train, strict=True), marker="s", linestyle="--", label="training samples mean")
        ax.set_xlabel("round (0 = base model)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def round_row(
    rnd: int, final: bool, scores: dict, base_eval: dict, picks: list, loss: float, timings: list[dict], attempt: int
) -> dict[str, Any]:
    """The metrics row of a round.

    scores: kind ("train", "eval") -> reward -> (prompts, samples) as gathered from every worker; base_eval: reward ->
    the base model's held-out scores; timings: every worker's {sample_s, wait_s, train_s, round_s[, max_memory_gib]};
    attempt: how many times the worker group has started.
    """
    row: dict[str, Any] = {"round": rnd, "final": final, "selected": len(picks), "loss": loss}
    for name in scores["eval"]:
        if not final:
            row[f"train/{name}/mean"] = float(np.mean(scores["train"][name]))
            row[f"train/{name}/max"] = float(np.max(scores["train"][name]))
        for key, value in eval_stats(scores["eval"][name]).items():
            row[f"eval/{name}/{key}"] = value
        row[f"eval/{name}/win_rate"] = win_rate(scores["eval"][name], np.array(base_eval[name]))
    for key in ("sample_s", "wait_s", "train_s", "round_s"):
        row[f"time/{key}"] = float(np.mean([t[key] for t in timings]))
    row["time/wait_fraction"] = float(np.mean([t["wait_s"] / t["round_s"] for t in timings]))
    row["time/wait_fraction_max"] = float(max(t["wait_s"] / t["round_s"] for t in timings))
    if "max_memory_gib" in timings[0]:
        row["gpu/max_memory_gib"] = float(max(t["max_memory_gib"] for t in timings))
    row["attempt"] = attempt
    return row


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The rows of `output_dir`/metrics.jsonl ([] before the first round)."""
    path = Path(output_dir) / METRICS_FILE
    return [row for _, row in read_jsonl(path)] if path.exists() else []


def save_eval_grid(eval_images: list, prompts: int, per_prompt: int, path: Path, max_prompts: int = 8) -> None:
    """The round's held-out samples as a grid PNG: the first `max_prompts` prompts, one row each, one column per seed.

    eval_images: every worker's (prompt indices, (len(indices) * per_prompt, H, W, 3) uint8 images or None).
    """
    shape = next(block.shape[1:] for _, block in eval_images if block is not None)
    grid = np.zeros((prompts * per_prompt, *shape), np.uint8)
    for idx, block in eval_images:
        for n, g in enumerate(idx):
            grid[g * per_prompt : (g + 1) * per_prompt] = block[n * per_prompt : (n + 1) * per_prompt]
    save_grid(grid[: max_prompts * per_prompt], per_prompt, path)

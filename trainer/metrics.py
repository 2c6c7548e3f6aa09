"""The fine-tuning job's metrics: held-out statistics, the per-round row, metrics.jsonl, the reward curve and grids.

Each round writes one row to metrics.jsonl (and TensorBoard): per reward (optimised or monitored), the held-out mean,
max, standard error over seeds and win rate against the base model (round 0), the training samples' mean and max, the
loss, and timings; per monitored reward, the reward-hacking flag `hacking/<name>` and `hacking/<name>/drop_se`; on
the testbed world (config section `testbed`, trainer/evaluation.py), `eval/oracle/<attr>/mean` and `/se` (attribute
accuracy) and `eval/fidelity/mean` and `/se` (cosine distance to the world's renders).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.config import read_jsonl

METRICS_FILE = "metrics.jsonl"
# The held-out grids show at most this many prompts (rows) and seeds (columns per block).
GRID_PROMPTS, GRID_SEEDS = 8, 4
# The oracle's all-attribute accuracy of the held-out images, the testbed metric the progress lines show.
ORACLE_ALL = "eval/oracle/all/mean"


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
    """Base vs final held-out mean of `reward`, and the gain in base standard errors; with the oracle's all-attribute
    accuracy, base vs final too (`base_oracle_all`, `final_oracle_all`, where both rows have it)."""
    base, final = rows[0], rows[-1]
    se = base[f"eval/{reward}/se"]
    gain = final[f"eval/{reward}/mean"] - base[f"eval/{reward}/mean"]
    oracle = {}
    if ORACLE_ALL in base and ORACLE_ALL in final:
        oracle = {"base_oracle_all": base[ORACLE_ALL], "final_oracle_all": final[ORACLE_ALL]}
    return {
        "base_mean": base[f"eval/{reward}/mean"],
        "base_se": se,
        "final_mean": final[f"eval/{reward}/mean"],
        "gain": gain,
        "gain_in_se": gain / se if se and se > 0 else float("inf"),
        "final_win_rate": final[f"eval/{reward}/win_rate"],
        "rounds": final["round"],
        **oracle,
    }


def reward_hacking(base: dict, row: dict, optimised: str, monitored: Sequence[str], k: float) -> dict[str, float]:
    """Reward-hacking flags of a round's metrics `row` against the base model's (`base`, round 0's row).

    A monitored reward is flagged (`hacking/<name>` = 1.0, else 0.0) when the optimised reward's held-out mean rose
    above the base's while the monitored reward's held-out mean fell by more than `k` of its base standard errors.
    `hacking/<name>/drop_se` is that fall in base SEs (negative when it rose). A base SE of 0 makes any fall an
    infinite number of SEs; a NaN one (a single held-out seed) makes drop_se NaN, which never flags.
    """
    rose = row[f"eval/{optimised}/mean"] > base[f"eval/{optimised}/mean"]
    out: dict[str, float] = {}
    for name in monitored:
        drop = base[f"eval/{name}/mean"] - row[f"eval/{name}/mean"]
        se = base[f"eval/{name}/se"]
        if drop == 0:
            drop_se = 0.0
        elif se > 0:
            drop_se = drop / se
        elif se == 0:
            drop_se = math.copysign(math.inf, drop)
        else:  # NaN: one seed, no spread to measure the fall against
            drop_se = float("nan")
        out[f"hacking/{name}"] = float(rose and drop_se > k)
        out[f"hacking/{name}/drop_se"] = float(drop_se)
    return out


def monitored_rewards(rows: list[dict]) -> list[str]:
    """The monitored rewards of a run, from its rows' `hacking/<name>` keys (in the order they first appear)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update((key.split("/")[1], None) for key in row if key.startswith("hacking/") and key.count("/") == 1)
    return list(names)


def _tile(image: np.ndarray, tile: int):
    """A (H, W, 3) uint8 image as a `tile` x `tile` PIL image: blocky when enlarged (tiny models' 16-32 px samples
    stay readable as pixels), smooth when reduced."""
    from PIL import Image

    picture = Image.fromarray(image)
    enlarge = picture.width < tile
    return picture.resize((tile, tile), Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS)


def save_grid(images: np.ndarray, columns: int, path: Path, tile: int = 96) -> None:
    """A grid PNG of (N, H, W, 3) uint8 images, `columns` per row, each tile upscaled to `tile` pixels."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(_tile(image, tile), ((i % columns) * tile, (i // columns) * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _curve(ax, rows: list[dict], prefix: str, label: str) -> None:
    """`<prefix>/mean` per round, with a +- `<prefix>/se` band where the rows have one (rows without it skipped)."""
    points = [
        (r["round"], r[f"{prefix}/mean"], r.get(f"{prefix}/se", float("nan"))) for r in rows if f"{prefix}/mean" in r
    ]
    if not points:
        return
    rounds, mean, se = (np.array(v, dtype=float) for v in zip(*points, strict=True))
    (line,) = ax.plot(rounds, mean, marker="o", label=label)
    if np.isfinite(se).any():
        ax.fill_between(rounds, mean - se, mean + se, alpha=0.2, color=line.get_color())


def plot_reward_curve(rows: list[dict], rewards: list[str], path: Path, extra: Sequence[str] | None = None) -> None:
    """Held-out mean (+- SE) and training mean of each reward per round, one panel each; then a panel of the `extra`
    held-out metrics (prefixes such as "eval/oracle/all": their /mean, +- /se where present; None = every
    "eval/oracle/..." metric in the rows), beside the rewards; then the fidelity panel (eval/fidelity, where the
    rows have it); then one panel per monitored reward, its flagged rounds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if extra is None:
        keys = {key for row in rows for key in row if key.startswith("eval/oracle/") and key.endswith("/mean")}
        extra = sorted(key.removesuffix("/mean") for key in keys)
    monitored = [name for name in monitored_rewards(rows) if name not in rewards]
    fidelity = any("eval/fidelity/mean" in row for row in rows)
    # None: the panel of the extra metrics
    panels = [*rewards, *([None] if extra else []), *(["eval/fidelity"] if fidelity else []), *monitored]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name is None:
            for prefix in extra:
                _curve(ax, rows, prefix, prefix.removeprefix("eval/"))
            ax.set_ylabel("held-out")
        elif name == "eval/fidelity":
            _curve(ax, rows, name, "held-out mean (+- SE over images)")
            ax.set_ylabel("fidelity: 1 - cos to the world's renders\n(CLIP image embeddings; lower = closer)")
        else:
            _curve(ax, rows, f"eval/{name}", "held-out mean (+- SE over seeds)")
            train = [(r["round"], r[f"train/{name}/mean"]) for r in rows if f"train/{name}/mean" in r]
            if train:
                ax.plot(*zip(*train, strict=True), marker="s", linestyle="--", label="training samples mean")
            flagged = [(r["round"], r[f"eval/{name}/mean"]) for r in rows if r.get(f"hacking/{name}") == 1.0]
            if flagged:
                ax.plot(*zip(*flagged, strict=True), "rx", markersize=10, label="reward hacking flagged")
            ax.set_ylabel(name + (" (monitored, not optimised)" if name in monitored else ""))
        ax.set_xlabel("round (0 = base model)")
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


def gather_eval_images(eval_images: list, prompts: int, per_prompt: int) -> np.ndarray:
    """Every worker's held-out images as one (prompts, per_prompt, H, W, 3) uint8 array, in prompt order.

    eval_images: every worker's (prompt indices, (len(indices) * per_prompt, H, W, 3) uint8 images or None).
    """
    shape = next(block.shape[1:] for _, block in eval_images if block is not None)
    out = np.zeros((prompts, per_prompt, *shape), np.uint8)
    for idx, block in eval_images:
        for n, g in enumerate(idx):
            out[g] = block[n * per_prompt : (n + 1) * per_prompt]
    return out


@dataclass(frozen=True)
class GridLayout:
    """Where `save_eval_grid` puts things. A header band on top names the blocks; below it one row per prompt, each
    cell a `tile` x `tile` image over a `label` band (its reward, then its prompt). The base block (round 0, when
    given) is on the left, the current round's block on its right, `gap` pixels apart; each block has one column
    per seed, seed s in column s of both blocks, so a base image and its current counterpart (same noise) are
    `seeds * tile + gap` apart."""

    prompts: int
    seeds: int
    with_base: bool
    tile: int = 128
    label: int = 40
    header: int = 18
    gap: int = 12

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        block = self.seeds * self.tile
        width = 2 * block + self.gap if self.with_base else block
        return width, self.header + self.prompts * (self.tile + self.label)

    def block_x(self, block: str) -> int:
        """Left edge of "base" or "current"."""
        return self.seeds * self.tile + self.gap if block == "current" and self.with_base else 0

    def cell(self, block: str, prompt: int, seed: int) -> tuple[int, int]:
        """Top-left corner of the image of (`prompt`, `seed`) in `block`; its label band starts `tile` below it."""
        return self.block_x(block) + seed * self.tile, self.header + prompt * (self.tile + self.label)


def fit_text(text: str, font, width: float, lines: int) -> list[str]:
    """`text` wrapped at word boundaries into at most `lines` lines of at most `width` pixels, cut with "..." where
    it does not fit."""

    def cut(line: str) -> str:
        while line and font.getlength(line + "...") > width:
            line = line[:-1]
        return line.rstrip() + "..."

    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        out.append(line if font.getlength(line) <= width else cut(line))
    if words:
        out[-1] = cut(out[-1])
    return out


def save_eval_grid(
    images: np.ndarray,
    rewards: np.ndarray,
    prompts: Sequence[str],
    path: Path,
    *,
    reward: str,
    rnd: int,
    base_images: np.ndarray | None = None,
    base_rewards: np.ndarray | None = None,
    max_prompts: int = GRID_PROMPTS,
    max_seeds: int = GRID_SEEDS,
    labels: bool = True,
) -> GridLayout:
    """The round's held-out samples as a PNG a person can read: the first `max_prompts` prompts, one row each, the
    first `max_seeds` seeds; the base model's images of the same noise beside them; each cell labelled with its
    `reward` value (current cells: and its change from the base's image) and its prompt. Layout: `GridLayout`.

    images: (P, E, H, W, 3) uint8, this round's; rewards: (P, E) their values of the optimised reward; base_images,
    base_rewards: the same for round 0 (base_images None: no base block, e.g. a run resumed from another run's
    checkpoint; base_rewards None: no change from base on the current cells).
    labels=False leaves the header and label bands blank. Returns the layout.
    """
    from PIL import Image, ImageDraw, ImageFont

    p, e = min(len(images), max_prompts), min(images.shape[1], max_seeds)
    if base_images is not None:
        if base_rewards is None:
            raise ValueError("base_images need base_rewards, the values their labels show")
        p, e = min(p, len(base_images)), min(e, base_images.shape[1])  # the worker keeps only the cells it shows
    layout = GridLayout(p, e, with_base=base_images is not None)
    grid = Image.new("RGB", layout.size, (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    change = " (change from base)" if base_rewards is not None else ""
    blocks = [("current", images, rewards, f"round {rnd}: {reward}{change}")]
    if base_images is not None:
        blocks.insert(0, ("base", base_images, base_rewards, f"base (round 0): {reward}"))
    for block, block_images, values, title in blocks:
        if labels:
            title = fit_text(title, font, e * layout.tile - 4, 1)[0]
            draw.text((layout.block_x(block) + 2, 3), title, fill=(0, 0, 0), font=font)
        for g in range(p):
            for s in range(e):
                x, y = layout.cell(block, g, s)
                grid.paste(_tile(block_images[g, s], layout.tile), (x, y))
                if not labels:
                    continue
                value = f"{values[g, s]:.4g}"
                if block == "current" and base_rewards is not None:
                    value += f" ({values[g, s] - base_rewards[g, s]:+.3g})"
                text = [value, *fit_text(prompts[g], font, layout.tile - 4, 2)]
                for i, line in enumerate(text):
                    draw.text((x + 2, y + layout.tile + 1 + 13 * i), line, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return layout

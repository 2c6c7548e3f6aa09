"""The job's metrics that need no Ray: the reward-hacking monitor over hand-computed rows, the held-out grid's layout
and labels, and the reward curve's panels."""

import math

import numpy as np
import pytest
from PIL import Image

from trainer.metrics import (
    fit_text,
    gather_eval_images,
    monitored_rewards,
    plot_reward_curve,
    reward_hacking,
    round_row,
    save_eval_grid,
)

# --- The reward-hacking monitor ----------------------------------------------------------------------------------


def stats(mean: float, se: float, name: str) -> dict:
    return {f"eval/{name}/mean": mean, f"eval/{name}/se": se}


BASE = {**stats(1.0, 0.1, "opt"), **stats(0.5, 0.05, "cap"), **stats(0.2, 0.1, "other")}


def test_a_monitored_reward_falling_by_more_than_k_se_while_the_optimised_one_rises_is_flagged():
    # opt rose 1.0 -> 1.3; cap fell 0.12 = 2.4 of its base SEs (0.05); other fell 0.15 = 1.5 of its (0.1).
    row = {**stats(1.3, 0.1, "opt"), **stats(0.38, 0.05, "cap"), **stats(0.05, 0.1, "other")}
    out = reward_hacking(BASE, row, "opt", ["cap", "other"], k=2.0)
    assert set(out) == {"hacking/cap", "hacking/cap/drop_se", "hacking/other", "hacking/other/drop_se"}
    assert out["hacking/cap"] == 1.0 and out["hacking/cap/drop_se"] == pytest.approx(2.4)
    assert out["hacking/other"] == 0.0 and out["hacking/other/drop_se"] == pytest.approx(1.5)
    # A larger k: 2.4 SE is no longer enough.
    assert reward_hacking(BASE, row, "opt", ["cap"], k=2.5)["hacking/cap"] == 0.0


def test_no_flag_unless_the_optimised_reward_rose():
    fell = {**stats(0.9, 0.1, "opt"), **stats(0.38, 0.05, "cap")}  # cap fell 2.4 SE, but so did opt
    assert reward_hacking(BASE, fell, "opt", ["cap"], k=2.0) == {
        "hacking/cap": 0.0,
        "hacking/cap/drop_se": pytest.approx(2.4),
    }
    same = {**stats(1.0, 0.1, "opt"), **stats(0.38, 0.05, "cap")}  # opt unchanged: not a rise
    assert reward_hacking(BASE, same, "opt", ["cap"], k=2.0)["hacking/cap"] == 0.0


def test_a_monitored_reward_that_rose_has_a_negative_drop_and_the_base_round_flags_nothing():
    row = {**stats(1.3, 0.1, "opt"), **stats(0.6, 0.05, "cap")}
    out = reward_hacking(BASE, row, "opt", ["cap"], k=2.0)
    assert out == {"hacking/cap": 0.0, "hacking/cap/drop_se": pytest.approx(-2.0)}
    assert reward_hacking(BASE, BASE, "opt", ["cap", "other"], k=2.0) == {
        "hacking/cap": 0.0,
        "hacking/cap/drop_se": 0.0,
        "hacking/other": 0.0,
        "hacking/other/drop_se": 0.0,
    }
    assert reward_hacking(BASE, row, "opt", [], k=2.0) == {}  # no monitor: no keys


def test_degenerate_base_standard_errors():
    row = {**stats(1.3, 0.1, "opt"), **stats(0.4, 0.0, "cap")}
    # A base SE of 0 (every seed scored alike): any fall is infinitely many SEs; no change is none.
    zero = {**BASE, "eval/cap/se": 0.0}
    assert reward_hacking(zero, row, "opt", ["cap"], 2.0) == {"hacking/cap": 1.0, "hacking/cap/drop_se": math.inf}
    assert reward_hacking(zero, {**row, "eval/cap/mean": 0.5}, "opt", ["cap"], 2.0)["hacking/cap/drop_se"] == 0.0
    # A NaN SE (one held-out seed): the fall cannot be measured, so it is never flagged.
    nan = reward_hacking({**BASE, "eval/cap/se": float("nan")}, row, "opt", ["cap"], 2.0)
    assert nan["hacking/cap"] == 0.0 and math.isnan(nan["hacking/cap/drop_se"])


def test_reward_hacking_over_rows_from_round_row():
    """The keys round_row writes are the ones reward_hacking reads; the numbers worked by hand."""
    timings = [{"sample_s": 1.0, "wait_s": 0.1, "train_s": 1.0, "round_s": 2.0}]

    def row(rnd, opt, cap, base):
        scores = {
            "eval": {"opt": np.array(opt), "cap": np.array(cap)},
            "train": {"opt": np.ones(2), "cap": np.ones(2)},
        }
        return round_row(rnd, False, scores, base, [], 0.0, timings, 1)

    # 2 prompts x 3 seeds. cap's base per-seed means 0.5, 0.6, 0.7: SE = 0.1 / sqrt(3).
    base_scores = {"opt": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], "cap": [[0.4, 0.5, 0.6], [0.6, 0.7, 0.8]]}
    base = row(0, base_scores["opt"], base_scores["cap"], base_scores)
    assert base["eval/cap/mean"] == pytest.approx(0.6) and base["eval/cap/se"] == pytest.approx(0.1 / math.sqrt(3))
    # opt rises to 1.0; cap falls by 0.2 everywhere: 0.2 / (0.1 / sqrt(3)) = 2 sqrt(3) = 3.46 SE.
    later = row(1, [[1.0] * 3] * 2, (np.array(base_scores["cap"]) - 0.2).tolist(), base_scores)
    out = reward_hacking(base, later, "opt", ["cap"], k=3.0)
    assert out["hacking/cap"] == 1.0 and out["hacking/cap/drop_se"] == pytest.approx(2 * math.sqrt(3))
    assert reward_hacking(base, later, "opt", ["cap"], k=3.5)["hacking/cap"] == 0.0
    assert monitored_rewards([base, {**later, **out}]) == ["cap"]
    assert monitored_rewards([base]) == []


# --- The held-out grid -------------------------------------------------------------------------------------------


def coloured(prompts: int, seeds: int, red: int, size: int = 16) -> np.ndarray:
    """(P, E, size, size, 3) uint8 images, each one flat colour (red, 20 g + 10, 40 s + 10): where it landed tells
    which (prompt, seed) it was."""
    out = np.zeros((prompts, seeds, size, size, 3), np.uint8)
    for g in range(prompts):
        for s in range(seeds):
            out[g, s] = (red, 20 * g + 10, 40 * s + 10)
    return out


PROMPTS = ["one red ball on the beach", "three green balls in the city at night under a bright full moon", "a dog"]


def grid(tmp_path, name, **kwargs):
    p, e = 3, 2
    args = dict(
        images=coloured(p, e, 200),
        rewards=np.arange(p * e, dtype=float).reshape(p, e),
        prompts=PROMPTS,
        path=tmp_path / f"{name}.png",
        reward="opt",
        rnd=2,
        base_images=coloured(p, e, 50),
        base_rewards=np.zeros((p, e)),
    )
    args.update(kwargs)
    layout = save_eval_grid(**args)
    return layout, np.array(Image.open(args["path"]).convert("RGB"))


def test_the_grid_puts_base_left_and_current_right_as_documented(tmp_path):
    layout, pixels = grid(tmp_path, "labelled")
    # 2 blocks of 2 seeds x 128 px with a 12 px gap; an 18 px header, then 3 rows of 128 px images over 40 px labels.
    assert layout.size == (2 * 2 * 128 + 12, 18 + 3 * (128 + 40))
    assert pixels.shape == (18 + 3 * 168, 524, 3)
    for g in range(3):
        for s in range(2):
            bx, by = layout.cell("base", g, s)
            cx, cy = layout.cell("current", g, s)
            assert (bx, by) == (s * 128, 18 + g * 168) and (cx, cy) == (2 * 128 + 12 + s * 128, by)
            # The whole tile is the image, upscaled: base (red 50) on the left, current (red 200) on the right.
            assert (pixels[by : by + 128, bx : bx + 128] == (50, 20 * g + 10, 40 * s + 10)).all()
            assert (pixels[cy : cy + 128, cx : cx + 128] == (200, 20 * g + 10, 40 * s + 10)).all()
    assert (pixels[18:, 256:268] == 255).all()  # the gap between the blocks is blank


def test_labels_are_drawn_in_the_label_bands_only(tmp_path):
    layout, labelled = grid(tmp_path, "labelled")
    _, blank = grid(tmp_path, "blank", labels=False)
    assert labelled.shape == blank.shape
    t = layout.tile
    for block in ("base", "current"):
        x0 = layout.block_x(block)
        assert (blank[: layout.header, x0 : x0 + 2 * t] == 255).all()
        assert (labelled[: layout.header, x0 : x0 + 2 * t] != 255).any()  # the block's title
        for g in range(3):
            for s in range(2):
                x, y = layout.cell(block, g, s)
                band = (slice(y + t, y + t + layout.label), slice(x, x + t))
                assert (blank[band] == 255).all()
                assert (labelled[band] != blank[band]).any()  # reward value and prompt
                images = (slice(y, y + t), slice(x, x + t))
                assert (labelled[images] == blank[images]).all()  # the images are untouched

    # The label shows the cell's own reward: other values, other pixels in that band only.
    other = np.arange(6, dtype=float).reshape(3, 2)
    other[1, 0] = 123.5
    _, changed = grid(tmp_path, "changed", rewards=other)
    x, y = layout.cell("current", 1, 0)
    band = (slice(y + t, y + t + layout.label), slice(x, x + t))
    assert (changed[band] != labelled[band]).any()
    changed[band] = labelled[band]
    assert (changed == labelled).all()


def test_grid_limits_and_no_base(tmp_path):
    many = coloured(10, 6, 200)
    layout, pixels = grid(
        tmp_path,
        "many",
        images=many,
        rewards=np.zeros((10, 6)),
        prompts=[f"prompt {i}" for i in range(10)],
        base_images=many,
        base_rewards=np.zeros((10, 6)),
    )
    assert (layout.prompts, layout.seeds) == (8, 4)  # at most 8 prompts, 4 seeds per block
    assert pixels.shape[:2] == (18 + 8 * 168, 2 * 4 * 128 + 12)
    # Without the base model's images (a run resumed from another run's checkpoint): the current block alone.
    layout, pixels = grid(tmp_path, "alone", base_images=None)
    assert layout.cell("current", 2, 1) == (128, 18 + 2 * 168) and pixels.shape[:2] == (18 + 3 * 168, 2 * 128)
    with pytest.raises(ValueError, match="base_rewards"):
        grid(tmp_path, "bad", base_rewards=None)


def test_prompts_are_wrapped_and_cut_to_fit_the_cell():
    from PIL import ImageFont

    font = ImageFont.load_default()
    lines = fit_text(PROMPTS[1], font, 124, 2)
    assert len(lines) == 2 and lines[1].endswith("...")
    assert all(font.getlength(line) <= 124 for line in lines)
    assert PROMPTS[1].startswith(" ".join(lines).removesuffix("..."))  # the prompt's beginning, as it reads
    assert fit_text("a dog", font, 124, 2) == ["a dog"]
    (word,) = fit_text("x" * 200, font, 60, 2)  # one word wider than the cell: cut, not wrapped
    assert word.endswith("...") and font.getlength(word) <= 60


def test_gather_eval_images_puts_every_workers_shard_in_prompt_order():
    images = coloured(3, 2, 7)
    # Worker 0 sampled prompts 0 and 2, worker 1 prompt 1; a worker with no held-out prompt sends None.
    shards = [([0, 2], images[[0, 2]].reshape(4, 16, 16, 3)), ([1], images[1]), ([], None)]
    assert (gather_eval_images(shards, 3, 2) == images).all()


# --- The reward curve ---------------------------------------------------------------------------------------------


def test_the_reward_curve_adds_a_panel_for_oracle_metrics_and_one_per_monitored_reward(tmp_path):
    rows = []
    for rnd, cap in enumerate([0.5, 0.45, 0.3]):  # 1, then 4 base SEs down while opt rises
        row = {"round": rnd, **stats(rnd, 0.1, "opt"), **stats(cap, 0.05, "cap")}
        row.update(reward_hacking(rows[0] if rows else row, row, "opt", ["cap"], 2.0))
        if rnd < 2:
            row["train/opt/mean"] = rnd - 0.5
        rows.append(row)
    assert [r["hacking/cap"] for r in rows] == [0.0, 0.0, 1.0]

    def width(name, rows, **kwargs):
        path = tmp_path / f"{name}.png"
        plot_reward_curve(rows, ["opt"], path, **kwargs)
        return Image.open(path).size[0]

    one = width("plain", [{k: v for k, v in r.items() if not k.startswith("hacking/")} for r in rows])
    assert width("monitored", rows) == 2 * one  # opt, cap
    oracle = [{**r, "eval/oracle/all/mean": 0.2 + 0.1 * r["round"], "eval/oracle/all/se": 0.02} for r in rows]
    oracle[0]["eval/oracle/count/mean"] = 0.4  # a metric some rows lack is drawn where present
    assert width("oracle", oracle) == 3 * one  # opt, the oracle panel, cap
    assert width("explicit", oracle, extra=[]) == 2 * one

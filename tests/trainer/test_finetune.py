"""The fine-tuning job for real: a local Ray cluster, 2 Ray Train workers on CPU, the tiny Stable Diffusion
pipeline, and rewards served over gRPC by the test fleet."""

import json

import numpy as np
import pytest

from services.selection import best_of_k, fuse
from trainer.config import load_finetune_config
from trainer.finetune import run_finetune
from trainer.metrics import GridLayout, eval_stats, read_metrics, reward_hacking, win_rate
from trainer.worker import select_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tiny_job(fleet, tmp_path, name, *overrides):
    """The local preset shrunk to seconds per round: 16 px, 3 steps, 4 training prompts x K = 3, 2 held-out x 2."""
    return load_finetune_config(None, tiny_overrides(fleet, tmp_path, name, *overrides))


def tiny_overrides(fleet, tmp_path, name, *overrides) -> list[str]:
    """`tiny_job`'s overrides of the local preset (for `rewardfleet train --set`)."""
    return [
        f"rewards.target={fleet.grpc_target}",
        "model.pretrained=tiny",
        "model.resolution=16",
        "sampling.steps=3",
        "sampling.samples_per_prompt=3",
        "sampling.prompts_per_batch=1",
        "prompts.generate=4",
        "prompts.eval_count=2",
        "prompts.eval_seeds=2",
        "optim.method=lora",
        "optim.epochs_per_round=1",
        "optim.batch_size=2",
        "run.num_workers=2",
        "run.rounds=2",
        # The tiny pipeline's images are noise: generated prompts, no testbed metrics, the old preset's reward.
        "prompts.train_file=null",
        "prompts.eval_file=null",
        "testbed.oracle=false",
        "testbed.fidelity_clip=null",
        "rewards.weights={jpeg_compressibility: 1.0}",
        "rewards.monitor=[]",
        "optim.lr=1e-3",
        f"run.output_dir={tmp_path / name}",
        f"run.name={name}",
        *overrides,
    ]


def check_rows(rows, rounds, rewards):
    assert [r["round"] for r in rows] == list(range(rounds + 1))  # no round lost or repeated; + final eval
    assert [r["final"] for r in rows] == [False] * rounds + [True]
    for row in rows:
        for name in rewards:
            assert np.isfinite(row[f"eval/{name}/mean"]) and row[f"eval/{name}/mean"] <= row[f"eval/{name}/max"]
            assert 0.0 <= row[f"eval/{name}/win_rate"] <= 1.0
        assert 0.0 <= row["time/wait_fraction"] <= row["time/wait_fraction_max"] < 1.0
        assert row["time/round_s"] >= row["time/sample_s"] > 0
    for row in rows[:-1]:
        assert np.isfinite(row["loss"]) and row["selected"] > 0
        for name in rewards:
            assert row[f"train/{name}/mean"] <= row[f"train/{name}/max"]
    assert rows[0]["eval/" + rewards[0] + "/win_rate"] == 0.5  # the base model against itself


def test_two_rounds_then_resume_from_the_checkpoint(fleet, tmp_path):

    from trainer.sampling import SamplingConfig, load_pipeline, sample_images, set_scheduler

    config = tiny_job(fleet, tmp_path, "raft")
    seen = []
    result = run_finetune(config, on_round=seen.append)
    rows = read_metrics(result.output_dir)
    assert seen == rows  # the driver saw every round as it was written
    check_rows(rows, 2, ["jpeg_compressibility"])
    assert rows == result.rows
    out = result.output_dir
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["round_000.png", "round_001.png", "round_002.png"]
    assert (out / "reward_curve.png").stat().st_size > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # The checkpoint: after round 1, LoRA weights that diffusers' load_lora_weights reads, optimizer, RNG state.
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["next_round"] == 2 and [r["round"] for r in state["history"]] == [0, 1]
    assert {p.name for p in result.checkpoint.iterdir()} >= {"lora", "optimizer.pt", "rng.pt", "state.json"}
    pipe = load_pipeline(config.model)
    set_scheduler(pipe, config.sampling)
    sampling = SamplingConfig(steps=3)
    before = sample_images(pipe, ["one red dog in the city"], [1], sampling, 16).latents
    pipe.load_lora_weights(result.checkpoint / "lora")
    after = sample_images(pipe, ["one red dog in the city"], [1], sampling, 16).latents
    assert not np.allclose(before.numpy(), after.numpy())  # the trained adapter changes the samples

    # Rerunning the same run with more rounds resumes: rounds 0-1 are kept as they were, round 2 is trained next.
    more = run_finetune(tiny_job(fleet, tmp_path, "raft", "run.rounds=3"))
    check_rows(more.rows, 3, ["jpeg_compressibility"])
    assert more.rows[:2] == rows[:2]
    assert [r["attempt"] for r in more.rows] == [1, 1, 2, 2]
    # Round 2's held-out samples use the same noise as round 2 of the first run (the final evaluation there), and
    # the weights are the same (round 1's checkpoint): the same scores.
    assert more.rows[2]["eval/jpeg_compressibility/mean"] == pytest.approx(rows[2]["eval/jpeg_compressibility/mean"])
    assert json.loads((more.checkpoint / "state.json").read_text())["next_round"] == 3


def test_assemble_fuses_two_served_rewards_and_monitors_a_third(fleet, local_artifacts, tmp_path):
    """Assemble over two served rewards, with the caption reward monitored: scored and logged every round, watched
    for reward hacking, never fused. The held-out prompts are the testbed world's, with its oracle and fidelity
    metrics on (the local profile's tiny random CLIP, built for the fleet)."""
    from PIL import Image

    from trainer.evaluation import ORACLE_ATTRIBUTES

    # Testbed objects (cubes, gems) are in no generated training prompt, so the two sets stay disjoint.
    eval_file = tmp_path / "testbed_eval.txt"
    eval_file.write_text("two red cubes in the city\none blue gem on the beach\n")
    config = tiny_job(
        fleet,
        tmp_path,
        "assemble",
        "selection.strategy=assemble",
        "selection.fusion=rrf",
        "rewards.weights={jpeg_compressibility: 1.0, jpeg_limited: 0.5}",
        "rewards.monitor=[caption]",
        "run.rounds=1",
        f"prompts.eval_file={eval_file}",
        "testbed.oracle=true",
        f"testbed.fidelity_clip={local_artifacts['tiny/clip']}",
        "testbed.fidelity_renders=4",
    )
    result = run_finetune(config)
    rows = result.rows
    check_rows(rows, 1, ["jpeg_compressibility", "jpeg_limited", "caption"])
    # The testbed metrics of every round (rounds 0..R, as the rewards'). The random pipeline's images are noise, so
    # only their ranges are checked: accuracies in [0, 1], cosine distances in [0, 2].
    for row in rows:
        for attr in ORACLE_ATTRIBUTES:
            assert 0.0 <= row[f"eval/oracle/{attr}/mean"] <= 1.0 and row[f"eval/oracle/{attr}/se"] >= 0.0
        assert 0.0 <= row["eval/fidelity/mean"] <= 2.0 and row["eval/fidelity/se"] >= 0.0
    # Both applications score JPEG size: the same numbers through two deployments.
    row = rows[0]
    assert row["eval/jpeg_limited/mean"] == pytest.approx(row["eval/jpeg_compressibility/mean"])
    # The monitored reward: held-out stats like the others (cosine similarity, in [-1, 1]), and the hacking monitor's
    # keys in every row, as reward_hacking computes them from the rows against round 0.
    for row in rows:
        assert -1.0 <= row["eval/caption/mean"] <= 1.0 and row["eval/caption/se"] >= 0
        expected = reward_hacking(rows[0], row, "jpeg_compressibility", ["caption"], 2.0)
        assert {k: v for k, v in row.items() if k.startswith("hacking/")} == pytest.approx(expected, nan_ok=True)
    assert rows[0]["hacking/caption"] == 0.0 and rows[0]["hacking/caption/drop_se"] == 0.0
    assert rows[1]["hacking/caption"] in (0.0, 1.0)
    # 4 training prompts, one winner each: selection ran on the fused jpeg ranks (the monitor is kept out of it:
    # test_select_samples_never_sees_a_monitored_reward).
    assert rows[0]["selected"] == 4
    # The grids: 2 held-out prompts x 2 seeds, base beside current, labelled.
    for rnd in (0, 1):
        size = Image.open(result.output_dir / "grids" / f"round_{rnd:03d}.png").size
        assert size == GridLayout(prompts=2, seeds=2, with_base=True).size


def test_a_missing_reward_application_fails_before_any_worker_starts(fleet, tmp_path):
    from trainer.scoring import RewardRoundError

    config = tiny_job(fleet, tmp_path, "missing", "rewards.weights={no_such_reward: 1.0}")
    with pytest.raises(RewardRoundError, match="no_such_reward"):
        run_finetune(config)


# --- Selection as the job applies it, against brute force ------------------------------------------------------


def test_select_samples_matches_brute_force_for_every_strategy():
    rng = np.random.default_rng(0)
    # Two rewards on very different scales, with ties.
    a = rng.integers(0, 3, (5, 4)).astype(float)
    b = 1000.0 * rng.integers(0, 4, (5, 4))
    scores = {"a": a, "b": b}

    def config(*overrides):
        return load_finetune_config(None, ["rewards.weights={a: 1.0, b: 2.0}", *overrides])

    raft = select_samples(scores, config("selection.strategy=raft"))
    assert raft == [(g, max(range(4), key=lambda k: (a[g, k], -k)), 1.0) for g in range(5)]

    fused_brute = np.zeros((5, 4))
    for name, w in (("a", 1.0), ("b", 2.0)):
        for g in range(5):
            for k in range(4):
                rank = sum(
                    1
                    for j in range(4)
                    if scores[name][g, j] > scores[name][g, k] or (scores[name][g, j] == scores[name][g, k] and j < k)
                )
                fused_brute[g, k] += w * (4 - 1 - rank)
    assemble = select_samples(scores, config("selection.strategy=assemble", "selection.top_fraction=0.6"))
    winners = [(g, max(range(4), key=lambda k: (fused_brute[g, k], -k))) for g in range(5)]
    kept = sorted(sorted(range(5), key=lambda g: (-fused_brute[g, winners[g][1]], g))[:3])
    assert assemble == [(g, winners[g][1], 1.0) for g in kept]
    assert [(g, k) for g, k, _ in assemble] == best_of_k(fuse(scores, "borda", {"a": 1.0, "b": 2.0}), 0.6)

    weighted = select_samples(scores, config("selection.strategy=weighted", "selection.weighting=minmax"))
    for g, k, w in weighted:
        span = a[g].max() - a[g].min()
        raw = (a[g, k] - a[g].min()) / span if span else 1.0
        total = sum(((a[g, j] - a[g].min()) / span if span else 1.0) for j in range(4))
        assert w == pytest.approx(raw * 4 / total) and w > 0
    assert len(weighted) == sum(
        1 for g in range(5) for k in range(4) if a[g].max() == a[g].min() or a[g, k] > a[g].min()
    )

    with pytest.raises(ValueError, match="missing"):
        select_samples({"a": np.full((1, 2), np.nan), "b": b[:1, :2]}, config("selection.strategy=raft"))


def test_select_samples_never_sees_a_monitored_reward():
    """The job's selection with a monitored reward among the scores is the selection without it, for every strategy;
    fusing it too would have picked other samples."""
    from services.selection import select_samples as select

    rng = np.random.default_rng(1)
    scores = {"a": rng.normal(size=(6, 4)), "b": rng.normal(size=(6, 4))}
    monitored = {**scores, "m": 10.0 * rng.normal(size=(6, 4))}
    for strategy in ("raft", "assemble", "weighted"):
        plain = load_finetune_config(None, ["rewards.weights={a: 1.0, b: 1.0}", f"selection.strategy={strategy}"])
        config = load_finetune_config(
            None, ["rewards.weights={a: 1.0, b: 1.0}", "rewards.monitor=[m]", f"selection.strategy={strategy}"]
        )
        assert select_samples(monitored, config) == select_samples(scores, plain)
    assemble = load_finetune_config(
        None, ["rewards.weights={a: 1.0, b: 1.0}", "rewards.monitor=[m]", "selection.strategy=assemble"]
    )
    assert select(monitored, "assemble", "a", weights={"a": 1.0, "b": 1.0}) != select_samples(monitored, assemble)


def test_a_flagged_round_prints_one_line_per_flagged_reward(capsys):
    from types import SimpleNamespace

    from trainer.worker import Worker

    config = load_finetune_config(None, ["rewards.weights={a: 1.0}", "rewards.monitor=[m, n]"])
    base = {"eval/a/mean": 1.0, "eval/a/se": 0.1, "eval/m/mean": 0.5, "eval/m/se": 0.05, "eval/n/mean": 0.5}
    base["eval/n/se"] = 0.05
    row = {"round": 3, "eval/a/mean": 1.5, "eval/m/mean": 0.3, "eval/n/mean": 0.5}
    row.update(reward_hacking(base, row, "a", ["m", "n"], config.rewards.hacking_k))
    Worker._log_hacking(SimpleNamespace(config=config), row, base)
    (line,) = capsys.readouterr().out.splitlines()  # m fell 4 SE; n did not move
    assert line == (
        "reward hacking? round 3: a (optimised) rose 1 -> 1.5 on held-out prompts while m (monitored) fell 0.5 -> "
        "0.3, 4.0 base SEs (rewards.hacking_k = 2)"
    )


def test_eval_stats_and_win_rate():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # 2 prompts x 3 seeds; per-seed means 2, 3, 4
    stats = eval_stats(scores)
    assert stats["mean"] == 3.0 and stats["max"] == 5.0
    assert stats["se"] == pytest.approx(1.0 / np.sqrt(3))
    assert win_rate(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 4.0])) == pytest.approx(0.5)


def test_one_round_on_the_testbed_world_with_a_served_reward(fleet, local_artifacts, tmp_path):
    """The local preset's world: its trained text-to-image model (loaded like SD 1.5), its prompt files, the served
    alignment reward, the oracle and fidelity every round. Sized down: 4 training prompts x K = 3, 4 held-out."""
    world = {k.removeprefix("world/"): v for k, v in local_artifacts.items() if k.startswith("world/")}
    train = tmp_path / "train.txt"
    train.write_text("\n".join(world["train_prompts"].read_text().splitlines()[:4]) + "\n")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("\n".join(world["heldout_prompts"].read_text().splitlines()[:4]) + "\n")
    config = load_finetune_config(
        None,
        [
            f"rewards.target={fleet.grpc_target}",
            "rewards.monitor=[jpeg_compressibility]",
            f"model.pretrained={world['text_to_image']}",
            "sampling.steps=4",
            "sampling.samples_per_prompt=3",
            f"prompts.train_file={train}",
            f"prompts.eval_file={heldout}",
            f"testbed.fidelity_clip={local_artifacts['tiny/clip']}",
            "testbed.fidelity_renders=4",
            "optim.epochs_per_round=1",
            "run.rounds=1",
            f"run.output_dir={tmp_path / 'world'}",
            "run.name=world",
        ],
    )
    assert config.rewards.primary == "alignment" and config.testbed.oracle
    rows = run_finetune(config).rows
    check_rows(rows, 1, ["alignment", "jpeg_compressibility"])
    for row in rows:
        # 4 held-out prompts x 2 seeds: accuracies are multiples of 1/8.
        for attr in ("all", "count", "color", "object", "background"):
            assert (8 * row[f"eval/oracle/{attr}/mean"]) == pytest.approx(round(8 * row[f"eval/oracle/{attr}/mean"]))
        assert 0.0 <= row["eval/fidelity/mean"] <= 2.0
    # The trained model draws the world: the oracle reads most held-out backgrounds (random weights read none).
    assert rows[0]["eval/oracle/background/mean"] >= 0.5
    assert rows[0]["selected"] == 4  # one winner per training prompt

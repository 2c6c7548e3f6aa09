"""The distributed fine-tuning job: sample, score over gRPC, rank and weight, fine-tune (Ray Train).

    rewardfleet train                                           # local preset against a running local fleet
    rewardfleet train --config trainer/configs/cluster.yaml --address auto

A `TorchTrainer` runs `train_loop_per_worker` on `run.num_workers` workers. Every round, each worker:

1. samples K images per prompt for its shard of the training prompts with the current weights (seeded per round,
   prompt and sample), batch by batch;
2. hands each batch to the reward applications in the background (trainer/scoring.py) and samples the next batch
   meanwhile; the held-out prompts are sampled too, from noise that is the same every round;
3. gathers every worker's scores and selects/weights samples (raft, assemble or weighted; services/selection.py),
   identically on every worker;
4. fine-tunes the UNet (LoRA adapters or all weights, DDP) with the per-sample weighted denoising loss
   (+ beta * denoising loss on pre-training pairs; trainer/losses.py), in model.dtype mixed precision
   (trainer/training.py: float32 trained weights, autocast, loss scaling for float16);
5. rank 0 writes a checkpoint (trainer/checkpoint.py: LoRA weights in diffusers' format, optimizer, loss scaler,
   next round, RNG state, metric history) and every worker calls `ray.train.report`.

Those steps are `Worker.run_round` (trainer/worker.py); this module is the driver: `run_finetune` starts the
`TorchTrainer`, and `train_loop_per_worker` is what each worker runs.

After the last round the held-out prompts are sampled once more, so the metrics hold rounds 0..R of evaluation:
round r is the model after r rounds of training, and round 0 is the base model.

On the testbed world's prompts, `testbed.oracle` and `testbed.fidelity_clip` add held-out metrics the job never
optimises (trainer/evaluation.py): the oracle's attribute accuracy, shown beside the held-out reward as rounds go,
and the distance to the world's renders. The driver checks that every held-out prompt is a testbed prompt first.

A worker that dies makes Ray Train restart the group (`run.max_failures`); the restarted workers load the latest
checkpoint and go on with the round after it, so no round is lost or repeated. Rerunning with the same
`run.output_dir` and `run.name` resumes the same way.

Outputs in `run.output_dir`: metrics.jsonl (one row per round; trainer/metrics.py), tensorboard/,
grids/round_XXX.png (held-out samples, base beside current), base_eval_images.npy (the base round's grid
images, for resumed runs), reward_curve.png, and ray/<name>/ (Ray Train's checkpoints).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from services.config import from_dict, replace, to_dict
from trainer.config import FinetuneConfig

# The job's public names, wherever they live (deploy/cli.py and deploy/demo.py import them from here).
from trainer.metrics import METRICS_FILE, ORACLE_ALL, improvement_summary, plot_reward_curve, read_metrics
from trainer.prompts import resolve_prompts
from trainer.worker import Worker

__all__ = [
    "FinetuneRun",
    "check_inputs",
    "improvement_summary",
    "read_metrics",
    "run_finetune",
    "train_loop_per_worker",
]


def train_loop_per_worker(config_dict: dict) -> None:
    """One Ray Train worker: rounds from the checkpoint's next round to the final evaluation."""
    from tqdm.auto import tqdm

    config = from_dict(FinetuneConfig, config_dict)
    worker = Worker(config)
    primary = config.rewards.primary
    try:
        bar = tqdm(range(worker.state["next_round"], config.run.rounds + 1), desc="rounds", disable=not worker.is_main)
        for rnd in bar:
            row = worker.run_round(rnd)
            postfix = {f"held-out {primary}": f"{row[f'eval/{primary}/mean']:.4g}"}
            if ORACLE_ALL in row:
                postfix["oracle all"] = f"{row[ORACLE_ALL]:.3f}"
            bar.set_postfix(postfix)
    finally:
        worker.close()


# --- The driver --------------------------------------------------------------------------------------------------


def check_inputs(config: FinetuneConfig) -> None:
    """What the job reads that can be checked before any worker starts (so a mistake fails here, once, before any
    sampling, not in every worker): the prompt files, and with `testbed` metrics on, that every held-out prompt is
    a testbed prompt and that the fidelity CLIP's directory exists.

    Raises:
        ValueError: a bad prompt file, or a held-out prompt that is not a testbed prompt (the first one is named).
        FileNotFoundError: a prompt file or `testbed.fidelity_clip` does not exist.
    """
    from services.models import resolve_model_source
    from trainer.evaluation import parse_testbed_prompts

    _, eval_prompts = resolve_prompts(config.prompts, config.run.seed)
    testbed = config.testbed
    if testbed.enabled:
        field = "testbed.oracle" if testbed.oracle else "testbed.fidelity_clip"
        try:
            parse_testbed_prompts(eval_prompts)
        except ValueError as e:
            raise ValueError(f"{field} needs testbed prompts: {e}") from None
    if testbed.fidelity_clip is not None:
        resolve_model_source(testbed.fidelity_clip, "testbed.fidelity_clip")


@dataclass
class FinetuneRun:
    output_dir: Path
    # The latest checkpoint directory (Ray Train storage), None if no round finished.
    checkpoint: Path | None
    # metrics.jsonl rows, rounds 0..R.
    rows: list[dict]


def _watch_metrics(path: Path, on_round, stop) -> None:
    """Calls `on_round(row)` for each row appended to metrics.jsonl until `stop` is set (polling; rank 0 writes it).

    A resumed run rewrites the file from its checkpoint first, so rows are tracked by round number."""
    seen: set[int] = set()
    while True:
        done = stop.wait(1.0)
        for row in read_metrics(path.parent):
            if row["round"] not in seen:
                seen.add(row["round"])
                on_round(row)
        if done:
            return


def run_finetune(config: FinetuneConfig, on_round=None) -> FinetuneRun:
    """Runs the job on the connected Ray cluster (`ray.init` first) and returns its outputs.

    `on_round(row)`, if given, is called on the driver with each round's metrics row as the job writes it.

    Raises:
        ValueError, FileNotFoundError: bad inputs (`check_inputs`, before anything starts).
        trainer.scoring.RewardRoundError: a reward application is not reachable (checked before starting workers).
        ray.train.TrainingFailedError: the job failed more than run.max_failures times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainer.scoring import BackgroundScorer

    output_dir = Path(config.run.output_dir).expanduser().resolve()
    config = replace(config, run=replace(config.run, output_dir=str(output_dir)))
    check_inputs(config)
    scorer = BackgroundScorer(config.rewards)
    try:
        scorer.check()
    finally:
        scorer.close()

    resources = {"CPU": config.run.cpus_per_worker, **config.run.worker_resources}
    if config.run.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=to_dict(config),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.run.num_workers, use_gpu=config.run.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=str(output_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
        ),
    )
    stop = threading.Event()
    watcher = None
    if on_round is not None:
        watcher = threading.Thread(
            target=_watch_metrics, args=(output_dir / METRICS_FILE, on_round, stop), daemon=True
        )
        watcher.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    rows = read_metrics(output_dir)
    if rows:
        plot_reward_curve(rows, list(config.rewards.weights), output_dir / "reward_curve.png")
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    return FinetuneRun(output_dir=output_dir, checkpoint=checkpoint, rows=rows)

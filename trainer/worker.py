"""One Ray Train worker of the fine-tuning job: its state across rounds, and `run_round`, one round in numbered steps.

Every worker samples its shard of the prompts; the scores are gathered so that every worker selects the same
samples, then all of them train one DDP model; rank 0 writes the checkpoint, the metrics and the grids.

Monitored rewards (`rewards.monitor`) are scored and logged like the optimised ones but never reach selection; each
round's row flags reward hacking against round 0 (trainer/metrics.py, `reward_hacking`). Rank 0 keeps the base
model's held-out images shown in the grids in `run.output_dir`/base_eval_images.npy, so a resumed run still draws
base vs current.

On the testbed world's prompts (config section `testbed`), each round's row also holds the oracle's attribute
accuracy and the fidelity to the world's renders of the held-out images (trainer/evaluation.py): rank 0 computes them
on every worker's images and shares them, so every worker's row and history stay the same.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer.checkpoint import load_checkpoint, rng_state, write_checkpoint
from trainer.config import FinetuneConfig
from trainer.evaluation import Fidelity, oracle_metrics
from trainer.metrics import (
    GRID_PROMPTS,
    GRID_SEEDS,
    METRICS_FILE,
    gather_eval_images,
    reward_hacking,
    round_row,
    save_eval_grid,
)
from trainer.prompts import resolve_prompts
from trainer.training import (
    DenoisingBatch,
    encode_images,
    encode_pretrain_pairs,
    encode_prompts,
    setup_training,
    train_step,
)

FAULT_MARKER = ".fault_injected"
# Rank 0's copy of the base model's (round 0) held-out images shown in the grids: (prompts, seeds, H, W, 3) uint8.
BASE_IMAGES_FILE = "base_eval_images.npy"


def all_gather(obj: Any) -> list[Any]:
    """Every worker's `obj`, in rank order; [obj] when there is a single process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def select_samples(scores: dict[str, np.ndarray], config: FinetuneConfig) -> list[tuple[int, int, float]]:
    """The round's training samples as (prompt, sample, loss weight), as `config.selection` says.

    scores: reward -> (prompts, K); only the optimised rewards (`rewards.weights`) are used, so a monitored one
    (`rewards.monitor`) is never selected by nor fused."""
    from services.selection import select_samples as select

    sel = config.selection
    return select(
        {name: scores[name] for name in config.rewards.weights},
        sel.strategy,
        config.rewards.primary,
        weights=config.rewards.weights,
        top_fraction=sel.top_fraction,
        fusion=sel.fusion,
        rrf_k=sel.rrf_k,
        weighting=sel.weighting,
        temperature=sel.temperature,
    )


# One line per worker start in run.output_dir: rank, Ray node id, attempt.
WORKERS_LOG = "workers.log"


class Worker:
    """The state of one Ray Train worker across rounds; `run_round` is one round."""

    def __init__(self, config: FinetuneConfig):
        import ray
        import ray.train
        import ray.train.torch
        import torch

        from trainer.scoring import BackgroundScorer

        self.config = config
        run, optim = config.run, config.optim
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.is_main = self.rank == 0
        torch.set_num_threads(run.torch_threads or max(1, int(run.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        self.output_dir = Path(run.output_dir)
        self.rewards = config.rewards.scored  # optimised, then monitored

        # The pipeline; only the UNet's adapters (or the whole UNet) train.
        self.setup = setup_training(config, self.device)
        self.pipe = self.setup.pipe
        self.train_prompts, self.eval_prompts = resolve_prompts(config.prompts, run.seed)
        self.my_train = list(range(self.rank, len(self.train_prompts), self.world))  # this worker's prompt indices
        self.my_eval = list(range(self.rank, len(self.eval_prompts), self.world))
        # Held-out metrics of the testbed world: rank 0 computes them (the driver has checked the prompts parse).
        self.fidelity = None
        if self.is_main and config.testbed.fidelity_clip is not None:
            testbed = config.testbed
            self.fidelity = Fidelity(
                testbed.fidelity_clip,
                self.eval_prompts,
                config.model.resolution,
                testbed.fidelity_renders,
                run.seed,
                device=self.device,
            )

        # Resume: the run's own latest checkpoint, else run.resume_from.
        self.state: dict[str, Any] = {"next_round": 0, "base_eval": None, "history": [], "starts": 0}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and run.resume_from:
            checkpoint = ray.train.Checkpoint(run.resume_from)
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.state = load_checkpoint(Path(directory), self.setup, optim.method, self.rank)
        self.state["starts"] += 1
        # Where each worker of each attempt ran (rank, Ray node id, attempt): after a lost node, where it went.
        node_id = ray.get_runtime_context().get_node_id()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / WORKERS_LOG, "a") as log:
            log.write(f"{self.rank} {node_id} attempt={self.state['starts']}\n")
        base_eval = self.state["base_eval"]
        unscored = [name for name in self.rewards if base_eval is not None and name not in base_eval]
        if unscored:
            raise ValueError(
                f"rewards {unscored} were not scored in round 0 of the run this one resumes, so there is no base to "
                "compare them with: start a new run (another run.name) to add them"
            )
        # DDP wrapper for training; sampling goes through self.pipe.unet, the same parameters.
        self.unet = ray.train.torch.prepare_model(self.pipe.unet) if self.world > 1 else self.pipe.unet
        self.pretrain_latents, self.pretrain_prompts = (
            encode_pretrain_pairs(
                self.setup, optim.pretrain_data, config.model.resolution, config.sampling.decode_batch_size
            )
            if optim.beta > 0
            else (None, None)
        )
        self.scorer = BackgroundScorer(config.rewards)
        self.embed_cache: dict = {}
        self.writer = None
        self.base_images = None  # rank 0: round 0's held-out images shown in the grids
        if self.is_main:
            base_file = self.output_dir / BASE_IMAGES_FILE
            if self.state["next_round"] > 0 and base_file.exists():
                self.base_images = np.load(base_file)
            # The checkpoint's history is the truth: drop rows a crashed attempt wrote after its last checkpoint.
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / METRICS_FILE, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.state["history"])
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.state["next_round"])

    def close(self) -> None:
        self.scorer.close()
        if self.writer is not None:
            self.writer.close()

    def run_round(self, rnd: int) -> dict:
        """One round: sample, score, select, train, checkpoint, log. The round after the last one only evaluates
        (held-out prompts, no training, no checkpoint), so the metrics hold rounds 0..R of evaluation."""
        import ray.train
        import torch

        final = rnd == self.config.run.rounds
        round_start = time.perf_counter()
        self.scorer.wait_s = 0.0

        # 1. sample: this worker's shard of the training prompts (K each; none in the final round) and of the held-out
        #    prompts (fixed noise), batch by batch;
        # 2. score (async): each batch goes to the rewards as soon as it is sampled, and is scored while the next one
        #    is sampled. Then wait for the last batches and share every worker's scores.
        sampled = self._sample_and_submit(rnd, final)
        scores = self._gather_scores(self.scorer.collect(), sampled["n_train"], final)

        # 3. select/weight: identically on every worker (same scores, deterministic ties).
        # 4. update: fine-tune on the picks (DDP: every worker runs the same number of steps).
        picks, loss, train_s = [], float("nan"), 0.0
        if not final:
            picks = select_samples(scores["train"], self.config)
            t0 = time.perf_counter()
            loss = self._train(rnd, picks, torch.cat(sampled["latents"]) if sampled["latents"] else None)
            train_s = time.perf_counter() - t0

        # 5. metrics: every worker's timings and held-out images; the base model's scores are round 0's.
        round_s = time.perf_counter() - round_start
        timing = {
            "sample_s": sampled["sample_s"],
            "wait_s": self.scorer.wait_s,
            "train_s": train_s,
            "round_s": round_s,
        }
        if self.device.type == "cuda":  # the worker's peak so far: sampling, VAE decode and training
            timing["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        timings = all_gather(timing)
        eval_images = all_gather((self.my_eval, np.concatenate(sampled["eval_images"]) if self.my_eval else None))
        # (prompts, eval seeds, H, W, 3) uint8 on rank 0, which draws the grids and computes the testbed metrics
        held_out = (
            gather_eval_images(eval_images, len(self.eval_prompts), self.config.prompts.eval_seeds)
            if self.is_main
            else None
        )
        if self.state["base_eval"] is None:
            self.state["base_eval"] = {n: scores["eval"][n].tolist() for n in self.rewards}
        row = round_row(rnd, final, scores, self.state["base_eval"], picks, loss, timings, self.state["starts"])
        #    The testbed world's held-out metrics (oracle, fidelity), when configured.
        row.update(self._testbed_metrics(held_out))
        #    Reward hacking: the optimised reward up, a monitored one down, against the base model's row.
        rewards = self.config.rewards
        base_row = self.state["history"][0] if self.state["history"] else row
        row.update(reward_hacking(base_row, row, rewards.primary, rewards.monitor, rewards.hacking_k))
        if self.is_main:
            self._log_hacking(row, base_row)
        self.state["history"].append(row)
        self.state["next_round"] = rnd + 1

        # 6. checkpoint (rank 0, not after the final evaluation) and report (every worker).
        rng_states = all_gather(rng_state())
        if self.is_main:
            self._save_grid(rnd, held_out, scores["eval"][rewards.primary])
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.is_main and not final:
                write_checkpoint(Path(tmp), self.setup, self.config.optim.method, self.state, rng_states)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, int | float)}, checkpoint=checkpoint)
        if not final:
            # Ray Train registers a reported checkpoint asynchronously. Wait until it is committed, so a failure in
            # the next round resumes from this one instead of repeating it.
            from ray.train import CheckpointConsistencyMode

            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

        # 7. log (rank 0): metrics.jsonl and TensorBoard.
        if self.is_main:
            with open(self.output_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, rnd)
            self.writer.flush()
        return row

    def _log_hacking(self, row: dict, base: dict) -> None:
        """One line per flagged monitored reward; printed, so Ray forwards it to the driver."""
        rewards = self.config.rewards
        opt = rewards.primary
        for name in rewards.monitor:
            if row[f"hacking/{name}"]:
                print(
                    f"reward hacking? round {row['round']}: {opt} (optimised) rose "
                    f"{base[f'eval/{opt}/mean']:.4g} -> {row[f'eval/{opt}/mean']:.4g} on held-out prompts while "
                    f"{name} (monitored) fell {base[f'eval/{name}/mean']:.4g} -> {row[f'eval/{name}/mean']:.4g}, "
                    f"{row[f'hacking/{name}/drop_se']:.1f} base SEs (rewards.hacking_k = {rewards.hacking_k:g})",
                    flush=True,
                )

    def _testbed_metrics(self, held_out: np.ndarray | None) -> dict[str, float]:
        """The oracle's and the fidelity metrics of this round's held-out images (trainer/evaluation.py), computed
        by rank 0 (`held_out`: every held-out image, None on the other ranks) and shared with every worker, so
        their rows agree; {} when `testbed` configures neither. Every worker must call it."""
        testbed = self.config.testbed
        if not testbed.enabled:
            return {}
        metrics = None
        if self.is_main:
            images = held_out.reshape(-1, *held_out.shape[2:])  # (prompts * eval seeds, H, W, 3) uint8
            prompts = [p for p in self.eval_prompts for _ in range(held_out.shape[1])]  # prompt-major, as images
            metrics = oracle_metrics(images, prompts) if testbed.oracle else {}
            if self.fidelity is not None:
                metrics.update(self.fidelity(images, prompts))
        return all_gather(metrics)[0]

    def _save_grid(self, rnd: int, images: np.ndarray, primary_scores: np.ndarray) -> None:
        """Rank 0: grids/round_XXX.png, this round's held-out images (prompts, seeds, H, W, 3) beside the base
        model's (same noise)."""
        primary = self.config.rewards.primary
        if rnd == 0:
            self.base_images = images[:GRID_PROMPTS, :GRID_SEEDS]
            np.save(self.output_dir / BASE_IMAGES_FILE, self.base_images)
        save_eval_grid(
            images,
            primary_scores,
            self.eval_prompts,
            self.output_dir / "grids" / f"round_{rnd:03d}.png",
            reward=primary,
            rnd=rnd,
            base_images=self.base_images,
            base_rewards=np.array(self.state["base_eval"][primary]),  # (P, E)
        )

    def _sample_and_submit(self, rnd: int, final: bool) -> dict:
        """Samples this worker's training shard (K per prompt; none in the final round) and held-out shard, batch by
        batch, handing each batch to the rewards before sampling the next. Returns the training latents, held-out
        images, sampling time and the number of training images (the scorer returns training scores first)."""
        from trainer.sampling import STREAM_EVAL, STREAM_TRAIN, sample_images, sample_seed

        run, sampling = self.config.run, self.config.sampling
        k, e = sampling.samples_per_prompt, self.config.prompts.eval_seeds
        jobs = []  # (kind, prompts, seeds)
        for kind, shard, prompts, n in (
            ("train", [] if final else self.my_train, self.train_prompts, k),
            ("eval", self.my_eval, self.eval_prompts, e),
        ):
            for start in range(0, len(shard), sampling.prompts_per_batch):
                gs = shard[start : start + sampling.prompts_per_batch]
                # Training noise changes every round; held-out noise is the same every round.
                seeds = [
                    sample_seed(run.seed, STREAM_TRAIN, rnd, g, j)
                    if kind == "train"
                    else sample_seed(run.seed, STREAM_EVAL, g, j)
                    for g in gs
                    for j in range(n)
                ]
                jobs.append((kind, [prompts[g] for g in gs for _ in range(n)], seeds))
        out = {"latents": [], "eval_images": [], "sample_s": 0.0}
        out["n_train"] = sum(len(j[1]) for j in jobs if j[0] == "train")
        self.pipe.unet.eval()
        for i, (kind, prompts, seeds) in enumerate(jobs):
            self._maybe_inject_fault(rnd, i, len(jobs))
            t0 = time.perf_counter()
            samples = sample_images(self.pipe, prompts, seeds, sampling, self.config.model.resolution)
            out["sample_s"] += time.perf_counter() - t0
            self.scorer.submit(samples.images, prompts, [f"r{rnd}-{kind}{i}-{j}" for j in range(len(prompts))])
            if kind == "train":
                out["latents"].append(encode_images(self.pipe, samples.images, sampling.decode_batch_size))
            else:
                out["eval_images"].append(samples.images)
        return out

    def _maybe_inject_fault(self, rnd: int, job: int, jobs: int) -> None:
        run = self.config.run
        if run.fail_at_round == rnd and self.rank == self.world - 1 and job == jobs // 2:
            marker = self.output_dir / FAULT_MARKER
            if not marker.exists():
                marker.write_text(f"worker {self.rank} exited in round {rnd}\n")
                os._exit(1)  # an abrupt death, as from a lost node: no cleanup, no exception

    def _gather_scores(self, flat: dict, n_train: int, final: bool) -> dict[str, dict[str, np.ndarray]]:
        """Every worker's scores as kind ("train", "eval") -> reward -> (prompts, K or eval seeds), global order.

        flat: this worker's scores, reward -> (n_train + n_eval,) in sampling order (training batches first)."""
        mine = {"train": {n: v[:n_train] for n, v in flat.items()}, "eval": {n: v[n_train:] for n, v in flat.items()}}
        shards = all_gather((self.my_train, self.my_eval, mine))
        k, e = self.config.sampling.samples_per_prompt, self.config.prompts.eval_seeds
        grids: dict[str, dict[str, np.ndarray]] = {}
        for kind, width, total, slot in (
            ("train", k, len(self.train_prompts), 0),
            ("eval", e, len(self.eval_prompts), 1),
        ):
            if final and kind == "train":
                continue
            grids[kind] = {}
            for name in self.rewards:
                grid = np.full((total, width), np.nan)  # a NaN left over would make selection raise
                for shard in shards:
                    idx = shard[slot]
                    grid[idx] = shard[2][kind][name].reshape(len(idx), width)
                grids[kind][name] = grid
        return grids

    def _train(self, rnd: int, picks: list[tuple[int, int, float]], my_latents) -> float:
        """Fine-tunes on the picked samples; returns the mean loss. Every worker runs the same number of steps (DDP),
        each on its slice of one shared shuffle of the picks."""
        import torch

        from trainer.sampling import STREAM_TIMESTEPS, sample_seed

        run, optim, k = self.config.run, self.config.optim, self.config.sampling.samples_per_prompt
        # Each worker contributes the latents of the picks it sampled; every worker gets them all.
        position = {g: i for i, g in enumerate(self.my_train)}
        owned = {(g, j): my_latents[position[g] * k + j] for g, j, _ in picks if g in position}
        gathered: dict = {}
        for part in all_gather(owned):
            gathered.update(part)
        items = [(gathered[(g, j)], self.train_prompts[g], w) for g, j, w in picks]

        order_rng = np.random.default_rng(sample_seed(run.seed, STREAM_TIMESTEPS, rnd))
        order = np.concatenate([order_rng.permutation(len(items)) for _ in range(optim.epochs_per_round)])
        steps = max(1, math.ceil(len(order) / (self.world * optim.batch_size)))
        generator = torch.Generator(device="cpu").manual_seed(sample_seed(run.seed, STREAM_TIMESTEPS, rnd, self.rank))
        timesteps = self.setup.noise_scheduler.config.num_train_timesteps
        losses = []
        self.pipe.unet.train()
        for step in range(steps):
            first = (step * self.world + self.rank) * optim.batch_size
            batch = [items[order[(first + b) % len(order)]] for b in range(optim.batch_size)]
            x0 = torch.stack([b[0] for b in batch]).to(self.device)  # (B, C, h, w) float32
            weights = torch.tensor([b[2] for b in batch], device=self.device)  # (B,)
            noise = torch.randn(x0.shape, generator=generator).to(self.device)  # (B, C, h, w)
            t = torch.randint(0, timesteps, (len(batch),), generator=generator).to(self.device)  # (B,)
            samples = DenoisingBatch(x0, self._encode_prompts([b[1] for b in batch]), noise, t)
            pretrain = None
            if self.pretrain_latents is not None:
                idx = torch.randint(0, len(self.pretrain_latents), (optim.batch_size,), generator=generator)
                px0 = self.pretrain_latents[idx].to(self.device)  # (B, C, h, w)
                pcond = self._encode_prompts([self.pretrain_prompts[i] for i in idx.tolist()])
                pnoise = torch.randn(px0.shape, generator=generator).to(self.device)
                pt = torch.randint(0, timesteps, (len(idx),), generator=generator).to(self.device)
                pretrain = DenoisingBatch(px0, pcond, pnoise, pt)
            losses.append(train_step(self.setup, self.unet, samples, weights, optim, pretrain))
        self.pipe.unet.eval()
        return float(np.mean(losses))

    def _encode_prompts(self, prompts: list[str]):
        """(B, L, D) text-encoder states of `prompts`."""
        return encode_prompts(self.pipe, prompts, self.embed_cache)

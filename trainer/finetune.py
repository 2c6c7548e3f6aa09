"""The distributed fine-tuning job: sample, score over gRPC, rank and weight, fine-tune (Ray Train).

    rewardfleet train                                           # local preset against a running local fleet
    rewardfleet train --config trainer/configs/cluster.yaml --address auto

A `TorchTrainer` runs `train_loop_per_worker` on `run.num_workers` workers. Every round, each worker:

1. samples K images per prompt for its shard of the training prompts with the current weights (seeded per round,
   prompt and sample), batch by batch;
2. hands each batch to the reward applications in the background (trainer/scoring.py) and samples the next batch
   meanwhile; the held-out prompts are sampled too, from noise that is the same every round;
3. gathers every worker's scores and selects/weights samples (raft, assemble or weighted; trainer/selection.py),
   identically on every worker;
4. fine-tunes the UNet (LoRA adapters or all weights, DDP) with the per-sample weighted denoising loss
   (+ beta * denoising loss on pre-training pairs; trainer/losses.py), in model.dtype mixed precision
   (`train_step`: fp32 trained weights, autocast, loss scaling for fp16);
5. rank 0 writes a checkpoint (LoRA weights in diffusers' format, optimizer, loss scaler, next round, RNG state,
   metric history) and every worker calls `ray.train.report`.

After the last round the held-out prompts are sampled once more, so the metrics hold rounds 0..R of evaluation:
round r is the model after r rounds of training, and round 0 is the base model.

A worker that dies makes Ray Train restart the group (`run.max_failures`); the restarted workers load the latest
checkpoint and go on with the round after it, so no round is lost or repeated. Rerunning with the same
`run.output_dir` and `run.name` resumes the same way.

Outputs in `run.output_dir`: metrics.jsonl (one row per round), tensorboard/, grids/round_XXX.png (held-out
samples), reward_curve.png, and ray/<name>/ (Ray Train's checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.config import from_dict, to_dict
from trainer.config import FinetuneConfig, PromptsConfig
from trainer.prompts import generate_prompts, load_prompts, split_train_eval

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
# GradScaler state (loss scale, growth tracker); empty unless model.dtype is fp16.
SCALER_FILE = "grad_scaler.pt"
RNG_FILE = "rng.pt"
LORA_DIR = "lora"
UNET_DIR = "unet"
FAULT_MARKER = ".fault_injected"


def resolve_prompts(config: PromptsConfig, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), disjoint."""
    if config.eval_file:
        train = load_prompts(config.train_file) if config.train_file else generate_prompts(config.generate, seed)
        evals = list(dict.fromkeys(load_prompts(config.eval_file)))
        overlap = sorted(set(train) & set(evals))
        if overlap:
            raise ValueError(f"{len(overlap)} held-out prompt(s) are also training prompts, e.g. {overlap[0]!r}")
        return list(dict.fromkeys(train)), evals
    pool = (
        load_prompts(config.train_file)
        if config.train_file
        else generate_prompts(config.generate + config.eval_count, seed)
    )
    return split_train_eval(pool, config.eval_count, seed)


# --- Collectives (no-ops when there is a single process) ------------------------------------------------------


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- Metrics -----------------------------------------------------------------------------------------------------


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


# --- The model under training and one optimizer step (mixed precision) -----------------------------------------


@dataclass
class TrainingSetup:
    """The pipeline being fine-tuned and what trains it; built by `setup_training` for the job and the tests."""

    pipe: Any
    # The trainable parameters (fp32): LoRA adapters, or every UNet weight under method=full.
    params: list
    optimizer: Any
    # torch.amp.GradScaler, enabled for fp16 only (bf16 has fp32's exponent range: its gradients do not underflow).
    scaler: Any
    # DDPMScheduler of the pipeline's noise schedule (the training objective's forward process).
    noise_scheduler: Any
    # The frozen weights' and the autocast compute dtype (model.dtype resolved for the device).
    dtype: Any


def setup_training(config: FinetuneConfig, device="cpu") -> TrainingSetup:
    """Loads the pipeline in model.dtype, adds the trainable fp32 parameters, and builds AdamW and the GradScaler.

    Mixed precision as diffusers' training scripts do it: frozen weights in model.dtype, trained ones in fp32, the
    forward under autocast (train_step), and loss scaling for fp16.
    """
    import torch
    from diffusers import DDPMScheduler

    from trainer.sampling import add_lora, load_pipeline, resolve_dtype, set_scheduler

    optim = config.optim
    dtype = resolve_dtype(config.model.dtype, device)
    torch.manual_seed(config.run.seed)  # identical LoRA init on every worker (DDP also broadcasts rank 0's)
    pipe = load_pipeline(config.model, device)
    set_scheduler(pipe, config.sampling)
    params = add_lora(pipe.unet, optim)
    return TrainingSetup(
        pipe=pipe,
        params=params,
        optimizer=torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay),
        scaler=torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16),
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        dtype=dtype,
    )


@dataclass
class DenoisingBatch:
    """Inputs of the denoising loss for B samples."""

    # (B, C, h, w) clean latents, scaled as the UNet sees them (fp32).
    latents: Any
    # (B, L, D) text-encoder states (model.dtype).
    cond: Any
    # (B, C, h, w) Gaussian noise.
    noise: Any
    # (B,) integer timesteps.
    timesteps: Any


def encode_prompts(pipe, prompts: list[str], cache: dict):
    """(B, L, D) text-encoder states of `prompts`; the encoder is frozen, so each distinct prompt is encoded once."""
    import torch

    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(missing, pipe.device, 1, do_classifier_free_guidance=False)
        cache.update(zip(missing, embeds, strict=True))
    return torch.stack([cache[p] for p in prompts])


def train_step(setup: TrainingSetup, model, batch: DenoisingBatch, weights, optim, pretrain=None) -> float:
    """One optimizer step on the reward-weighted denoising loss (+ beta * the pre-training pairs' loss); returns it.

    model: setup.pipe.unet or its DDP wrapper; weights: (B,) per-sample loss weights; optim: OptimConfig;
    pretrain: a DenoisingBatch of pre-training pairs when optim.beta > 0.
    """
    import torch

    from trainer.losses import denoising_loss_per_sample, reward_weighted_loss
    from trainer.sampling import autocast

    def losses(b: DenoisingBatch):  # (B,) fp32
        with autocast(setup.pipe.device, setup.dtype):
            return denoising_loss_per_sample(model, setup.noise_scheduler, b.latents, b.cond, b.noise, b.timesteps)

    # 1. Forward: every layer computes in model.dtype; the fp32 trained weights are cast per op by autocast.
    setup.optimizer.zero_grad(set_to_none=True)
    model_losses = losses(batch)
    pre_losses = losses(pretrain) if pretrain is not None else None
    loss = reward_weighted_loss(model_losses, weights, pre_losses, optim.beta)
    # 2. Backward of the scaled loss (fp16: small gradients would flush to zero in the half activations' backward;
    # a disabled scaler passes the loss through).
    setup.scaler.scale(loss).backward()
    # 3. Unscale before clipping, so max_grad_norm applies to the true gradients.
    setup.scaler.unscale_(setup.optimizer)
    torch.nn.utils.clip_grad_norm_(setup.params, optim.max_grad_norm)
    # 4. Step, unless the scaled gradients overflowed (the scaler then skips it and lowers the scale).
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    return loss.item()


# --- The worker ------------------------------------------------------------------------------------------------


def _load_checkpoint(directory: Path, setup: TrainingSetup, method: str, rank: int) -> dict:
    """Loads a checkpoint into `setup` (its tensors onto the setup's device, wherever they were saved from) and
    restores this rank's RNG state; returns the job state."""
    import torch

    from trainer.sampling import load_lora_into

    unet, device = setup.pipe.unet, setup.pipe.device
    if method == "lora":
        load_lora_into(unet, directory / LORA_DIR)
    else:
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(directory / UNET_DIR).state_dict())
    # Without map_location every worker would load the optimizer state onto the device it was saved from (cuda:0).
    setup.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=False))
    scaler_path = directory / SCALER_FILE
    if setup.scaler.is_enabled() and scaler_path.exists():
        state = torch.load(scaler_path, map_location="cpu", weights_only=False)
        if state:  # empty when saved by a run without loss scaling (fp32 / bf16)
            setup.scaler.load_state_dict(state)
    rng = torch.load(directory / RNG_FILE, map_location="cpu", weights_only=False)  # set_rng_state wants CPU
    if rank < len(rng):
        random.setstate(rng[rank]["python"])
        np.random.set_state(rng[rank]["numpy"])
        torch.set_rng_state(rng[rank]["torch"])
    return json.loads((directory / STATE_FILE).read_text())


def _write_checkpoint(directory: Path, setup: TrainingSetup, method: str, state: dict, rng_states: list) -> None:
    import torch

    from trainer.sampling import save_lora

    if method == "lora":
        save_lora(setup.pipe.unet, directory / LORA_DIR)
    else:
        setup.pipe.unet.save_pretrained(directory / UNET_DIR)
    torch.save(setup.optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(setup.scaler.state_dict(), directory / SCALER_FILE)
    torch.save(rng_states, directory / RNG_FILE)
    (directory / STATE_FILE).write_text(json.dumps(state))


def _rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def select_samples(scores: dict[str, np.ndarray], config: FinetuneConfig) -> list[tuple[int, int, float]]:
    """The round's training samples as (prompt, sample, loss weight), as `config.selection` says."""
    from services.selection import select_samples as select

    sel = config.selection
    return select(
        scores,
        sel.strategy,
        config.rewards.primary,
        weights=config.rewards.weights,
        top_fraction=sel.top_fraction,
        fusion=sel.fusion,
        rrf_k=sel.rrf_k,
        weighting=sel.weighting,
        temperature=sel.temperature,
    )


class _Worker:
    """The state of one Ray Train worker across rounds; `run_round` is one round (see the module docstring)."""

    def __init__(self, config: FinetuneConfig):
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
        self.rewards = list(config.rewards.weights)

        # The pipeline; only the UNet's adapters (or the whole UNet) train.
        self.setup = setup_training(config, self.device)
        self.pipe = self.setup.pipe
        self.train_prompts, self.eval_prompts = resolve_prompts(config.prompts, run.seed)
        self.my_train = list(range(self.rank, len(self.train_prompts), self.world))  # this worker's prompt indices
        self.my_eval = list(range(self.rank, len(self.eval_prompts), self.world))

        # Resume: the run's own latest checkpoint, else run.resume_from.
        self.state: dict[str, Any] = {"next_round": 0, "base_eval": None, "history": [], "starts": 0}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and run.resume_from:
            checkpoint = ray.train.Checkpoint(run.resume_from)
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.state = _load_checkpoint(Path(directory), self.setup, optim.method, self.rank)
        self.state["starts"] += 1
        # DDP wrapper for training; sampling goes through self.pipe.unet, the same parameters.
        self.unet = ray.train.torch.prepare_model(self.pipe.unet) if self.world > 1 else self.pipe.unet
        self.pretrain_latents, self.pretrain_prompts = self._encode_pretrain() if optim.beta > 0 else (None, None)
        self.scorer = BackgroundScorer(config.rewards)
        self.embed_cache: dict = {}
        self.writer = None
        if self.is_main:
            # The checkpoint's history is the truth: drop rows a crashed attempt wrote after its last checkpoint.
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.state["history"])
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.state["next_round"])

    def _encode_pretrain(self):
        """VAE latents (N, C, h, w) of the pre-training pairs (one posterior sample, seeded) and their prompts."""
        import torch

        from trainer.pretrain_data import load_pretrain_pairs

        images, prompts = load_pretrain_pairs(self.config.optim.pretrain_data, self.config.model.resolution)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (N, 3, H, W) in [-1, 1]
        vae = self.pipe.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            generator = torch.Generator(device="cpu").manual_seed(self.config.run.seed)
            noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            latents = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
        return latents.float().cpu(), prompts

    def close(self) -> None:
        self.scorer.close()
        if self.writer is not None:
            self.writer.close()

    # 1-2. Sampling, with scoring in the background.
    def _sample_and_score(self, rnd: int, final: bool) -> dict:
        """Samples this worker's training shard (K per prompt; none in the final round) and held-out shard, batch by
        batch, handing each batch to the rewards while the next one is sampled. Returns latents, images, scores."""
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
        out = {"latents": {"train": [], "eval": []}, "images": {"train": [], "eval": []}, "sample_s": 0.0}
        self.pipe.unet.eval()
        for i, (kind, prompts, seeds) in enumerate(jobs):
            self._maybe_inject_fault(rnd, i, len(jobs))
            t0 = time.perf_counter()
            samples = sample_images(self.pipe, prompts, seeds, sampling, self.config.model.resolution)
            out["sample_s"] += time.perf_counter() - t0
            self.scorer.submit(samples.images, prompts, [f"r{rnd}-{kind}{i}-{j}" for j in range(len(prompts))])
            out["latents"][kind].append(samples.latents)
            out["images"][kind].append(samples.images)
        # 3. Collect the scores: only the last batches are still in flight.
        flat = self.scorer.collect()  # name -> (n_train + n_eval,), in job order
        n_train = sum(len(j[1]) for j in jobs if j[0] == "train")
        out["scores"] = {
            "train": {n: v[:n_train] for n, v in flat.items()},
            "eval": {n: v[n_train:] for n, v in flat.items()},
        }
        return out

    def _maybe_inject_fault(self, rnd: int, job: int, jobs: int) -> None:
        run = self.config.run
        if run.fail_at_round == rnd and self.rank == self.world - 1 and job == jobs // 2:
            marker = self.output_dir / FAULT_MARKER
            if not marker.exists():
                marker.write_text(f"worker {self.rank} exited in round {rnd}\n")
                os._exit(1)  # an abrupt death, as from a lost node: no cleanup, no exception

    def _gather_scores(self, mine: dict, final: bool) -> dict[str, dict[str, np.ndarray]]:
        """Every worker's scores as kind ("train", "eval") -> reward -> (prompts, K or eval seeds), global order."""
        shards = _all_gather((self.my_train, self.my_eval, mine))
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

    # 4-5. Selection and fine-tuning.
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
        for part in _all_gather(owned):
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
            x0 = torch.stack([b[0] for b in batch]).to(self.device)  # (B, C, h, w) fp32
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

    # 6. Metrics, checkpoint, report.
    def _metrics(self, rnd: int, final: bool, scores: dict, picks: list, loss: float, timings: list[dict]) -> dict:
        row: dict[str, Any] = {"round": rnd, "final": final, "selected": len(picks), "loss": loss}
        for name in self.rewards:
            if not final:
                row[f"train/{name}/mean"] = float(np.mean(scores["train"][name]))
                row[f"train/{name}/max"] = float(np.max(scores["train"][name]))
            for key, value in eval_stats(scores["eval"][name]).items():
                row[f"eval/{name}/{key}"] = value
            row[f"eval/{name}/win_rate"] = win_rate(scores["eval"][name], np.array(self.state["base_eval"][name]))
        for key in ("sample_s", "wait_s", "train_s", "round_s"):
            row[f"time/{key}"] = float(np.mean([t[key] for t in timings]))
        row["time/wait_fraction"] = float(np.mean([t["wait_s"] / t["round_s"] for t in timings]))
        row["time/wait_fraction_max"] = float(max(t["wait_s"] / t["round_s"] for t in timings))
        if "max_memory_gib" in timings[0]:
            row["gpu/max_memory_gib"] = float(max(t["max_memory_gib"] for t in timings))
        row["attempt"] = self.state["starts"]
        return row

    def _save_grid(self, rnd: int, eval_images: list) -> None:
        """Held-out samples of the round (first 8 prompts, one row each, one column per seed)."""
        per_prompt = self.config.prompts.eval_seeds
        shape = next(block.shape[1:] for _, block in eval_images if block is not None)
        grid = np.zeros((len(self.eval_prompts) * per_prompt, *shape), np.uint8)
        for idx, block in eval_images:
            for n, g in enumerate(idx):
                grid[g * per_prompt : (g + 1) * per_prompt] = block[n * per_prompt : (n + 1) * per_prompt]
        save_grid(grid[: 8 * per_prompt], per_prompt, self.output_dir / "grids" / f"round_{rnd:03d}.png")

    def run_round(self, rnd: int) -> dict:
        import ray.train
        import torch

        final = rnd == self.config.run.rounds  # evaluation only, after the last round of training
        round_start = time.perf_counter()
        self.scorer.wait_s = 0.0

        # 1-3. Sample and score (in the background), then share the scores.
        out = self._sample_and_score(rnd, final)
        scores = self._gather_scores(out["scores"], final)

        # 4-5. Select (identically on every worker: same scores, deterministic ties) and fine-tune.
        picks, loss, train_s = [], float("nan"), 0.0
        if not final:
            picks = select_samples(scores["train"], self.config)
            t0 = time.perf_counter()
            loss = self._train(rnd, picks, torch.cat(out["latents"]["train"]) if out["latents"]["train"] else None)
            train_s = time.perf_counter() - t0

        # 6. Metrics (every worker's timings), checkpoint (rank 0), report (every worker).
        round_s = time.perf_counter() - round_start
        timing = {"sample_s": out["sample_s"], "wait_s": self.scorer.wait_s, "train_s": train_s, "round_s": round_s}
        if self.device.type == "cuda":  # the worker's peak so far: sampling, VAE decode and training
            timing["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        timings = _all_gather(timing)
        eval_images = _all_gather((self.my_eval, np.concatenate(out["images"]["eval"]) if self.my_eval else None))
        if self.state["base_eval"] is None:
            self.state["base_eval"] = {n: scores["eval"][n].tolist() for n in self.rewards}
        row = self._metrics(rnd, final, scores, picks, loss, timings)
        self.state["history"].append(row)
        self.state["next_round"] = rnd + 1
        rng_states = _all_gather(_rng_state())
        if self.is_main:
            self._save_grid(rnd, eval_images)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.is_main and not final:
                method = self.config.optim.method
                _write_checkpoint(Path(tmp), self.setup, method, self.state, rng_states)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, int | float)}, checkpoint=checkpoint)
        if not final:
            # Ray Train registers a reported checkpoint asynchronously. Wait until it is committed, so a failure in
            # the next round resumes from this one instead of repeating it.
            from ray.train import CheckpointConsistencyMode

            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            for key, value in row.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, rnd)
            self.writer.flush()
        return row


def train_loop_per_worker(config_dict: dict) -> None:
    """One Ray Train worker: rounds from the checkpoint's next round to the final evaluation."""
    from tqdm.auto import tqdm

    config = from_dict(FinetuneConfig, config_dict)
    worker = _Worker(config)
    primary = config.rewards.primary
    try:
        bar = tqdm(range(worker.state["next_round"], config.run.rounds + 1), desc="rounds", disable=not worker.is_main)
        for rnd in bar:
            row = worker.run_round(rnd)
            bar.set_postfix({f"held-out {primary}": f"{row[f'eval/{primary}/mean']:.4g}"})
    finally:
        worker.close()


# --- The driver --------------------------------------------------------------------------------------------------


@dataclass
class FinetuneRun:
    output_dir: Path
    # The latest checkpoint directory (Ray Train storage), None if no round finished.
    checkpoint: Path | None
    # metrics.jsonl rows, rounds 0..R.
    rows: list[dict]


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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
        trainer.scoring.RewardRoundError: a reward application is not reachable (checked before starting workers).
        ray.train.TrainingFailedError: the job failed more than run.max_failures times.
    """
    import dataclasses

    import ray.train
    from ray.train.torch import TorchTrainer

    from trainer.scoring import BackgroundScorer

    output_dir = Path(config.run.output_dir).expanduser().resolve()
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(output_dir)))
    resolve_prompts(config.prompts, config.run.seed)  # bad prompt files fail here, not in every worker
    scorer = BackgroundScorer(config.rewards)
    try:
        scorer.check()
    finally:
        scorer.close()

    resources = {"CPU": config.run.cpus_per_worker}
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
            target=_watch_metrics, args=(output_dir / "metrics.jsonl", on_round, stop), daemon=True
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

"""Configuration of the fine-tuning job (`rewardfleet train`): frozen dataclasses, YAML presets, dotted overrides.

    rewardfleet train --config trainer/configs/local.yaml --set run.rounds=5 --set selection.strategy=weighted

Presets: `trainer/configs/local.yaml` (tiny seeded Stable Diffusion built offline, CPU workers, the local fleet) and
`trainer/configs/cluster.yaml` (Stable Diffusion 1.5 from the hub or a path, GPU workers). Unknown keys raise with
the list of valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.config import apply_overrides, from_dict, load_yaml

CONFIG_DIR = Path(__file__).parent / "configs"
STRATEGIES = ("raft", "assemble", "weighted")
SCHEDULERS = ("ddim", "dpm")
# "auto": bf16 on CUDA devices that support it, fp16 on older CUDA devices, fp32 on CPU (trainer/sampling.py).
DTYPES = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    # "tiny": the seeded tiny Stable Diffusion pipeline built offline (services/tiny_models.py, random weights);
    # otherwise a hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5") or a local directory in diffusers layout.
    pretrained: str = "tiny"
    # Hub revision (branch, tag or commit) of `pretrained`; None = default branch.
    revision: str | None = None
    # Image side in pixels. The tiny pipeline is built for it; SD 1.5 was trained at 512.
    resolution: int = 32
    # Precision of the frozen weights (VAE, text encoder, the UNet's base weights under LoRA) and of the compute:
    # fp32, fp16 or bf16 (for every source, the tiny pipeline included), or auto (bf16 on CUDA devices that support
    # it, else fp16 on CUDA, fp32 on CPU). The trained weights (LoRA adapters, or the whole UNet under method=full)
    # stay fp32; half precision runs the forward under torch.autocast, and fp16 adds loss scaling (GradScaler).
    dtype: str = "auto"
    # Seed of the tiny pipeline's random weights (ignored for real checkpoints).
    tiny_seed: int = 0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.resolution < 16 or self.resolution % 8:
            raise ValueError(f"model.resolution must be a multiple of 8 and >= 16, got {self.resolution}")


@dataclass(frozen=True)
class SamplingConfig:
    # ddim (DDIMScheduler) or dpm (DPMSolverMultistepScheduler), built from the pipeline's scheduler config.
    scheduler: str = "ddim"
    # Denoising steps per image.
    steps: int = 10
    # Classifier-free guidance scale (1 = no guidance).
    guidance_scale: float = 5.0
    # DDIM eta (0 = deterministic given the initial noise).
    eta: float = 0.0
    # K: images sampled per prompt per round (the papers use 10).
    samples_per_prompt: int = 4
    # Prompts per sampling batch (a batch is prompts_per_batch * K images). Each batch is scored while the next one
    # is sampled.
    prompts_per_batch: int = 2
    # Images per VAE decode call: the decoder's activations dominate sampling memory (decoding 40 images of 512 px in
    # one call took about 12 GB), so each batch of prompts_per_batch * K images is decoded this many at a time.
    decode_batch_size: int = 8

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"sampling.scheduler must be one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if min(self.steps, self.samples_per_prompt, self.prompts_per_batch, self.decode_batch_size) < 1:
            raise ValueError("sampling.steps, samples_per_prompt, prompts_per_batch, decode_batch_size must be >= 1")


@dataclass(frozen=True)
class RewardsConfig:
    # host:port of the fleet's gRPC proxy.
    target: str = "127.0.0.1:9000"
    # Reward applications to query, with their fusion weights (assemble). Every one is logged each round.
    weights: dict[str, float] = field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    # The reward raft and weighted optimise; None = the first of `weights`. assemble fuses them all.
    select_by: str | None = None
    # Client limits (it also stays under the server's, learned from Describe).
    max_samples_per_request: int = 32
    max_in_flight: int = 4
    timeout_s: float = 120.0
    # Retries of UNAVAILABLE / RESOURCE_EXHAUSTED before a round fails loudly.
    max_retries: int = 6
    # Image transport: raw pixels (no codec on the trainer's hot path) or png/jpeg/webp.
    image_format: str = "raw"
    # Name of an environment variable holding the fleet's shared token (applications with auth_token_env); None =
    # send none. Every worker needs the variable (e.g. from a Kubernetes Secret).
    token_env: str | None = None

    def __post_init__(self):
        if not self.weights:
            raise ValueError("rewards.weights must name at least one reward application")
        if self.select_by is not None and self.select_by not in self.weights:
            raise ValueError(f"rewards.select_by={self.select_by!r} is not in rewards.weights {list(self.weights)}")

    @property
    def primary(self) -> str:
        return self.select_by or next(iter(self.weights))


@dataclass(frozen=True)
class SelectionConfig:
    # raft: best of K per prompt (by rewards.primary); assemble: fuse every reward's per-prompt ranks, keep the
    # best; weighted: every sample, weighted by its reward (Lee et al.). See trainer/selection.py.
    strategy: str = "raft"
    # raft / assemble: keep only the winners of this top fraction of prompts (by the winner's score).
    top_fraction: float = 1.0
    # assemble: borda or rrf (reciprocal-rank fusion), with rrf_k.
    fusion: str = "borda"
    rrf_k: float = 60.0
    # weighted: how rewards become weights within a prompt's K samples (softmax, minmax or standardize; each
    # prompt's weights sum to K), and the softmax temperature in reward units.
    weighting: str = "softmax"
    temperature: float = 1.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"selection.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"selection.top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.temperature <= 0:
            raise ValueError(f"selection.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class OptimConfig:
    # lora: peft LoRA adapters on the UNet's attention projections (unet.add_adapter); full: every UNet weight.
    method: str = "lora"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # Module names the adapters wrap.
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # AdamW (the papers' LoRA runs: about 1e-5 on SD 1.5; the tiny pipeline needs far more).
    lr: float = 1e-4
    weight_decay: float = 0.0
    # Per worker per optimizer step.
    batch_size: int = 4
    # Passes over the round's selected samples.
    epochs_per_round: int = 1
    max_grad_norm: float = 1.0
    # beta: weight of the denoising loss on the pre-training pairs (Lee et al.); 0 = off.
    beta: float = 0.0
    # Pre-training (image, prompt) pairs: a JSONL of {image, prompt} (paths relative to it), or a folder of images
    # with a sidecar .txt prompt each. Needed when beta > 0.
    pretrain_data: str | None = None

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError(f"optim.method must be lora or full, got {self.method!r}")
        if self.beta < 0 or (self.beta > 0 and not self.pretrain_data):
            raise ValueError("optim.beta must be >= 0, and beta > 0 needs optim.pretrain_data")
        if min(self.batch_size, self.epochs_per_round, self.lora_rank) < 1 or self.lr <= 0:
            raise ValueError("optim.batch_size, epochs_per_round and lora_rank must be >= 1 and lr > 0")


@dataclass(frozen=True)
class PromptsConfig:
    # Training prompts: a text file (one per line) or JSONL of {"prompt"}; None = generate `generate` prompts in
    # the papers' count / color / background style.
    train_file: str | None = None
    generate: int = 16
    # Held-out prompts: a file (must not overlap the training prompts); None = hold `eval_count` of them out.
    eval_file: str | None = None
    eval_count: int = 4
    # Images per held-out prompt, from fixed seeds that are the same every round (so rounds and the base model are
    # compared on the same noise).
    eval_seeds: int = 4

    def __post_init__(self):
        if self.eval_seeds < 1:
            raise ValueError(f"prompts.eval_seeds must be >= 1, got {self.eval_seeds}")


@dataclass(frozen=True)
class RunConfig:
    # Fine-tuning rounds (sample, score, select, train, checkpoint).
    rounds: int = 3
    # Ray Train workers (each samples a shard of the prompts and trains a DDP replica).
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Torch intra-op threads per worker; None = cpus_per_worker rounded down (at least 1).
    torch_threads: int | None = None
    # Outputs (metrics.jsonl, tensorboard/, grids/, reward_curve.png) and Ray Train storage (ray/<name>).
    # Must be shared storage on a multi-node cluster.
    output_dir: str = "runs/finetune"
    # Run name: rerunning with the same output_dir and name resumes from the run's latest checkpoint.
    name: str = "finetune"
    # Start from this checkpoint directory when the run has none of its own (e.g. another run's).
    resume_from: str | None = None
    # Worker-group restarts after a failure (each resumes from the latest checkpoint); -1 = unlimited.
    max_failures: int = 1
    checkpoints_to_keep: int = 2
    seed: int = 0
    # Fault injection for tests and drills: the last worker exits abruptly in the middle of this round, once.
    fail_at_round: int | None = None

    def __post_init__(self):
        if self.rounds < 1 or self.num_workers < 1 or self.checkpoints_to_keep < 1:
            raise ValueError("run.rounds, run.num_workers and run.checkpoints_to_keep must be >= 1")


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.selection.strategy == "assemble" and len(self.rewards.weights) < 2:
            raise ValueError("selection.strategy=assemble fuses several rewards: list at least two in rewards.weights")


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A preset (default: the local one) with dotted `key=value` overrides applied."""
    data: dict[str, Any] = load_yaml(path or CONFIG_DIR / "local.yaml")
    return from_dict(FinetuneConfig, apply_overrides(data, list(overrides or [])))

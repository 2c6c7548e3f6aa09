"""Configuration of the fine-tuning job (`rewardfleet train`): frozen pydantic configs, YAML presets, dotted overrides.

    rewardfleet train --config trainer/configs/local.yaml --set run.rounds=5 --set selection.strategy=weighted

Presets: `trainer/configs/local.yaml` (tiny seeded Stable Diffusion built offline, CPU workers, the local fleet) and
`trainer/configs/cluster.yaml` (Stable Diffusion 1.5 from the hub or a path, GPU workers). Every field is validated
when the config loads (services/config.py): unknown keys raise with the list of valid ones, enums list their values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from services.config import Config, apply_overrides, from_dict, load_yaml
from services.selection import FUSIONS, STRATEGIES, WEIGHTINGS

CONFIG_DIR = Path(__file__).parent / "configs"
# "auto": bfloat16 on CUDA devices that support it, float16 on older ones, float32 on CPU (trainer/sampling.py).
DTYPES = ("auto", "float32", "float16", "bfloat16")
SCHEDULERS = ("ddim", "dpm")
# Enums as Literal types built from their one list of values (the selection ones live with the functions).
Dtype = Literal[DTYPES]
Strategy = Literal[STRATEGIES]
Fusion = Literal[FUSIONS]
Weighting = Literal[WEIGHTINGS]


class ModelConfig(Config):
    pretrained: str = Field(
        "tiny",
        description='"tiny": the seeded tiny Stable Diffusion pipeline built offline (trainer/local_models/tiny.py, '
        'random weights); otherwise a hub id ("stable-diffusion-v1-5/stable-diffusion-v1-5") or a local directory in '
        "diffusers layout.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of `pretrained`; None = default branch."
    )
    resolution: int = Field(
        32, description="Image side in pixels. The tiny pipeline is built for it; SD 1.5 was trained at 512."
    )
    dtype: Dtype = Field(
        "auto",
        description="Precision of the frozen weights (VAE, text encoder, the UNet's base weights under LoRA) and of "
        "the compute: float32, float16 or bfloat16 (for every source, the tiny pipeline included), or auto (bfloat16 "
        "on CUDA devices that support it, else float16 on CUDA, float32 on CPU). The trained weights (LoRA adapters, "
        "or the whole UNet under method=full) stay float32; half precision runs the forward under torch.autocast, and "
        "float16 adds loss scaling (GradScaler).",
    )
    tiny_seed: int = Field(0, description="Seed of the tiny pipeline's random weights (ignored for real checkpoints).")

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: int) -> int:
        if value < 16 or value % 8:
            raise ValueError(f"must be a multiple of 8 and >= 16, got {value}")
        return value


class SamplingConfig(Config):
    scheduler: Literal[SCHEDULERS] = Field(
        "ddim",
        description="ddim (DDIMScheduler) or dpm (DPMSolverMultistepScheduler), built from the pipeline's scheduler "
        "config.",
    )
    steps: int = Field(10, ge=1, description="Denoising steps per image.")
    guidance_scale: float = Field(5.0, description="Classifier-free guidance scale (1 = no guidance).")
    eta: float = Field(0.0, ge=0, description="DDIM eta (0 = deterministic given the initial noise).")
    samples_per_prompt: int = Field(4, ge=1, description="K: images sampled per prompt per round (the papers use 10).")
    prompts_per_batch: int = Field(
        2,
        ge=1,
        description="Prompts per sampling batch (a batch is prompts_per_batch * K images). Each batch is scored "
        "while the next one is sampled.",
    )
    decode_batch_size: int = Field(
        8,
        ge=1,
        description="Images per VAE decode call: the decoder's activations dominate sampling memory (decoding 40 "
        "images of 512 px in one call took about 12 GB), so each batch of prompts_per_batch * K images is decoded "
        "this many at a time.",
    )


class RewardsConfig(Config):
    target: str = Field("127.0.0.1:9000", description="host:port of the fleet's gRPC proxy.")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"jpeg_compressibility": 1.0},
        description="The reward applications optimised, with their fusion weights (assemble). Every one is queried "
        "and logged each round (so is every one of `monitor`).",
    )
    select_by: str | None = Field(
        None,
        description="The reward raft and weighted optimise; None = the first of `weights`. assemble fuses them all.",
    )
    monitor: tuple[str, ...] = Field(
        (),
        description="Reward applications scored every round like the others (training and held-out samples, logged "
        "as train/<name>/... and eval/<name>/...) but never optimised: not fused, not selected by. Each round the job "
        "compares the held-out means with round 0's (the base model) and flags reward hacking (metric "
        "hacking/<name>, a log line) when the optimised reward (`primary`) rose while a monitored one fell by more "
        "than `hacking_k` of its base standard errors. Must not repeat a name or overlap `weights`.",
    )
    hacking_k: float = Field(2.0, gt=0, description="Flag when a monitored reward fell by > k base SEs (see monitor).")
    max_samples_per_request: int = Field(
        32, ge=1, description="Client limit on samples per request (it also stays under the server's, from Describe)."
    )
    max_in_flight: int = Field(4, ge=1, description="Client limit on requests in flight.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds a request may take.")
    max_retries: int = Field(
        6, ge=0, description="Retries of UNAVAILABLE / RESOURCE_EXHAUSTED before a round fails loudly."
    )
    image_format: Literal["raw", "png", "jpeg", "webp"] = Field(
        "raw", description="Image transport: raw pixels (no codec on the trainer's hot path) or png/jpeg/webp."
    )
    resize_to_input: bool = Field(
        True,
        description="Resize images on the trainer to the input resolution a reward declares in Describe (e.g. 512 px "
        "to 224 px for CLIP rewards) before sending: fewer bytes, bit-identical scores (services.resolution). Raw "
        "and png only; a reward that declares none or a server on other torch/torchvision gets full size.",
    )
    shared_memory: bool = Field(
        True,
        description="Pass raw images to rewards on this worker's host in POSIX shared memory instead of in the "
        "request (services.shared_memory): each request's pixels are copied once and the replica maps them. Used "
        "only where the reward's Describe shows a replica on this host (one that is not is sent pixels, with a "
        "warning); raw only.",
    )
    token_env: str | None = Field(
        None,
        description="Name of an environment variable holding the fleet's shared token (applications with "
        "auth_token_env); None = send none. Every worker needs the variable (e.g. from a Kubernetes Secret).",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("must name at least one reward application")
        return value

    @field_validator("select_by")
    @classmethod
    def _select_by(cls, value: str | None, info: ValidationInfo) -> str | None:
        weights = info.data.get("weights")
        if value is not None and weights is not None and value not in weights:
            raise ValueError(f"must be one of rewards.weights {list(weights)}, got {value!r}")
        return value

    @field_validator("monitor")
    @classmethod
    def _monitor(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"must not repeat an application, got {repeated} more than once")
        optimised = sorted(set(value) & set(info.data.get("weights") or {}))
        if optimised:
            raise ValueError(f"must not name applications of rewards.weights (they are optimised), got {optimised}")
        return value

    @property
    def primary(self) -> str:
        """The reward raft and weighted optimise, and the one the hacking monitor watches rise."""
        return self.select_by or next(iter(self.weights))

    @property
    def scored(self) -> list[str]:
        """Every application the job queries each round: the optimised ones (`weights`), then the monitored ones."""
        return [*self.weights, *self.monitor]


class SelectionConfig(Config):
    strategy: Strategy = Field(
        "raft",
        description="raft: best of K per prompt (by rewards.primary); assemble: fuse every reward's per-prompt "
        "ranks, keep the best; weighted: every sample, weighted by its reward (Lee et al.). See "
        "services/selection.py.",
    )
    top_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="raft / assemble: keep only the winners of this top fraction of prompts (by the winner's score).",
    )
    fusion: Fusion = Field("borda", description="assemble: borda or rrf (reciprocal-rank fusion, with rrf_k).")
    rrf_k: float = Field(60.0, gt=0, description="assemble with fusion=rrf: the k of 1 / (k + rank).")
    weighting: Weighting = Field(
        "softmax",
        description="weighted: how rewards become weights within a prompt's K samples (softmax, minmax or "
        "standardize; each prompt's weights sum to K).",
    )
    temperature: float = Field(
        1.0, gt=0, description="weighted with weighting=softmax: the temperature, in reward units."
    )


class OptimConfig(Config):
    method: Literal["lora", "full"] = Field(
        "lora",
        description="lora: peft LoRA adapters on the UNet's attention projections (unet.add_adapter); full: every "
        "UNet weight.",
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(4.0, gt=0, description="LoRA alpha (the adapters' output is scaled by alpha / r).")
    lora_targets: tuple[str, ...] = Field(
        ("to_q", "to_k", "to_v", "to_out.0"), min_length=1, description="Module names the adapters wrap."
    )
    lr: float = Field(
        1e-4,
        gt=0,
        description="AdamW learning rate (the papers' LoRA runs: about 1e-5 on SD 1.5; the tiny pipeline needs far "
        "more).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(4, ge=1, description="Samples per worker per optimizer step.")
    epochs_per_round: int = Field(1, ge=1, description="Passes over the round's selected samples.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping (global L2 norm of the trained weights).")
    pretrain_data: str | None = Field(
        None,
        description="Pre-training (image, prompt) pairs: a JSONL of {image, prompt} (paths relative to it), or a "
        "folder of images with a sidecar .txt prompt each. Needed when beta > 0.",
    )
    beta: float = Field(
        0.0, ge=0, description="beta: weight of the denoising loss on the pre-training pairs (Lee et al.); 0 = off."
    )

    @field_validator("beta")
    @classmethod
    def _beta_needs_pairs(cls, value: float, info: ValidationInfo) -> float:
        # pretrain_data is declared before beta, so it is validated (and in info.data) by now.
        if value > 0 and not info.data.get("pretrain_data"):
            raise ValueError(f"must be 0 without pre-training pairs (got {value}): beta > 0 needs optim.pretrain_data")
        return value


class PromptsConfig(Config):
    train_file: str | None = Field(
        None,
        description='Training prompts: a text file (one per line) or JSONL of {"prompt"}; None = generate `generate` '
        "prompts in the papers' count / color / background style.",
    )
    generate: int = Field(16, ge=1, description="Training prompts generated when train_file is None.")
    eval_file: str | None = Field(
        None,
        description="Held-out prompts: a file (must not overlap the training prompts); None = hold `eval_count` of "
        "the training prompts out.",
    )
    eval_count: int = Field(4, ge=1, description="Held-out prompts drawn from the training pool if eval_file is None.")
    eval_seeds: int = Field(
        4,
        ge=1,
        description="Images per held-out prompt, from fixed seeds that are the same every round (so rounds and the "
        "base model are compared on the same noise).",
    )


class TestbedEvalConfig(Config):
    oracle: bool = Field(
        False,
        description="Score the held-out images with the testbed's oracle (trainer/local_models/oracle.py) every "
        "round: eval/oracle/<attr>/mean and /se for attr in all, count, color, object, background (per-image 0/1 "
        "correctness). Evaluation only, never a reward. Every held-out prompt must be a testbed prompt "
        '("three green balls in the city", scenes.parse_prompt), checked when the job starts.',
    )
    fidelity_clip: str | None = Field(
        None,
        description="A CLIP model directory (`~` expanded) for eval/fidelity/mean and /se: each held-out image's "
        "cosine distance (1 - cos) to the mean image embedding of `fidelity_renders` renders of its prompt (lower = "
        "closer to the world's images). The local profile's is the testbed's stand-in CLIP, "
        "~/.cache/rewardfleet/alignment_testbed/testbed/clip. Needs testbed prompts, as `oracle` does. None = no "
        "fidelity metric or figure.",
    )
    fidelity_renders: int = Field(
        16,
        ge=1,
        description="Renders of each held-out prompt behind its fidelity reference, at model.resolution, drawn once "
        "when the job starts from a fixed seed (run.seed).",
    )

    @field_validator("fidelity_clip")
    @classmethod
    def _expand(cls, value: str | None) -> str | None:
        return str(Path(value).expanduser()) if value is not None else None

    @property
    def enabled(self) -> bool:
        """Whether any held-out metric of the testbed world is on (each needs testbed prompts)."""
        return self.oracle or self.fidelity_clip is not None


class RunConfig(Config):
    rounds: int = Field(3, ge=1, description="Fine-tuning rounds (sample, score, select, train, checkpoint).")
    num_workers: int = Field(
        2, ge=1, description="Ray Train workers (each samples a shard of the prompts and trains a DDP replica)."
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs per worker (Ray resources).")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker also asks for, e.g. {trainer_node: 1} to keep workers on the "
        "nodes that declare it (`ray start --resources`), one per node.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Torch intra-op threads per worker; None = cpus_per_worker rounded down (at least 1)."
    )
    output_dir: str = Field(
        "runs/finetune",
        description="Outputs (metrics.jsonl, tensorboard/, grids/, reward_curve.png) and Ray Train storage "
        "(ray/<name>). Must be shared storage on a multi-node cluster.",
    )
    name: str = Field(
        "finetune",
        description="Run name: rerunning with the same output_dir and name resumes from the run's latest checkpoint.",
    )
    resume_from: str | None = Field(
        None, description="Start from this checkpoint directory when the run has none of its own (e.g. another run's)."
    )
    max_failures: int = Field(
        1,
        ge=-1,
        description="Worker-group restarts after a failure (each resumes from the latest checkpoint); -1 = unlimited.",
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept (the latest ones).")
    seed: int = Field(0, description="Seed of the prompts, the sampling noise, the LoRA init and the step order.")

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(v)
        if builtin:
            raise ValueError(f"{sorted(builtin)} are set by cpus_per_worker and use_gpu, not worker_resources")
        negative = {k: x for k, x in v.items() if x <= 0}
        if negative:
            raise ValueError(f"worker_resources must be positive amounts, got {negative}")
        return v

    fail_at_round: int | None = Field(
        None,
        ge=0,
        description="Fault injection for tests and drills: the last worker exits abruptly in the middle of this "
        "round, once.",
    )


class FinetuneConfig(Config):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The pipeline being fine-tuned.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How images are sampled.")
    rewards: RewardsConfig = Field(default_factory=RewardsConfig, description="The fleet and the rewards it serves.")
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig, description="Which samples train, with which weights."
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="What trains, and the optimizer.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Training and held-out prompts.")
    testbed: TestbedEvalConfig = Field(
        default_factory=TestbedEvalConfig,
        description="Held-out metrics of the synthetic testbed world (trainer/local_models/scenes.py), for runs on "
        "its prompts: oracle accuracy and fidelity to its renders.",
    )
    run: RunConfig = Field(default_factory=RunConfig, description="Rounds, workers, outputs, resumption.")

    @model_validator(mode="after")
    def _assemble_needs_rewards(self) -> FinetuneConfig:
        if self.selection.strategy == "assemble" and len(self.rewards.weights) < 2:
            raise ValueError("selection.strategy=assemble fuses several rewards: list at least two in rewards.weights")
        return self

    @model_validator(mode="after")
    def _testbed_needs_its_prompts(self) -> FinetuneConfig:
        # The prompt files' contents are checked when the job starts (trainer/finetune.py); generated prompts are
        # the papers' ("two green dogs ..."), never all of them the testbed's.
        if self.testbed.enabled and self.prompts.eval_file is None and self.prompts.train_file is None:
            field = "testbed.oracle" if self.testbed.oracle else "testbed.fidelity_clip"
            raise ValueError(
                f'{field} needs testbed prompts ("three green balls in the city"), but the held-out prompts would '
                "be generated in the papers' style: set prompts.eval_file (or prompts.train_file) to testbed prompts"
            )
        return self


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A preset (default: the local one) with dotted `key=value` overrides applied."""
    data: dict[str, Any] = load_yaml(path or CONFIG_DIR / "local.yaml")
    return from_dict(FinetuneConfig, apply_overrides(data, list(overrides or [])))

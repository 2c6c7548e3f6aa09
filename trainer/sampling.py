"""The diffusers side of fine-tuning: load the pipeline, add LoRA, sample seeded images, save/load LoRA weights.

Sampling keeps each image's final latent next to its uint8 pixels: the rewards score the pixels, and the denoising
loss trains on the latents, so the selected samples never go through a lossy VAE encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.models import resolve_model_source
from trainer.config import ModelConfig, OptimConfig, SamplingConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

# Seed-sequence streams: training samples change every round, held-out samples use the same noise every round.
STREAM_TRAIN = 0
STREAM_EVAL = 1
STREAM_TIMESTEPS = 2


def sample_seed(*key: int) -> int:
    """A 63-bit seed derived from integers (e.g. run seed, stream, round, prompt, sample): independent streams."""
    return int(np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def torch_dtype(name: str):
    """The torch dtype of an explicit model.dtype (float32, float16, bfloat16): torch's own name for it."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def resolve_dtype(name: str, device="cpu"):
    """The torch dtype of model.dtype on `device`; auto: bfloat16 on CUDA devices with native bf16, float16 on older
    CUDA devices (trained with loss scaling), float32 elsewhere (CPU autocast is slow and gains nothing)."""
    import torch

    if name != "auto":
        return torch_dtype(name)
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    # Without native bf16 (before Ampere) torch emulates it: slower than fp16.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast(device, dtype):
    """torch.autocast to `dtype` on `device`'s type for half dtypes; a no-op context for fp32."""
    import contextlib

    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _cast(module, dtype) -> None:
    import torch

    # nn.Module.to, not diffusers' ModelMixin.to: the latter warns about fp32-only modules even when there are none.
    torch.nn.Module.to(module, dtype=dtype)


def load_pipeline(config: ModelConfig, device="cpu"):
    """The text-to-image pipeline, in `config.dtype` (resolved for `device`) for every source: the tiny seeded one,
    or StableDiffusionPipeline.from_pretrained(hub id or path)."""
    from diffusers import StableDiffusionPipeline

    dtype = resolve_dtype(config.dtype, device)
    if config.pretrained == "tiny":
        from trainer.local_models.tiny import tiny_stable_diffusion

        pipe = tiny_stable_diffusion(config.tiny_seed, config.resolution)  # built in fp32
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            _cast(module, dtype)
    else:
        source = resolve_model_source(config.pretrained, "model.pretrained")
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            revision=config.revision,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    # The frozen parts: only the UNet (or its adapters) trains.
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return pipe.to(device)


def set_scheduler(pipe, config: SamplingConfig) -> None:
    """Swaps in the configured sampler, built from the pipeline's own noise-schedule config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[config.scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def add_lora(unet, config: OptimConfig) -> list:
    """Freezes the UNet and adds peft LoRA adapters to its attention projections; returns the trainable params.

    With method=full every UNet weight trains instead and nothing is added.
    """
    import torch
    from peft import LoraConfig

    if config.method == "full":
        # Trained weights are fp32 whatever model.dtype is (the optimizer's updates would round away in half).
        unet.requires_grad_(True)
        _cast(unet, torch.float32)
        return [p for p in unet.parameters()]
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_targets),
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # adapters train in fp32 even when the base weights are half (diffusers' cast_training_params)
        p.data = p.data.to(torch.float32)
    if not params:
        raise ValueError(f"optim.lora_targets {list(config.lora_targets)} matched no module of the UNet")
    return params


def lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in diffusers' format (what `load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, directory: str | Path) -> Path:
    """Writes `directory/pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(directory)`."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=lora_state_dict(unet),
        weight_name=LORA_WEIGHTS,
        safe_serialization=True,
        # The adapter's config (rank, alpha, targets) travels in the file: without it a loader assumes alpha = rank.
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return Path(directory) / LORA_WEIGHTS


def load_lora_into(unet, directory: str | Path) -> None:
    """Loads saved LoRA weights into the UNet's (already added, trainable) adapter, in place.

    Raises:
        ValueError: the file's keys do not match the adapter (different targets or rank).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / LORA_WEIGHTS))
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if "lora" in k]
    if unexpected or missing:
        raise ValueError(
            f"LoRA weights in {directory} do not match the adapter: {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}, {len(missing)} missing {missing[:3]}"
        )


@dataclass
class Samples:
    """Sampled images of a batch of prompts, K each, in prompt-major order (prompt i's k-th image at i * K + k)."""

    # (N, H, W, 3) uint8
    images: np.ndarray
    # (N, C, h, w) float32 on CPU: the final latents, scaled as the UNet sees them.
    latents: "torch.Tensor"  # noqa: F821, UP037
    prompts: list[str]


def sample_images(pipe, prompts: list[str], seeds: list[int], config: SamplingConfig, resolution: int) -> Samples:
    """One image per (prompt, seed) pair; the same seed and weights give the same image.

    Each image gets its own torch Generator, so an image does not depend on what else is in the batch. The latents
    are decoded `config.decode_batch_size` images at a time.
    """
    import torch

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    device = pipe.device
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    channels = pipe.unet.config.in_channels
    scale = pipe.vae_scale_factor
    shape = (channels, resolution // scale, resolution // scale)
    # Initial noise drawn on CPU from each image's generator: identical on CPU and GPU workers.
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # (N, C, h, w)
    vae = pipe.vae
    # The frozen parts are in model.dtype; trained weights are fp32 (the whole UNet under method=full). Autocast
    # runs every layer in model.dtype whatever its weights' dtype, as the training forward does.
    with torch.no_grad(), autocast(device, vae.dtype):
        latents = pipe(
            prompt=prompts,
            height=resolution,
            width=resolution,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance_scale,
            eta=config.eta,
            latents=noise.to(device=device, dtype=pipe.unet.dtype),
            generator=generators if config.eta > 0 else None,
            output_type="latent",
        ).images  # (N, C, h, w)
        chunks = []
        for start in range(0, len(latents), config.decode_batch_size):
            chunk = latents[start : start + config.decode_batch_size].to(vae.dtype) / vae.config.scaling_factor
            decoded = vae.decode(chunk).sample  # (n, 3, H, W) in [-1, 1]
            chunks.append(pipe.image_processor.postprocess(decoded.float(), output_type="np"))  # (n, H, W, 3)
    images = np.concatenate(chunks)  # (N, H, W, 3) float in [0, 1]
    images = (images * 255).round().clip(0, 255).astype(np.uint8)
    return Samples(images=images, latents=latents.float().cpu(), prompts=list(prompts))

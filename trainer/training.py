"""The model under training and one optimizer step: mixed precision as diffusers' training scripts do it.

Frozen weights (VAE, text encoder, the UNet's base weights under LoRA) in model.dtype; trained weights (LoRA adapters,
or the whole UNet under method=full) in float32; the forward under torch.autocast; loss scaling for float16. The
fine-tuning worker (trainer/worker.py) and the tests build the same `TrainingSetup` and call the same `train_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.config import FinetuneConfig


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


def encode_images(pipe, images, batch_size: int):
    """(N, C, h, w) fp32 VAE latents of uint8 images (N, H, W, 3), scaled as the UNet sees them: the posterior mean.

    The fine-tuning data are images, as in both papers (Lee et al. fine-tune on generated images, RAFT on its
    selected ones), so the job trains on the latents of the images the rewards scored, not on the sampler's final
    latents: those drift off the encoder's distribution under guidance and few sampling steps, and fine-tuning on
    them feeds the drift back. The mean, not a posterior sample: a diffusion model is trained on the latents its
    VAE encodes to, and a sample adds the posterior's noise to every training target.
    """
    import numpy as np
    import torch

    vae = pipe.vae
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start : start + batch_size])
            pixels = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (n, 3, H, W) in [-1, 1]
            posterior = vae.encode(pixels.to(pipe.device, vae.dtype)).latent_dist
            out.append((posterior.mean * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def encode_pretrain_pairs(setup: TrainingSetup, path: str, resolution: int, batch_size: int):
    """VAE latents (N, C, h, w) of the pre-training pairs at `path`, and their prompts.

    Encoded once per job: the pairs are the beta term's data (Lee et al.), and the VAE is frozen.
    """
    from trainer.pretrain_data import load_pretrain_pairs

    images, prompts = load_pretrain_pairs(path, resolution)
    return encode_images(setup.pipe, images, batch_size), prompts

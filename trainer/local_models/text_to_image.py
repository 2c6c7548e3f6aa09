"""The testbed world's text-to-image model: a tiny Stable Diffusion trained on rendered scenes and their prompts.

The fine-tuning job aligns a pretrained text-to-image model with its prompts; on the testbed world (`scenes.py`) that
model is this one. It has SD 1.5's parts and file layout, so the job loads it with
`StableDiffusionPipeline.from_pretrained` exactly as it loads SD 1.5:

- text encoder and tokenizer: the stand-in CLIP's text tower (`testbed.pretrain_clip`), frozen, as SD keeps CLIP's.
  Its pretraining captions wrote counts as digits, so the prompts' number words reach the UNet through embeddings
  CLIP never trained: like SD, the model learns counts worst;
- VAE (AutoencoderKL): 32 px images to 16x16x4 latents. A 4x smaller latent lost colour and shape (the oracle read
  29% of its reconstructions right); at 2x it reads them as it reads renders;
- UNet2DConditionModel with cross-attention on the text encoder's hidden states, trained with SD's noise schedule and
  epsilon objective, and classifier-free-guidance dropout of the prompt;
- SD 1.5's PNDM scheduler config (the job swaps in its configured sampler, built from it).

It trains on the "clip" and "train" prompts of `split_prompts` and never sees the "heldout" ones, so on held-out
prompts it composes attributes it saw only in other combinations, and gets some of them wrong (counts most): the
room for the fine-tuning job to improve alignment. `train_text_to_image` builds it; `evaluate_text_to_image` reads
its samples with the oracle. The trained weights ship with the package (`world.py`), as training takes longer than a
first build may.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from services.config import Config, to_dict
from trainer.local_models.scenes import render_image, render_prompt, split_prompts

# Numpy seed-sequence streams (`default_rng([seed, stream])`).
STREAM_IMAGES = 0
STREAM_EVAL = 1
# The testbed's prompt split (TestbedConfig's defaults): the model trains on "clip" + "train".
SPLIT_FRACTIONS = (0.25, 0.25)


class TextToImageConfig(Config):
    """How the world's text-to-image model is built. Defaults are the shipped model's recipe (`world.py`)."""

    seed: int = Field(0, description="Seeds the renders, the initialisation and the batch order.")
    image_size: int = Field(32, ge=16, description="Side of the images in pixels (the testbed's render size).")
    train_images: int = Field(24000, ge=1, description="Rendered (image, prompt) pairs of the training prompts.")
    max_length: int = Field(16, ge=8, description="Tokens per prompt (the tokenizer's model_max_length).")
    vae_channels: tuple[int, ...] = Field(
        (32, 64), min_length=2, description="VAE block widths; len - 1 halvings of the image side."
    )
    vae_steps: int = Field(700, ge=1, description="VAE optimizer steps (reconstruction + tiny KL).")
    vae_batch_size: int = Field(32, ge=1, description="Images per VAE step.")
    vae_lr: float = Field(2e-3, gt=0, description="VAE peak learning rate (one-cycle schedule).")
    unet_channels: tuple[int, ...] = Field(
        (16, 32, 64), min_length=2, description="UNet block widths; cross-attention in all but the first."
    )
    unet_steps: int = Field(5000, ge=1, description="UNet optimizer steps (epsilon prediction).")
    unet_batch_size: int = Field(64, ge=1, description="Latents per UNet step.")
    unet_lr: float = Field(1e-3, gt=0, description="UNet peak learning rate (one-cycle schedule).")
    uncond_fraction: float = Field(
        0.1, ge=0, lt=1, description='Fraction of training prompts replaced by "" (classifier-free guidance).'
    )
    eval_every: int = Field(
        1000,
        ge=0,
        description="Every this many UNet steps, the oracle reads samples of the held-out prompts (a learning curve "
        "in t2i_metrics.json; it draws no training randomness); 0 = never.",
    )


def sd15_noise_schedule() -> dict:
    """SD 1.5's training noise schedule (its scheduler_config.json's betas)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _pipeline_parts(config: TextToImageConfig, cross_attention_dim: int):
    """A random-init (seeded by the caller) VAE and UNet of `config`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae_levels = len(config.vae_channels)
    vae = AutoencoderKL(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        layers_per_block=1,
        norm_num_groups=8,
    )
    levels = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (vae_levels - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return vae, unet


def _one_cycle(optimizer, lr: float, steps: int):
    import torch

    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.03)


def _to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def train_text_to_image(
    out_dir: str | Path, clip_dir: str | Path, config: TextToImageConfig | None = None, progress: bool = False
) -> Path:
    """Trains the world's text-to-image model on renders of the training prompts; saves the pipeline into `out_dir`.

    `clip_dir`: the stand-in CLIP (`testbed.pretrain_clip`), whose text tower and tokenizer become the pipeline's.
    Deterministic on CPU for a given config and stand-in. Weights are saved in float16 (half the bytes; the job loads
    them in its model.dtype); `out_dir/t2i_metrics.json` records the config, losses, seconds and the oracle's reading
    of VAE reconstructions of held-out renders.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, PNDMScheduler
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging as hf_logging

    from trainer.local_models.oracle import attribute_accuracy
    from trainer.local_models.tiny import stable_diffusion_pipeline

    start = time.perf_counter()
    config = config or TextToImageConfig()
    out_dir = Path(out_dir)
    splits = split_prompts(config.seed, *SPLIT_FRACTIONS)
    train_attrs = splits["clip"] + splits["train"]
    torch.manual_seed(config.seed)

    # 1. Render the training pairs.
    rng = np.random.default_rng([config.seed, STREAM_IMAGES])
    idx = rng.integers(0, len(train_attrs), config.train_images)  # (N,)
    images = np.stack([render_image(train_attrs[i], rng, config.image_size) for i in idx])  # (N, S, S, 3) uint8
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, S, S) in [-1, 1]
    del images

    # 2. Encode every prompt once with the frozen text tower, as the pipeline will ("" is the unconditional one).
    tokenizer = AutoTokenizer.from_pretrained(clip_dir, model_max_length=config.max_length)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's vision tower is expected to go unused
    try:
        text_encoder = CLIPTextModel.from_pretrained(clip_dir).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    prompts = [render_prompt(a) for a in train_attrs] + [""]
    with torch.no_grad():
        ids = tokenizer(
            prompts, padding="max_length", max_length=config.max_length, truncation=True, return_tensors="pt"
        )
        hidden = text_encoder(ids["input_ids"])[0]  # (P + 1, L, D)
    prompt_idx = torch.from_numpy(idx)  # (N,) row of each pair's prompt in `hidden`
    uncond = len(prompts) - 1

    vae, unet = _pipeline_parts(config, hidden.shape[-1])
    bar = tqdm(total=config.vae_steps + config.unet_steps, desc="train text-to-image", disable=not progress)

    # 3. VAE: reconstruction with a tiny KL term (SD's VAE is also mostly an autoencoder).
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), config.vae_lr)
    schedule = _one_cycle(optimizer, config.vae_lr, config.vae_steps)
    vae_loss = math.nan
    for _ in range(config.vae_steps):
        batch = pixels[torch.randint(0, len(pixels), (config.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample(generator)).sample, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        vae_loss = loss.item()
        bar.set_postfix(vae=f"{vae_loss:.4f}")
        bar.update()
    vae.eval().requires_grad_(False)

    # 4. Latents of every training image, scaled to unit variance (SD's scaling_factor).
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
    scaling = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling  # (N, 4, h, w)
    recon = _reconstruction_accuracy(vae, splits["heldout"], config, attribute_accuracy)
    del pixels

    # 5. UNet: epsilon prediction under SD's schedule; horizontal flips (a flipped scene is a scene of the same
    # prompt) and the unconditional prompt for a fraction of each batch.
    noise_schedule = DDPMScheduler(**sd15_noise_schedule())
    optimizer = torch.optim.AdamW(unet.parameters(), config.unet_lr, weight_decay=0.0)
    schedule = _one_cycle(optimizer, config.unet_lr, config.unet_steps)
    scheduler = PNDMScheduler(**sd15_noise_schedule(), skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    scheduler.register_to_config(clip_sample=False)  # as in SD 1.5's scheduler_config.json, for the DDIM built from it
    pipe = stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    curve = []
    unet.train()
    unet_loss = math.nan
    for step in range(1, config.unet_steps + 1):
        i = torch.randint(0, len(latents), (config.unet_batch_size,), generator=generator)
        z0 = latents[i]  # (B, 4, h, w)
        flip = torch.rand(len(i), generator=generator) < 0.5
        z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)
        rows = torch.where(torch.rand(len(i), generator=generator) < config.uncond_fraction, uncond, prompt_idx[i])
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(i),), generator=generator)
        pred = unet(noise_schedule.add_noise(z0, noise, t), t, hidden[rows]).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        unet_loss = loss.item()
        bar.set_postfix(unet=f"{unet_loss:.4f}")
        bar.update()
        if config.eval_every and (step % config.eval_every == 0 or step == config.unet_steps):
            unet.eval()
            accuracy, _ = sample_and_read(pipe, splits["heldout"], seeds_per_prompt=1, seed=config.seed)
            unet.train()
            curve.append({"step": step, "loss": unet_loss, **accuracy})
            bar.write(
                f"text-to-image step {step}: held-out oracle " + " ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
            )
    bar.close()
    unet.eval().requires_grad_(False)

    # 6. Save as SD 1.5 is laid out, in float16, with SD 1.5's PNDM scheduler.
    pipe.to(torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir)
    metrics = {
        "config": to_dict(config),
        "vae_loss": vae_loss,
        "unet_loss": unet_loss,
        "scaling_factor": scaling,
        "vae_reconstruction_oracle": recon,
        "heldout_oracle_curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "t2i_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


def _reconstruction_accuracy(vae, heldout: list[dict], config: TextToImageConfig, accuracy) -> dict:
    """The oracle's accuracy on VAE reconstructions of fresh held-out renders (what the UNet can at best reach)."""
    import torch

    rng = np.random.default_rng([config.seed, STREAM_EVAL])
    images = np.stack([render_image(a, rng, config.image_size) for a in heldout])
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample  # (P, 3, S, S)
    return accuracy(_to_uint8(recon), heldout)


def sample_and_read(
    pipe,
    attrs_list: list[dict],
    seeds_per_prompt: int = 2,
    steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> tuple[dict, np.ndarray]:
    """The oracle's accuracy on `pipe`'s samples of `attrs_list`'s prompts (DDIM, the job's sampler), and the
    (N, S, S, 3) uint8 samples, `seeds_per_prompt` per prompt in order. The pipeline's own scheduler is left as is."""
    import torch
    from diffusers import DDIMScheduler

    from trainer.local_models.oracle import attribute_accuracy

    pipeline = type(pipe)(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    pipeline.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = [render_prompt(a) for a in attrs_list for _ in range(seeds_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    images = []
    with torch.no_grad():
        for first in range(0, len(prompts), 64):
            out = pipeline(
                prompts[first : first + 64],
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="np",
            ).images  # (n, S, S, 3) float in [0, 1]
            images.append((out * 255).round().clip(0, 255).astype(np.uint8))
    samples = np.concatenate(images)
    return attribute_accuracy(samples, [a for a in attrs_list for _ in range(seeds_per_prompt)]), samples


def evaluate_text_to_image(model_dir: str | Path, attrs_list: list[dict], **sampling) -> tuple[dict, np.ndarray]:
    """`sample_and_read` of the pipeline saved in `model_dir`, loaded with `from_pretrained` in float32 (as the
    job loads it)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    return sample_and_read(pipe, attrs_list, **sampling)

"""Seeded sampling with the tiny pipeline, and LoRA weights that diffusers' load_lora_weights reads back."""

import numpy as np
import pytest
import torch

from trainer.config import ModelConfig, OptimConfig, SamplingConfig
from trainer.sampling import (
    add_lora,
    load_lora_into,
    load_pipeline,
    sample_images,
    sample_seed,
    save_lora,
    set_scheduler,
)

MODEL = ModelConfig(resolution=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pipeline(scheduler="ddim"):
    pipe = load_pipeline(MODEL)
    set_scheduler(pipe, SamplingConfig(scheduler=scheduler, steps=3))
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_an_image_depends_on_its_seed_only(scheduler):
    """The same (prompt, seed) gives the same image alone or in a batch, up to float32 reduction order.

    Each image has its own generator, so its noise never depends on the batch. Its arithmetic can: CPU kernels pick
    their blocking by batch size and CPU (Intel and AMD differ), so a batch of two can sum in another order than a
    batch of one. That moves a latent by ~1e-5 (seen up to 7e-5 after 3 dpm steps) and, where a pixel sits on a
    rounding boundary, its 8-bit value by 1 (1 pixel in 15,360 across 20 seeds). The bounds below allow that and
    nothing more: a different seed moves the latents by O(1) and most pixels by tens of levels.
    """
    pipe = pipeline(scheduler)
    config = SamplingConfig(scheduler=scheduler, steps=3)
    for seed in (11, 21, 31):
        both = sample_images(pipe, ["two red dogs", "one cat"], [seed, seed + 1], config, 16)
        alone = sample_images(pipe, ["one cat"], [seed + 1], config, 16)
        assert both.images.shape == (2, 16, 16, 3) and both.images.dtype == np.uint8
        assert both.latents.shape == (2, 4, 8, 8)
        # Batch-independent within float32 reduction order.
        torch.testing.assert_close(both.latents[1], alone.latents[0], atol=1e-3, rtol=0)
        pixel_diff = np.abs(both.images[1].astype(int) - alone.images[0])  # (16, 16, 3)
        assert pixel_diff.max() <= 1 and (pixel_diff > 0).mean() <= 0.01
        other = sample_images(pipe, ["one cat"], [seed + 2], config, 16)
        assert (other.latents[0] - alone.latents[0]).abs().max() > 0.1
        assert np.abs(other.images[0].astype(int) - alone.images[0]).max() > 10


def test_sample_seeds_are_distinct_streams():
    seeds = {sample_seed(0, s, r, g, k) for s in range(2) for r in range(3) for g in range(4) for k in range(4)}
    assert len(seeds) == 2 * 3 * 4 * 4
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


def test_lora_checkpoint_loads_with_diffusers_load_lora_weights(tmp_path):
    config = SamplingConfig(steps=3)
    pipe = pipeline()
    base = sample_images(pipe, ["two red dogs"], [5], config, 16)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, OptimConfig(lora_rank=2))
    assert params and all(p.requires_grad for p in params)
    assert sum(p.requires_grad for p in pipe.unet.parameters()) == len(params)  # the base UNet is frozen
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    tuned = sample_images(pipe, ["two red dogs"], [5], config, 16)
    assert np.abs(tuned.images.astype(int) - base.images).max() > 0
    save_lora(pipe.unet, tmp_path)

    fresh = pipeline()
    fresh.load_lora_weights(tmp_path)  # diffusers' own loader
    torch.testing.assert_close(sample_images(fresh, ["two red dogs"], [5], config, 16).latents, tuned.latents)

    resumed = pipeline()  # the trainer's resume path: into a trainable adapter
    add_lora(resumed.unet, OptimConfig(lora_rank=2))
    load_lora_into(resumed.unet, tmp_path)
    torch.testing.assert_close(sample_images(resumed, ["two red dogs"], [5], config, 16).latents, tuned.latents)

    other_rank = pipeline()
    add_lora(other_rank.unet, OptimConfig(lora_rank=4))
    with pytest.raises(Exception, match="size mismatch|do not match"):
        load_lora_into(other_rank.unet, tmp_path)


def test_full_finetuning_trains_every_unet_weight():
    pipe = pipeline()
    params = add_lora(pipe.unet, OptimConfig(method="full"))
    assert len(params) == len(list(pipe.unet.parameters())) and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


# --- Precision and decode chunks --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sampling_runs_in_every_dtype_and_method(dtype, method):
    """Half frozen parts with fp32 trained weights (the adapters, or the whole UNet under method=full) sample the
    same images as fp32 up to half-precision rounding. One rounding of a pixel in [-1, 1] is 255 * 2^-9 ~ 0.5 levels
    in bf16 and 0.06 in fp16; three denoising steps and the decoder compound it (measured: bf16 mean 0.5, max 4;
    fp16 mean 0.07, max 1). Another seed moves most pixels by tens of levels."""
    config = SamplingConfig(steps=3)
    images = {}
    for name in ("float32", dtype):
        pipe = load_pipeline(ModelConfig(resolution=16, dtype=name))
        set_scheduler(pipe, config)
        torch.manual_seed(0)
        params = add_lora(pipe.unet, OptimConfig(method=method, lora_rank=2))
        assert {p.dtype for p in params} == {torch.float32}
        expected = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
        assert pipe.vae.dtype == expected and pipe.text_encoder.dtype == expected
        samples = sample_images(pipe, ["two red dogs", "one cat"], [5, 6], config, 16)
        assert samples.latents.dtype == torch.float32 and torch.isfinite(samples.latents).all()
        images[name] = samples.images.astype(int)  # (2, 16, 16, 3)
    diff = np.abs(images[dtype] - images["float32"])
    mean_bound, max_bound = {"bfloat16": (2.0, 12), "float16": (0.5, 4)}[dtype]
    assert diff.mean() <= mean_bound and diff.max() <= max_bound


def test_the_vae_decodes_decode_batch_size_images_per_call():
    """7 images with decode_batch_size=3 go through the VAE decoder as 3 + 3 + 1, and equal the one-call decode up
    to float32 reduction order (CPU kernels block by batch size): at most 1 level on a pixel at a rounding
    boundary."""
    pipe = pipeline()
    sizes = []
    hook = pipe.vae.decoder.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    prompts, seeds = ["two red dogs", "one cat"] * 3 + ["a blue car"], list(range(7))
    try:
        chunked = sample_images(pipe, prompts, seeds, SamplingConfig(steps=2, decode_batch_size=3), 16)
        assert sizes == [3, 3, 1]
        sizes.clear()
        whole = sample_images(pipe, prompts, seeds, SamplingConfig(steps=2, decode_batch_size=7), 16)
        assert sizes == [7]
    finally:
        hook.remove()
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=0, atol=0)  # the same denoising
    assert chunked.images.shape == whole.images.shape == (7, 16, 16, 3)
    diff = np.abs(chunked.images.astype(int) - whole.images)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pipeline(scheduler="ddim"):
    pipe = load_pipeline(MODEL)
    set_scheduler(pipe, SamplingConfig(scheduler=scheduler, steps=3))
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_an_image_depends_on_its_seed_only(scheduler):
    pipe = pipeline(scheduler)
    config = SamplingConfig(scheduler=scheduler, steps=3)
    both = sample_images(pipe, ["two red dogs", "one cat"], [11, 12], config, 16)
    alone = sample_images(pipe, ["one cat"], [12], config, 16)
    assert both.images.shape == (2, 16, 16, 3) and both.images.dtype == np.uint8
    assert both.latents.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(both.images[1], alone.images[0])  # batch-independent
    other = sample_images(pipe, ["one cat"], [13], config, 16)
    assert np.abs(other.images[0].astype(int) - alone.images[0]).max() > 0


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

"""The testbed world's shipped models: made by the code's recipe, installed by build-local, loaded as their real
counterparts are (StableDiffusionPipeline / Blip2 `from_pretrained`), and good at what the local profile needs."""

import json

import numpy as np
import pytest

from trainer.local_models import world
from trainer.local_models.scenes import parse_prompt, split_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return world.install_world(tmp_path_factory.mktemp("world"))


def test_the_shipped_weights_were_trained_by_the_codes_recipe():
    # Fails when a recipe (a config default, WORLD_VERSION) changed without retraining:
    # python -m trainer.local_models.world
    world.check_shipped()
    assert world.shipped_recipe() == json.loads(json.dumps(world.recipe()))


def test_a_stale_recipe_is_refused_with_the_command_that_retrains(monkeypatch, tmp_path):
    monkeypatch.setattr(world, "WORLD_VERSION", world.WORLD_VERSION + 1)
    with pytest.raises(RuntimeError, match="python -m trainer.local_models.world"):
        world.check_shipped()
    with pytest.raises(RuntimeError, match="missing"):
        world.check_shipped(tmp_path)


def test_install_copies_the_models_and_writes_the_jobs_inputs(installed):
    from trainer.pretrain_data import load_pretrain_pairs

    for name in world.MODELS:
        assert (installed[name] / "model_index.json").exists() or (installed[name] / "config.json").exists()
    splits = split_prompts(0, 0.25, 0.25)
    train = installed["train_prompts"].read_text().splitlines()
    heldout = installed["heldout_prompts"].read_text().splitlines()
    # Every prompt is the world's; held-out prompts are the split no model of the world trained on.
    assert [parse_prompt(p) for p in heldout] == splits["heldout"]
    assert all(parse_prompt(p) in splits["train"] for p in train) and not set(train) & set(heldout)
    images, prompts = load_pretrain_pairs(installed["pretrain"], 32)
    assert images.shape[1:] == (32, 32, 3) and set(prompts) <= {p for p in train} | set(prompts)
    assert all(parse_prompt(p) in splits["train"] for p in prompts)


def test_the_text_to_image_model_draws_recognisable_scenes_but_misses_attributes(installed):
    """Loaded as the job loads SD 1.5; on held-out prompts the oracle reads most backgrounds and colors right, and
    all four attributes right in 20-70% of samples (the issue's target; measured: see t2i_metrics.json)."""
    from trainer.config import ModelConfig, SamplingConfig
    from trainer.local_models.oracle import attribute_accuracy
    from trainer.sampling import load_pipeline, sample_images, set_scheduler

    pipe = load_pipeline(ModelConfig(pretrained=str(installed["text_to_image"]), resolution=32, dtype="float32"))
    sampling = SamplingConfig(scheduler="ddim", steps=10, guidance_scale=5.0)
    set_scheduler(pipe, sampling)
    heldout = split_prompts(0, 0.25, 0.25)["heldout"]
    prompts = installed["heldout_prompts"].read_text().splitlines()
    samples = sample_images(pipe, prompts, list(range(len(prompts))), sampling, 32)
    accuracy = attribute_accuracy(samples.images, heldout)
    assert accuracy["background"] >= 0.8 and accuracy["color"] >= 0.6, accuracy
    assert 0.15 <= accuracy["all"] <= 0.75, accuracy
    # Counts are what it gets wrong most, as SD does.
    assert accuracy["count"] == min(accuracy[a] for a in ("count", "color", "object", "background")), accuracy
    assert np.isfinite(samples.latents.numpy()).all()


def test_the_job_encodes_training_images_as_the_world_model_was_trained(installed):
    """The job's latents of the pre-training pairs (and of scored samples: `encode_images`) are the VAE posterior's
    mean, the latents the world's UNet trained on: its denoising loss on them is near the recipe's final loss. A
    posterior sample adds the posterior's noise to every target (measured: 0.21 vs 0.07)."""
    import torch
    from diffusers import DDPMScheduler

    from trainer.config import ModelConfig
    from trainer.losses import denoising_loss_per_sample
    from trainer.pretrain_data import load_pretrain_pairs
    from trainer.sampling import load_pipeline
    from trainer.training import encode_images, encode_prompts

    pipe = load_pipeline(ModelConfig(pretrained=str(installed["text_to_image"]), resolution=32, dtype="float32"))
    images, prompts = load_pretrain_pairs(installed["pretrain"], 32)
    images, prompts = images[:64], prompts[:64]
    latents = encode_images(pipe, images, batch_size=16)  # (64, 4, 16, 16)
    # Batch-independent: an image's latents do not depend on what else is encoded with it.
    torch.testing.assert_close(encode_images(pipe, images[:3], batch_size=64), latents[:3], atol=1e-4, rtol=0)
    cond = encode_prompts(pipe, prompts, {})
    with torch.no_grad():
        posterior = pipe.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
        sampled = posterior.sample(torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
        generator = torch.Generator().manual_seed(1)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (len(latents),), generator=generator)
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        loss = denoising_loss_per_sample(pipe.unet, schedule, latents, cond, noise, t).mean().item()
        sampled_loss = denoising_loss_per_sample(pipe.unet, schedule, sampled, cond, noise, t).mean().item()
    recipe_loss = json.loads((installed["text_to_image"] / "t2i_metrics.json").read_text())["unet_loss"]
    assert loss <= 1.5 * recipe_loss + 0.02 and sampled_loss > 2 * loss, (loss, sampled_loss, recipe_loss)


def test_the_captioner_tells_a_matching_prompt_from_a_one_attribute_change(installed):
    """Loaded by the caption reward (Blip2 `from_pretrained`, MiniLM similarity) as the local profile serves it: on
    held-out renders, clean and degraded, the matching prompt outscores a one-attribute change (measured 0.996 on
    448 pairs; the issue's bar is 0.90)."""
    from trainer.local_models.captioner import evaluate_captioner

    result = evaluate_captioner(installed["captioner"], n_pairs=48, seed=1)
    assert result["pair_accuracy"] >= 0.9, result

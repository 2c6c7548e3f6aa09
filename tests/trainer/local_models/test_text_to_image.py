"""The world's text-to-image model: its recipe trains and saves SD 1.5's layout, and the job loads it like SD 1.5."""

import json

import numpy as np
import pytest

from services.config import ConfigError
from trainer.config import ModelConfig, SamplingConfig
from trainer.local_models.text_to_image import TextToImageConfig, train_text_to_image
from trainer.sampling import load_pipeline, sample_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A recipe small enough to train in seconds.
TINY = dict(
    train_images=64,
    vae_channels=(8, 16),
    vae_steps=3,
    vae_batch_size=4,
    unet_channels=(16, 16),
    unet_steps=3,
    unet_batch_size=4,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from trainer.local_models.tiny import save_pretrained, tiny_clip

    path = tmp_path_factory.mktemp("clip")
    save_pretrained(path, *tiny_clip(seed=0))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip_dir):
    out = tmp_path_factory.mktemp("t2i")
    return train_text_to_image(out, clip_dir, TextToImageConfig(**TINY))


def test_the_recipe_saves_sd15s_layout(trained):
    index = json.loads((trained / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (trained / part).is_dir(), part
    metrics = json.loads((trained / "t2i_metrics.json").read_text())
    assert metrics["config"]["unet_steps"] == TINY["unet_steps"]
    assert set(metrics["vae_reconstruction_oracle"]) == {"count", "color", "object", "background", "all"}


def test_the_job_loads_it_through_from_pretrained_and_samples_prompts(trained):
    pipe = load_pipeline(ModelConfig(pretrained=str(trained), resolution=32, dtype="float32"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 2  # 32 px images, 16x16 latents
    assert pipe.tokenizer.model_max_length == TextToImageConfig().max_length
    # Weights were saved in float16 and load in the job's model.dtype.
    assert next(pipe.unet.parameters()).dtype.is_floating_point
    samples = sample_images(
        pipe, ["two red balls in the city"] * 2, [1, 2], SamplingConfig(steps=2, samples_per_prompt=2), 32
    )
    assert samples.images.shape == (2, 32, 32, 3) and samples.images.dtype == np.uint8
    assert samples.latents.shape == (2, 4, 16, 16)


def test_the_text_tower_is_the_stand_ins_and_stays_frozen(trained, clip_dir):
    import torch
    from transformers import CLIPModel

    pipe = load_pipeline(ModelConfig(pretrained=str(trained), resolution=32, dtype="float32"))
    clip = CLIPModel.from_pretrained(clip_dir)
    ids = pipe.tokenizer(["two red balls in the city"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = pipe.text_encoder(ids)[0]
        theirs = clip.text_model(ids)[0]
    # Saved in float16: equal to the stand-in's up to half precision.
    assert torch.allclose(ours, theirs, atol=0.05)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"vae_channels": (8,)}, "vae_channels"),
        ({"unet_steps": 0}, "unet_steps"),
        ({"uncond_fraction": 1.0}, "uncond_fraction"),
        ({"unet_layers": 2}, "unet_layers"),
    ],
)
def test_bad_recipes_fail_at_construction_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        TextToImageConfig(**changes)

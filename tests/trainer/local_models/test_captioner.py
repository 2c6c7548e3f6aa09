"""The trained tiny captioner: it trains, saves in the release layout, loads through the caption reward's own
`from_pretrained` path, and captions what it was trained on better than its untrained self."""

import json

import numpy as np
import pytest

from services.config import ConfigError, replace
from services.rewards.caption import Caption, CaptionConfig
from trainer.local_models.captioner import (
    TEXT_ENCODER,
    CaptionerConfig,
    build_captioner,
    read_caption,
    train_captioner,
)
from trainer.local_models.scenes import render_image, render_prompt, split_prompts

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# 200 steps at small widths (~25 s on one core): enough to learn the caption template, the background and some colors.
SMALL = CaptionerConfig(
    vision_hidden=32,
    qformer_hidden=32,
    text_hidden=16,
    num_query_tokens=4,
    patch_size=8,
    train_pairs=512,
    steps=200,
    batch_size=16,
    lr=5e-3,
    eval_pairs=8,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_captioner(tmp_path_factory.mktemp("captioner"), SMALL)


def caption_reward(model_dir=None, **modules) -> Caption:
    config = CaptionConfig(
        captioner=str(model_dir or "unused"), max_new_tokens=SMALL.max_new_tokens, text_encoder=TEXT_ENCODER
    )
    reward = Caption(config, **modules)
    reward.load("cpu")
    return reward


def training_renders(n: int):
    """Fresh renders of training prompts (the "clip" and "train" splits) and their prompts."""
    splits = split_prompts(SMALL.seed, 0.25, 0.25)
    prompts = splits["clip"] + splits["train"]
    rng = np.random.default_rng(123)
    attrs = [prompts[i] for i in rng.choice(len(prompts), n, replace=False)]
    return [render_image(a, rng, SMALL.image_size) for a in attrs], [render_prompt(a) for a in attrs]


def test_trains_saves_and_loads_through_the_caption_reward(trained):
    assert (trained / "config.json").exists() and (trained / "processor_config.json").exists()
    metrics = json.loads((trained / "captioner_metrics.json").read_text())
    assert metrics["config"] == SMALL.model_dump()
    assert np.isfinite(metrics["final_loss"]) and metrics["seconds"] > 0
    assert 0 <= metrics["evaluation"]["pair_accuracy"] <= 1

    images, prompts = training_renders(4)
    # The reward's own loading: Blip2Processor and Blip2ForConditionalGeneration.from_pretrained of the directory.
    outputs = caption_reward(trained).score(images, prompts)
    assert [type(o.caption) for o in outputs] == [str] * 4
    assert all(-1 <= o.reward <= 1 for o in outputs)


def test_training_makes_captions_say_the_prompt(trained):
    images, prompts = training_renders(16)
    untrained_model, processor = build_captioner(SMALL)
    untrained = caption_reward(captioner=untrained_model, processor=processor)
    before = np.mean([o.reward for o in untrained.score(images, prompts)])
    after_outputs = caption_reward(trained).score(images, prompts)
    after = np.mean([o.reward for o in after_outputs])
    # Measured (seed 0): 0.01 untrained (random words), 0.62 trained.
    assert after > before + 0.25, (before, after, [o.caption for o in after_outputs])
    # The captions use the world's words: a background phrase in most.
    assert np.mean([read_caption(o.caption)["background"] is not None for o in after_outputs]) >= 0.5


def test_build_is_seeded():
    first, second = build_captioner(SMALL)[0].state_dict(), build_captioner(SMALL)[0].state_dict()
    assert all(first[k].equal(second[k]) for k in first)
    other = build_captioner(replace(SMALL, seed=1))[0].state_dict()
    assert not first["query_tokens"].equal(other["query_tokens"])


def test_read_caption():
    assert read_caption("three green balls in the city") == {
        "count": 3,
        "color": "green",
        "object": "ball",
        "background": "city",
    }
    assert read_caption("one red red on the") == {"count": 1, "color": "red", "object": None, "background": None}
    assert read_caption("two red blue cubes") == {"count": 2, "color": None, "object": "cube", "background": None}


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match=r"CaptionerConfig: unknown key\(s\) \['step'\]"):
        CaptionerConfig(step=10)
    with pytest.raises(ConfigError, match=r"CaptionerConfig\.degrade_fraction must be <= 1"):
        CaptionerConfig(degrade_fraction=1.5)
    with pytest.raises(ConfigError, match=r"CaptionerConfig\.text_hidden \(30\) must be a multiple of text_heads"):
        CaptionerConfig(text_hidden=30)
    with pytest.raises(ConfigError, match=r"CaptionerConfig\.image_size \(32\) must be a multiple of patch_size"):
        CaptionerConfig(patch_size=5)

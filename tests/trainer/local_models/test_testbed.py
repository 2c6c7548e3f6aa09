"""The synthetic feedback testbed: prompts, perturbations, rendering, splits, feedback files, stand-in CLIP.

Object and background colors are exact palette values, so `decode` reads an image's count, color and background back
from its pixels; the feedback tests use it to check what each image shows without trusting the writer's bookkeeping.
"""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from services.config import replace
from trainer.local_models.scenes import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLORS,
    COUNTS,
    OBJECT_RGB,
    OBJECTS,
    PERTURBABLE,
    all_prompts,
    perturb,
    pretraining_caption,
    random_attrs,
    render_image,
    render_prompt,
    split_prompts,
)
from trainer.local_models.testbed import TestbedConfig, build_testbed, pretrain_clip, write_feedback

# Small enough to pretrain in a few seconds; only checks that pretraining runs and saves a loadable model.
TINY = TestbedConfig(
    image_size=32, images_per_prompt=4, clip_pairs=64, clip_epochs=1, clip_batch_size=32, clip_hidden=16, clip_layers=1
)


def decode(img: np.ndarray) -> dict:
    """Count, color and background of a rendered image, read from its exact palette colors."""
    present = [c for c, rgb in OBJECT_RGB.items() if np.all(img == rgb, axis=-1).any()]
    assert len(present) == 1, f"expected one object color, found {present}"
    _, count = ndimage.label(np.all(img == OBJECT_RGB[present[0]], axis=-1))
    area = {b: sum(int(np.all(img == rgb, axis=-1).sum()) for rgb in BACKGROUND_RGB[b].values()) for b in BACKGROUNDS}
    return {"count": count, "color": present[0], "background": max(area, key=area.get)}


def differing(a: dict, b: dict) -> list[str]:
    return [key for key in a if a[key] != b[key]]


def test_render_prompt_examples():
    assert render_prompt({"count": 2, "color": "green", "object": "ball", "background": "city"}) == (
        "two green balls in the city"
    )
    assert render_prompt({"count": 1, "color": "red", "object": "cube", "background": "beach"}) == (
        "one red cube on the beach"
    )
    assert render_prompt({"count": 4, "color": "purple", "object": "pyramid", "background": "snow"}) == (
        "four purple pyramids in the snow"
    )
    assert render_prompt({"count": 3, "color": "blue", "object": "ball", "background": "forest"}) == (
        "three blue balls in the forest"
    )


def test_pretraining_captions_write_the_count_as_a_digit():
    from trainer.local_models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert pretraining_caption({"count": 3, "color": "green", "object": "ball", "background": "city"}, True) == (
        "3 green balls in the city"
    )
    for attrs in all_prompts():
        prompt, caption = render_prompt(attrs), pretraining_caption(attrs, count_as_digit=True)
        assert pretraining_caption(attrs, count_as_digit=False) == prompt
        # Only the count is rewritten; the noun keeps the prompt's singular or plural.
        assert caption.split(" ", 1) == [str(attrs["count"]), prompt.split(" ", 1)[1]]
        # The digit is a token of its own, so the captions carry the count, and no number word reaches pretraining.
        tokens = tokenizer.tokenize(caption)
        assert tokens[0] == str(attrs["count"]) and tokenizer.unk_token not in tokens
        assert not set(tokens) & {"one", "two", "three", "four"}


def test_render_prompt_rejects_unknown_values():
    with pytest.raises(ValueError, match="color"):
        render_prompt({"count": 1, "color": "teal", "object": "ball", "background": "city"})
    with pytest.raises(ValueError, match="keys"):
        render_prompt({"count": 1, "color": "red", "object": "ball"})


def test_all_prompts_is_every_combination():
    prompts = all_prompts()
    assert len(prompts) == len(COUNTS) * len(COLORS) * len(OBJECTS) * len(BACKGROUNDS) == 448
    assert len({render_prompt(p) for p in prompts}) == 448
    assert all(tuple(p) == ATTRIBUTES for p in prompts)


def test_perturb_changes_exactly_one_perturbable_attribute():
    rng = np.random.default_rng(0)
    for _ in range(20):
        attrs = random_attrs(rng)
        for n in (1, 3, 12):
            out = perturb(attrs, rng, n)
            assert len(out) == n
            assert len({render_prompt(p) for p in out} | {render_prompt(attrs)}) == n + 1  # distinct, none = attrs
            for p in out:
                changed = differing(attrs, p)
                assert len(changed) == 1 and changed[0] in PERTURBABLE


def test_perturb_is_balanced_and_rejects_too_many():
    rng = np.random.default_rng(0)
    attrs = {"count": 2, "color": "green", "object": "ball", "background": "city"}
    changed = [differing(attrs, perturb(attrs, rng)[0])[0] for _ in range(600)]
    for key in PERTURBABLE:  # 200 expected each
        assert 150 < changed.count(key) < 250
    # 3 other counts + 6 other colors + 3 other backgrounds.
    assert len(perturb(attrs, rng, 12)) == 12
    with pytest.raises(ValueError, match="n must be in"):
        perturb(attrs, rng, 13)
    with pytest.raises(ValueError, match="n must be in"):
        perturb(attrs, rng, -1)


@pytest.mark.parametrize("size", [64, 32])
def test_render_image_is_seeded(size):
    attrs = {"count": 3, "color": "yellow", "object": "pyramid", "background": "beach"}
    a = render_image(attrs, np.random.default_rng(7), size)
    b = render_image(attrs, np.random.default_rng(7), size)
    c = render_image(attrs, np.random.default_rng(8), size)
    assert a.shape == (size, size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_backgrounds_have_distinct_mean_colors():
    rng = np.random.default_rng(0)
    means = {}
    for background in BACKGROUNDS:
        images = [render_image({**random_attrs(rng), "background": background}, rng) for _ in range(16)]
        means[background] = np.mean([img.reshape(-1, 3).mean(0) for img in images], axis=0)
    for i, a in enumerate(BACKGROUNDS):
        for b in BACKGROUNDS[i + 1 :]:
            assert np.linalg.norm(means[a] - means[b]) > 30, (a, b, means[a], means[b])


@pytest.mark.parametrize("size", [64, 32])
def test_objects_are_countable(size):
    """Every object shows as its own blob of the fill color, big enough to see, at 64 px and at 32 px."""
    rng = np.random.default_rng(size)
    for _ in range(120):
        attrs = random_attrs(rng)
        img = render_image(attrs, rng, size)
        decoded = decode(img)
        assert decoded == {k: attrs[k] for k in ("count", "color", "background")}
        labels, count = ndimage.label(np.all(img == OBJECT_RGB[attrs["color"]], axis=-1))
        assert min(np.bincount(labels.ravel())[1:]) >= (40 if size == 64 else 10)


def test_split_prompts_disjoint_and_covering():
    splits = split_prompts(seed=0)
    keys = {name: {render_prompt(p) for p in split} for name, split in splits.items()}
    assert {name: len(k) for name, k in keys.items()} == {"clip": 224, "train": 112, "heldout": 112}
    assert not keys["clip"] & keys["train"] and not keys["clip"] & keys["heldout"]
    assert not keys["train"] & keys["heldout"]
    assert keys["clip"] | keys["train"] | keys["heldout"] == {render_prompt(p) for p in all_prompts()}
    for split in splits.values():
        for key, values in (("count", COUNTS), ("color", COLORS), ("object", OBJECTS), ("background", BACKGROUNDS)):
            assert {p[key] for p in split} == set(values)
    assert split_prompts(seed=0) == splits
    assert split_prompts(seed=1) != splits
    with pytest.raises(ValueError, match="at least one prompt"):
        split_prompts(clip_fraction=0.8, heldout_fraction=0.2)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="image_size"):
        TestbedConfig(image_size=30)
    with pytest.raises(ValueError, match="label_noise"):
        TestbedConfig(label_noise=0.7)
    with pytest.raises(ValueError, match="clip_hidden"):
        TestbedConfig(clip_hidden=30)
    with pytest.raises(ValueError, match="clip_fraction"):
        TestbedConfig(clip_fraction=0.5, heldout_fraction=0.5)


def read_feedback(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_feedback_without_noise(tmp_path):
    prompts = split_prompts()["train"][:6]
    config = replace(TINY, image_size=64, images_per_prompt=6, label_noise=0.0)
    path = write_feedback(tmp_path, prompts, config, np.random.default_rng(0))
    assert path == tmp_path / "feedback.jsonl"
    rows = read_feedback(path)
    assert len(rows) == 36
    for attrs in prompts:
        mine = [r for r in rows if r["prompt"] == render_prompt(attrs)]
        assert len(mine) == 6 and sum(r["label"] for r in mine) == 3  # positive_fraction 0.5, exactly
    for row in rows:
        assert set(row) == {"image", "prompt", "label", *ATTRIBUTES}
        attrs = {k: row[k] for k in ATTRIBUTES}
        assert row["prompt"] == render_prompt(attrs)  # the attribute fields describe the prompt
        img = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"))
        assert img.shape == (64, 64, 3)
        changed = differing({k: attrs[k] for k in PERTURBABLE}, decode(img))
        if row["label"] == 1:
            assert changed == []
        else:
            assert len(changed) == 1, (row, decode(img))
    assert len({r["image"] for r in rows}) == 36


def test_write_feedback_flips_labels(tmp_path):
    prompts = split_prompts()["heldout"][:20]
    config = replace(TINY, images_per_prompt=8, label_noise=0.25, positive_fraction=0.75)
    rows = read_feedback(write_feedback(tmp_path, prompts, config, np.random.default_rng(1)))
    flipped = truly_positive = 0
    for row in rows:
        shown = decode(np.asarray(Image.open(tmp_path / row["image"]).convert("RGB")))
        true_label = int(all(shown[k] == row[k] for k in PERTURBABLE))
        truly_positive += true_label
        flipped += true_label != row["label"]
    assert truly_positive == 120  # 6 of 8 per prompt, before noise
    assert 20 < flipped < 60  # 40 expected of 160


def test_pretrain_clip_saves_loadable_model(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    prompts = split_prompts()["clip"]
    out = pretrain_clip(prompts, TINY, tmp_path / "clip")
    assert out == tmp_path / "clip"
    model = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    assert model.config.vision_config.image_size == 32 and model.config.projection_dim == 16
    assert model.config.text_config.eos_token_id == processor.tokenizer.sep_token_id  # CLIP pools at [SEP]

    rng = np.random.default_rng(0)
    images = [render_image(p, rng, 32) for p in prompts[:3]]
    texts = [render_prompt(p) for p in prompts[:3]]
    inputs = processor(text=texts, images=images, padding=True, truncation=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert model(**inputs).logits_per_image.shape == (3, 3)
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert 0.0 <= metrics["retrieval_top1"] <= 1.0 and metrics["config"]["clip_pairs"] == 64

    # Deterministic on CPU: the same config gives the same weights.
    again = CLIPModel.from_pretrained(pretrain_clip(prompts, TINY, tmp_path / "again"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.equal(b), name


def test_build_testbed_end_to_end(tmp_path):
    config = replace(TINY, images_per_prompt=2, clip_fraction=0.25, heldout_fraction=0.2)
    paths = build_testbed(tmp_path, config)
    assert paths == {
        "clip": tmp_path / "clip",
        "train": tmp_path / "train" / "feedback.jsonl",
        "heldout": tmp_path / "heldout" / "feedback.jsonl",
    }
    train, heldout = read_feedback(paths["train"]), read_feedback(paths["heldout"])
    # The config's fractions of the 448 prompts: 112 for CLIP, 90 held out, the other 246 for training.
    assert (len(train), len(heldout)) == (246 * 2, 90 * 2)
    assert json.loads((tmp_path / "clip" / "pretrain_metrics.json").read_text())["prompts"] == 112
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert (tmp_path / "clip" / "config.json").exists()

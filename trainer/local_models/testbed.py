"""Synthetic feedback testbed for the learned alignment reward (Lee et al. 2023), runnable on CPU.

Lee et al. train a reward on human (image, prompt, good/bad) feedback, with prompts that combine count, color and
background ("two green dogs in the city"), on top of frozen CLIP embeddings. Neither the feedback nor CLIP is
available offline, so this module provides both in miniature:

- rendered scenes with known attributes (`render_image`): `count` outlined objects of one `color` and shape
  (`object`) on one of four `background`s, and their prompt (`render_prompt`): 4 x 7 x 4 x 4 = 448 combinations;
- feedback files (`write_feedback`): images that match their prompt (label 1) or differ from it in exactly one
  attribute a perturbation may change (label 0), with a fraction of labels flipped as human raters disagree;
- a stand-in for the frozen CLIP (`pretrain_clip`): a small transformers `CLIPModel` trained contrastively on rendered
  pairs of a separate split of prompts, saved with `save_pretrained` so rewards load it like real weights. Like real
  CLIP it is poor at counts: its pretraining captions write the count as a digit ("3 green balls"), never as the
  prompts' number words. So its image embeddings encode the count and its text embeddings tell number words apart,
  but its cosine similarity never learned to match the two: it rejects a wrong count only when the noun's singular
  or plural gives it away. Matching them is the gap a learned reward should close.

`split_prompts` keeps the three uses of the 448 attribute combinations disjoint: "clip" (pretraining), "train" and
"heldout" (feedback); held-out prompts are unseen by both the reward's training and the stand-in CLIP.
`build_testbed` runs everything end to end.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.config import to_dict

COUNTS = (1, 2, 3, 4)
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink")
# Drawn as disc, square, triangle and diamond.
OBJECTS = ("ball", "cube", "pyramid", "gem")
BACKGROUNDS = ("city", "forest", "beach", "snow")
# The fields of an attribute dict.
ATTRIBUTES = ("count", "color", "object", "background")
# The attributes a perturbation may change (Lee et al.: count, color, background).
PERTURBABLE = ("count", "color", "background")
VALUES = {"count": COUNTS, "color": COLORS, "object": OBJECTS, "background": BACKGROUNDS}

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
BACKGROUND_PHRASES = {"city": "in the city", "forest": "in the forest", "beach": "on the beach", "snow": "in the snow"}

# Object fill colors. Saturated, and never used by a background, so an image's color and count can be read back from
# its pixels exactly (the tests do).
OBJECT_RGB = {
    "red": (220, 30, 30),
    "green": (60, 230, 60),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 50, 200),
    "orange": (250, 130, 10),
    "pink": (250, 120, 200),
}
# Every object gets a dark outline: it keeps a green ball visible in the forest and a yellow one on the sand.
OUTLINE_RGB = (20, 20, 20)
# The flat colors each background is painted with (no pixel noise, so backgrounds too can be read back exactly).
BACKGROUND_RGB = {
    "city": {"base": (150, 150, 155), "building": (95, 95, 105), "building_alt": (115, 108, 100)},
    "forest": {"base": (50, 110, 45), "canopy": (25, 70, 30), "trunk": (95, 65, 35)},
    "beach": {"sky": (135, 200, 235), "sea": (40, 120, 180), "sand": (225, 200, 140)},
    "snow": {"base": (236, 238, 244), "drift": (212, 218, 230)},
}

# Object half size as a fraction of the image side, before the outline; the range is the size jitter. At 32 px an
# object is still 6-8 px across.
OBJECT_HALF_SIZE = (0.09, 0.12)
# Placement: random centres, rejected until no two outlined objects come closer than the gap; after this many
# restarts of a whole layout (never seen in practice) objects go one per image quadrant, which always fits.
PLACEMENT_RESTARTS = 50
PLACEMENT_TRIES = 50

# Numpy seed-sequence streams (`default_rng([seed, stream])`), so each use of randomness is independent of the others.
STREAM_CLIP_PAIRS = 0
STREAM_CLIP_EVAL = 1
STREAM_TRAIN_FEEDBACK = 2
STREAM_HELDOUT_FEEDBACK = 3
# Held-out retrieval check of the stand-in CLIP: batches of this many distinct prompts (chance = 1 / this).
RETRIEVAL_BATCH = 32
RETRIEVAL_BATCHES = 16


def _check_attrs(attrs: dict) -> None:
    if set(attrs) != set(ATTRIBUTES):
        raise ValueError(f"attribute dict must have exactly the keys {list(ATTRIBUTES)}, got {sorted(attrs)}")
    for key, values in VALUES.items():
        if attrs[key] not in values:
            raise ValueError(f"{key} must be one of {list(values)}, got {attrs[key]!r}")


def render_prompt(attrs: dict) -> str:
    """The prompt of an attribute dict, e.g. "two green balls in the city"."""
    _check_attrs(attrs)
    noun = attrs["object"] + ("s" if attrs["count"] > 1 else "")
    return f"{COUNT_WORDS[attrs['count']]} {attrs['color']} {noun} {BACKGROUND_PHRASES[attrs['background']]}"


def perturb(attrs: dict, rng: np.random.Generator, n: int = 1) -> list[dict]:
    """`n` distinct attribute dicts that each differ from `attrs` in exactly one attribute of PERTURBABLE.

    Each draw picks the attribute uniformly (among those with values left), then a value not yet used, so single
    perturbations are balanced across count, color and background (a uniform draw over all 12 alternatives would
    favour color, which has the most values).

    Raises:
        ValueError: `n` is negative or exceeds the number of distinct perturbations (12).
    """
    _check_attrs(attrs)
    left = {key: [v for v in VALUES[key] if v != attrs[key]] for key in PERTURBABLE}
    total = sum(len(v) for v in left.values())
    if not 0 <= n <= total:
        raise ValueError(f"n must be in [0, {total}] (the distinct single-attribute perturbations), got {n}")
    out = []
    for _ in range(n):
        keys = [key for key in PERTURBABLE if left[key]]
        key = keys[int(rng.integers(len(keys)))]
        value = left[key].pop(int(rng.integers(len(left[key]))))
        out.append({**attrs, key: value})
    return out


def pretraining_caption(attrs: dict, count_as_digit: bool) -> str:
    """The stand-in CLIP's pretraining caption of an image showing `attrs`: its prompt, with the count written as a
    digit ("3 green balls in the city") when `count_as_digit`."""
    prompt = render_prompt(attrs)
    if not count_as_digit:
        return prompt
    return f"{attrs['count']}{prompt.removeprefix(COUNT_WORDS[attrs['count']])}"


def random_attrs(rng: np.random.Generator) -> dict:
    """An attribute dict with every attribute drawn uniformly."""
    return {key: values[int(rng.integers(len(values)))] for key, values in VALUES.items()}


def all_prompts() -> list[dict]:
    """Every attribute combination (4 counts x 7 colors x 4 objects x 4 backgrounds = 448), in a fixed order."""
    return [dict(zip(ATTRIBUTES, combo, strict=True)) for combo in itertools.product(*VALUES.values())]


def split_prompts(seed: int = 0, clip_fraction: float = 0.5, heldout_fraction: float = 0.25) -> dict[str, list[dict]]:
    """Disjoint splits of `all_prompts()`: "clip" (stand-in CLIP pretraining), "train" and "heldout" (feedback).

    Both fractions are of all 448 combinations; "train" gets the rest. Every attribute value appears in every split
    (a value seen only in held-out prompts would test vocabulary, not composition): the shuffle is redrawn until it
    does.

    Raises:
        ValueError: fractions that leave a split empty, or no shuffle in 1000 covers every value in every split.
    """
    prompts = all_prompts()
    n_clip, n_heldout = round(clip_fraction * len(prompts)), round(heldout_fraction * len(prompts))
    if n_clip < 1 or n_heldout < 1 or n_clip + n_heldout >= len(prompts):
        raise ValueError(
            f"clip_fraction={clip_fraction} and heldout_fraction={heldout_fraction} must each leave at least one "
            "prompt in clip, heldout and train"
        )
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        order = rng.permutation(len(prompts))
        splits = {
            "clip": [prompts[i] for i in order[:n_clip]],
            "train": [prompts[i] for i in order[n_clip + n_heldout :]],
            "heldout": [prompts[i] for i in order[n_clip : n_clip + n_heldout]],
        }
        if all({p[key] for p in split} == set(VALUES[key]) for split in splits.values() for key in ATTRIBUTES):
            return splits
    raise ValueError(
        f"no split with clip_fraction={clip_fraction}, heldout_fraction={heldout_fraction} covers every value"
    )


# --- Rendering ---------------------------------------------------------------------------------------------------


def _rect(img: np.ndarray, y0: float, y1: float, x0: float, x1: float, rgb: tuple[int, int, int]) -> None:
    size = img.shape[0]
    y0, y1, x0, x1 = (int(np.clip(round(v), 0, size)) for v in (y0, y1, x0, x1))
    img[y0:y1, x0:x1] = rgb


def _ellipse_mask(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _draw_background(img: np.ndarray, background: str, rng: np.random.Generator) -> None:
    """Paints `img` in place; layouts are random, colors are BACKGROUND_RGB's."""
    size = img.shape[0]
    rgb = BACKGROUND_RGB[background]
    if background == "city":
        img[:] = rgb["base"]
        x = -rng.uniform(0, 0.1) * size
        while x < size:  # a row of buildings of random width and height standing on the bottom edge
            width = rng.uniform(0.1, 0.22) * size
            top = size * (1 - rng.uniform(0.3, 0.85))
            _rect(img, top, size, x, x + width, rgb["building" if rng.random() < 0.5 else "building_alt"])
            x += width + rng.uniform(0.02, 0.08) * size
    elif background == "forest":
        img[:] = rgb["base"]
        for _ in range(int(rng.integers(5, 9))):  # trees: a trunk under a dark canopy
            cx, cy = rng.uniform(0, size), rng.uniform(0.15, 0.75) * size
            r = rng.uniform(0.08, 0.14) * size
            _rect(img, cy, cy + 2.5 * r, cx - 0.25 * r, cx + 0.25 * r, rgb["trunk"])
            img[_ellipse_mask(size, cy, cx, r, r)] = rgb["canopy"]
    elif background == "beach":
        horizon = rng.uniform(0.3, 0.45) * size
        shore = horizon + rng.uniform(0.06, 0.12) * size
        img[:] = rgb["sand"]
        _rect(img, 0, shore, 0, size, rgb["sea"])
        _rect(img, 0, horizon, 0, size, rgb["sky"])
    elif background == "snow":
        img[:] = rgb["base"]
        for _ in range(int(rng.integers(2, 5))):  # soft drifts
            cy, cx = rng.uniform(0.3, 1.0) * size, rng.uniform(0, size)
            img[_ellipse_mask(size, cy, cx, rng.uniform(0.06, 0.12) * size, rng.uniform(0.2, 0.4) * size)] = rgb[
                "drift"
            ]
    else:
        raise ValueError(f"background must be one of {list(BACKGROUNDS)}, got {background!r}")


def _shape_mask(shape: str, size: int, cy: float, cx: float, half: float) -> np.ndarray:
    """(size, size) bool mask of one object centred at (cy, cx), `half` = half its extent."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    if shape == "ball":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= half**2
    if shape == "cube":  # a bit smaller than its box, so its area is close to the disc's
        return (np.abs(yy - cy) <= 0.9 * half) & (np.abs(xx - cx) <= 0.9 * half)
    if shape == "pyramid":  # apex up, base on the bottom of the box
        top = cy - half
        return (yy >= top) & (yy <= cy + half) & (np.abs(xx - cx) <= (yy - top) / 2)
    if shape == "gem":  # a square standing on its corner
        return np.abs(yy - cy) + np.abs(xx - cx) <= 1.1 * half
    raise ValueError(f"object must be one of {list(OBJECTS)}, got {shape!r}")


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation with a 3x3 square, `steps` times (no scipy needed at runtime)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        out = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
        mask = out
    return mask


def _place(halves: list[float], size: int, reach: float, gap: float, rng: np.random.Generator) -> list[tuple]:
    """Centres (cy, cx) for objects of the given half sizes whose boxes (half + reach) keep `gap` pixels apart."""
    for _ in range(PLACEMENT_RESTARTS):
        placed: list[tuple[float, float, float]] = []
        for half in halves:
            extent = half + reach
            for _ in range(PLACEMENT_TRIES):
                cy, cx = rng.uniform(extent, size - extent, 2)
                if all(
                    abs(cy - py) >= extent + pe + gap or abs(cx - px) >= extent + pe + gap for py, px, pe in placed
                ):
                    placed.append((cy, cx, extent))
                    break
            else:
                break
        else:
            return [(cy, cx) for cy, cx, _ in placed]
    # One object per quadrant, centred: always fits, as an object's box is at most a quarter of the image side.
    quadrants = [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]
    order = rng.permutation(len(quadrants))[: len(halves)]
    return [(quadrants[i][0] * size, quadrants[i][1] * size) for i in order]


def render_image(attrs: dict, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A rendered scene: `count` outlined objects of `color` and shape `object` on `background`.

    Returns a (size, size, 3) uint8 RGB array. Layout (background details, object positions, size jitter) comes from
    `rng`: the same attributes and rng state give the same image.
    """
    _check_attrs(attrs)
    if size < 16:
        raise ValueError(f"size must be >= 16 for objects to stay visible, got {size}")
    img = np.empty((size, size, 3), dtype=np.uint8)  # (H, W, 3) uint8
    _draw_background(img, attrs["background"], rng)

    outline = max(1, size // 32)
    gap = max(2, size // 32)
    halves = [rng.uniform(*OBJECT_HALF_SIZE) * size for _ in range(attrs["count"])]
    for (cy, cx), half in zip(_place(halves, size, outline + 1, gap, rng), halves, strict=True):
        fill = _shape_mask(attrs["object"], size, cy, cx, half)
        img[_dilate(fill, outline)] = OUTLINE_RGB
        img[fill] = OBJECT_RGB[attrs["color"]]
    return img


# --- Config ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    # Seeds the prompt split, every rendering stream and the stand-in CLIP's init and batch order.
    seed: int = 0
    # Side of rendered images in pixels; also the stand-in CLIP's input size. 32 rather than 64: a step costs a third
    # as much, and in the same time the stand-in learns to count better (linear probe on its image embeddings, 4
    # counts, from captions stating every count: 0.87 after 12 epochs at 32 px, 0.81 after 6 at 64 px).
    image_size: int = 32
    # Fractions of the 448 prompts for the stand-in CLIP's pretraining (112) and for held-out feedback (112); training
    # feedback gets the rest (224 prompts). The reward learns which number word matches which count from the training
    # prompts: with the earlier 240-prompt vocabulary (5 colors, 3 objects), 60 training prompts gave +5 to +6
    # accuracy points over CLIP score and 120 gave +9 (seed 0).
    clip_fraction: float = 0.25
    heldout_fraction: float = 0.25
    # Feedback samples (images) per prompt: 16 x 224 = 3,584 training samples. With 8 per prompt and 60 training
    # prompts (480 samples) the learned reward overfit and fell below CLIP score on unseen prompts.
    images_per_prompt: int = 16
    # Fraction of each prompt's samples whose image matches the prompt (before label noise).
    positive_fraction: float = 0.5
    # Probability that a label is flipped, as human raters disagree; caps any reward's accuracy at 1 - label_noise.
    label_noise: float = 0.1
    # Rendered (image, prompt) pairs the stand-in CLIP is pretrained on (from the "clip" split only): about 107 per
    # prompt. With 6,000 the stand-in's image embeddings encode the count less well (linear probe 0.75, seed 0).
    clip_pairs: int = 12000
    # Passes over the pretraining pairs; with clip_lr, enough for the stand-in to learn counts from the digits (about
    # 2 min on one CPU core; fewer epochs, a larger batch or a higher rate left counts worse learned). Measured on
    # seeds 0-4: it retrieves the right prompt among 32 62-87% of the time (number words do not tell it 2, 3 and 4
    # apart) and its score classifies the held-out feedback 0.66-0.72 right, while the learned reward reaches
    # 0.80-0.83.
    clip_epochs: int = 12
    # Pretraining captions write the count as a digit ("3 green balls in the city") where prompts spell it out, so
    # the stand-in never learns which count a number word means (its image embeddings still encode the count, from
    # the digits): it notices a wrong count only through the noun's singular or plural, one against many. With number
    # words (False) the same stand-in rejects most changed counts and scores close to the 0.90 that label noise
    # allows, which leaves a learned reward nothing to win. Noisy number words (right only some of the time) were
    # tried first: the stand-in then encodes counts in neither tower, and no head can recover them.
    clip_count_as_digit: bool = True
    # Pairs per contrastive batch (the InfoNCE negatives are the rest of the batch).
    clip_batch_size: int = 64
    # AdamW peak learning rate (linear warmup over the first 5% of steps, then cosine decay to zero).
    clip_lr: float = 1e-3
    # Width of both CLIP towers and of the shared embedding space.
    clip_hidden: int = 64
    # Transformer layers of each tower.
    clip_layers: int = 2
    # Side of the vision tower's square patches in pixels (image_size must be a multiple of it).
    clip_patch_size: int = 8

    # pytest would try to collect a class named Test*.
    __test__ = False

    def __post_init__(self):
        if self.image_size < 16 or self.clip_patch_size < 1 or self.image_size % self.clip_patch_size:
            raise ValueError(
                f"image_size must be >= 16 and a multiple of clip_patch_size ({self.clip_patch_size}), "
                f"got {self.image_size}"
            )
        if min(self.images_per_prompt, self.clip_pairs, self.clip_epochs, self.clip_batch_size, self.clip_layers) < 1:
            raise ValueError(
                "images_per_prompt, clip_pairs, clip_epochs, clip_batch_size and clip_layers must be >= 1"
            )
        if not 0.0 <= self.positive_fraction <= 1.0 or not 0.0 <= self.label_noise <= 0.5:
            raise ValueError("positive_fraction must be in [0, 1] and label_noise in [0, 0.5]")
        if self.clip_hidden < 8 or self.clip_hidden % 4:
            raise ValueError(
                f"clip_hidden must be a multiple of 4 (4 attention heads) and >= 8, got {self.clip_hidden}"
            )
        if min(self.clip_fraction, self.heldout_fraction) <= 0 or self.clip_fraction + self.heldout_fraction >= 1:
            raise ValueError(
                f"clip_fraction ({self.clip_fraction}) and heldout_fraction ({self.heldout_fraction}) must be > 0 "
                "and leave prompts for training feedback"
            )
        if self.clip_lr <= 0:
            raise ValueError(f"clip_lr must be > 0, got {self.clip_lr}")


# --- Feedback ----------------------------------------------------------------------------------------------------


def write_feedback(path_dir: str | Path, prompts: list[dict], config: TestbedConfig, rng: np.random.Generator) -> Path:
    """Renders feedback for `prompts` into `path_dir`; returns the path of `path_dir/feedback.jsonl`.

    Per prompt, `config.images_per_prompt` samples, of which round(positive_fraction * images_per_prompt) are
    positives (image rendered from the prompt's attributes) and the rest negatives (image rendered from one
    `perturb` of them). Each label is then flipped with probability `label_noise`, and nothing records the flip.
    Images go to `path_dir/images/NNNNNN.png`; each jsonl line is {"image": "images/NNNNNN.png" (relative to
    `path_dir`), "prompt", "label": 1 or 0, "count", "color", "object", "background"}, the attributes describing the
    prompt, never the image.
    """
    from PIL import Image

    path_dir = Path(path_dir)
    (path_dir / "images").mkdir(parents=True, exist_ok=True)
    n_pos = round(config.positive_fraction * config.images_per_prompt)
    index = 0
    lines = []
    for attrs in prompts:
        prompt = render_prompt(attrs)
        labels = rng.permutation([1] * n_pos + [0] * (config.images_per_prompt - n_pos))
        for label in labels:
            shown = attrs if label == 1 else perturb(attrs, rng)[0]
            name = f"images/{index:06d}.png"
            Image.fromarray(render_image(shown, rng, config.image_size)).save(path_dir / name)
            noisy = int(label) ^ int(rng.random() < config.label_noise)
            lines.append(json.dumps({"image": name, "prompt": prompt, "label": noisy, **attrs}))
            index += 1
    path = path_dir / "feedback.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --- Stand-in CLIP -----------------------------------------------------------------------------------------------


def _build_clip(config: TestbedConfig):
    """A randomly initialised CLIPModel (seeded) and its CLIPProcessor (CLIP image processor + MiniLM tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trainer.local_models.tiny import _clip_text_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    hidden = config.clip_hidden
    tower = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=config.clip_layers, num_attention_heads=4
    )
    # The tiny CLIP's text conventions (eos = [SEP], so CLIP pools the hidden state there), widened.
    text_config = {**_clip_text_config(tokenizer), **tower}
    vision_config = dict(**tower, image_size=config.image_size, patch_size=config.clip_patch_size)
    clip_config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=hidden)
    torch.manual_seed(config.seed)
    model = CLIPModel(clip_config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size}, crop_size={"height": config.image_size, "width": config.image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _retrieval_top1(model, processor, prompts: list[dict], config: TestbedConfig) -> float:
    """Image->text top-1 accuracy on fresh renders, in batches of up to RETRIEVAL_BATCH distinct prompts."""
    import torch

    rng = np.random.default_rng([config.seed, STREAM_CLIP_EVAL])
    batch = min(RETRIEVAL_BATCH, len(prompts))
    hits = 0
    for _ in range(RETRIEVAL_BATCHES):
        chosen = [prompts[i] for i in rng.choice(len(prompts), batch, replace=False)]
        images = [render_image(a, rng, config.image_size) for a in chosen]
        texts = [render_prompt(a) for a in chosen]
        max_length = model.config.text_config.max_position_embeddings
        inputs = processor(
            text=texts, images=images, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        with torch.no_grad():
            logits = model(**inputs).logits_per_image  # (B images, B texts)
        hits += int((logits.argmax(dim=1) == torch.arange(batch)).sum())
    return hits / (batch * RETRIEVAL_BATCHES)


def pretrain_clip(prompts: list[dict], config: TestbedConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Pretrains the stand-in CLIP on rendered pairs of `prompts` and saves it (model + processor) into `out_dir`.

    Symmetric InfoNCE as in CLIP, with one change: a batch can hold several pairs of the same prompt, and those are
    not negatives of each other (the target spreads evenly over them; with distinct prompts it is the usual one-hot).
    Images go through the saved processor before training, so training and inference see the same normalisation.
    Deterministic on CPU for a given config. Also writes `out_dir/pretrain_metrics.json`: the config, final loss,
    seconds, and image->text top-1 retrieval among RETRIEVAL_BATCH fresh renders of distinct prompts.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("pretrain_clip needs at least one prompt")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    model, processor = _build_clip(config)

    # 1. Render the pairs: every prompt equally often, in shuffled order.
    rng = np.random.default_rng([config.seed, STREAM_CLIP_PAIRS])
    prompt_idx = rng.permutation(np.arange(config.clip_pairs) % len(prompts))  # (N,)
    chunks = []
    for first in range(0, config.clip_pairs, 500):  # in chunks: the processor's float64 intermediates are large
        images = [render_image(prompts[i], rng, config.image_size) for i in prompt_idx[first : first + 500]]
        chunks.append(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    pixel_values = torch.cat(chunks)  # (N, 3, S, S) float32, normalised as at inference
    del chunks
    max_length = model.config.text_config.max_position_embeddings
    captions = [pretraining_caption(p, config.clip_count_as_digit) for p in prompts]
    text = processor.tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    input_ids, attention_mask = text["input_ids"], text["attention_mask"]  # (P, L) per prompt
    prompt_idx = torch.from_numpy(prompt_idx)

    # 2. Train: AdamW, linear warmup over the first 5% of steps, then cosine decay. The token embedding has a row for
    # each of the tokenizer's ~30k words, of which the captions use a few dozen: a sparse gradient and a lazy Adam
    # update only the rows in the batch (a dense AdamW update of all rows took 40% of a step). Rows never used, the
    # number words included, stay as initialised.
    batch = min(config.clip_batch_size, config.clip_pairs)
    steps_per_epoch = math.ceil(config.clip_pairs / batch)
    total = steps_per_epoch * config.clip_epochs
    warmup = max(1, total // 20)
    embedding = model.text_model.embeddings.token_embedding
    embedding.sparse = True
    dense = [p for p in model.parameters() if p is not embedding.weight]
    optimizers = [
        torch.optim.AdamW(dense, lr=config.clip_lr, weight_decay=0.01),
        torch.optim.SparseAdam([embedding.weight], lr=config.clip_lr),
    ]

    def schedule(step: int) -> float:
        return (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        )

    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, schedule) for optimizer in optimizers]
    model.train()
    loss_value = float("nan")
    with tqdm(total=total, desc="pretrain stand-in CLIP", unit="step", disable=not progress) as bar:
        for _ in range(config.clip_epochs):
            order = torch.from_numpy(rng.permutation(config.clip_pairs))
            for b in order.split(batch):
                p = prompt_idx[b]  # (B,)
                out = model(input_ids=input_ids[p], attention_mask=attention_mask[p], pixel_values=pixel_values[b])
                same = (p[:, None] == p[None, :]).float()  # (B, B), symmetric
                targets = same / same.sum(dim=1, keepdim=True)
                loss = F.cross_entropy(out.logits_per_image, targets) + F.cross_entropy(out.logits_per_text, targets)
                loss = loss / 2
                for optimizer in optimizers:
                    optimizer.zero_grad()
                loss.backward()
                for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                    optimizer.step()
                    scheduler.step()
                with torch.no_grad():  # CLIP's clamp: a temperature below 1/100 destabilises training
                    model.logit_scale.clamp_(0, math.log(100))
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.3f}")
                bar.update()
    embedding.sparse = False
    model.eval()
    del pixel_values

    # 3. Check on fresh renders, then save.
    top1 = _retrieval_top1(model, processor, prompts, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    metrics = {
        "config": to_dict(config),
        "prompts": len(prompts),
        "final_loss": loss_value,
        "retrieval_top1": top1,
        "retrieval_batch": min(RETRIEVAL_BATCH, len(prompts)),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


def build_testbed(
    out_dir: str | Path, config: TestbedConfig = TestbedConfig(), progress: bool = True
) -> dict[str, Path]:
    """Splits prompts, pretrains the stand-in CLIP on "clip" (out_dir/clip), writes feedback for "train" and "heldout".

    Returns {"clip": model directory, "train": train feedback.jsonl, "heldout": held-out feedback.jsonl}.
    """
    out_dir = Path(out_dir)
    splits = split_prompts(config.seed, config.clip_fraction, config.heldout_fraction)
    clip = pretrain_clip(splits["clip"], config, out_dir / "clip", progress)
    train = write_feedback(
        out_dir / "train", splits["train"], config, np.random.default_rng([config.seed, STREAM_TRAIN_FEEDBACK])
    )
    heldout = write_feedback(
        out_dir / "heldout", splits["heldout"], config, np.random.default_rng([config.seed, STREAM_HELDOUT_FEEDBACK])
    )
    return {"clip": clip, "train": train, "heldout": heldout}

"""The synthetic world of the feedback testbed (`testbed.py`): attributes, prompts, perturbations, rendered scenes.

Lee et al. 2023 train a reward on human feedback for prompts that combine count, color and background ("two green
dogs in the city"). This world has the same structure in miniature, with every fact about an image known:

- attribute dicts: `count` outlined objects of one `color` and shape (`object`) on one of four `background`s, and
  their prompt (`render_prompt`): 4 x 7 x 4 x 4 = 448 combinations (`all_prompts`);
- `perturb`: attribute dicts that differ from one in exactly one attribute (count, color or background), the
  negatives of the feedback;
- `render_image`: a seeded rendering of an attribute dict, in exact palette colors, so tests read an image's
  count, color and background back from its pixels;
- `split_prompts`: disjoint "clip" (stand-in CLIP pretraining), "train" and "heldout" (feedback) prompt sets.
"""

from __future__ import annotations

import itertools

import numpy as np

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


def parse_prompt(text: str) -> dict:
    """The attribute dict of a prompt, the exact inverse of `render_prompt`: parse_prompt(render_prompt(a)) == a,
    and any text it accepts is one render_prompt writes (same words, spacing and plural).

    Raises:
        ValueError: `text` is not a prompt of this world; the message names it and every part that did not parse.
    """
    # Split on single spaces, so doubled or stray whitespace leaves an empty word that fails below.
    words = text.split(" ")
    if len(words) < 5:  # count, color, noun, then a background phrase of two or three words
        raise ValueError(
            f"{text!r} is not a testbed prompt: expected '<count> <color> <object> <background>' as in "
            f"{render_prompt(dict(count=2, color='green', object='ball', background='city'))!r}"
        )
    count_word, color, noun, phrase = words[0], words[1], words[2], " ".join(words[3:])
    counts = {word: count for count, word in COUNT_WORDS.items()}
    backgrounds = {phrase: background for background, phrase in BACKGROUND_PHRASES.items()}
    problems = []
    if count_word not in counts:
        problems.append(f"count {count_word!r} is not one of {list(counts)}")
    if color not in COLORS:
        problems.append(f"color {color!r} is not one of {list(COLORS)}")
    plural = noun.endswith("s") and noun[:-1] in OBJECTS  # no object's name ends in "s"
    obj = noun[:-1] if plural else noun
    if obj not in OBJECTS:
        problems.append(f"object {noun!r} is not one of {list(OBJECTS)} (plural with 's')")
    elif count_word in counts and plural != (counts[count_word] > 1):
        number = "plural" if counts[count_word] > 1 else "singular"
        problems.append(f"object {noun!r} must be {number} after {count_word!r}")
    if phrase not in backgrounds:
        problems.append(f"background {phrase!r} is not one of {list(backgrounds)}")
    if problems:
        raise ValueError(f"{text!r} is not a testbed prompt: " + "; ".join(problems))
    return {"count": counts[count_word], "color": color, "object": obj, "background": backgrounds[phrase]}


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


def shape_mask(shape: str, size: int, cy: float, cx: float, half: float) -> np.ndarray:
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
        fill = shape_mask(attrs["object"], size, cy, cx, half)
        img[_dilate(fill, outline)] = OUTLINE_RGB
        img[fill] = OBJECT_RGB[attrs["color"]]
    return img

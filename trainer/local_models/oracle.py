"""The testbed's oracle: reads count, color, object and background back from an image of the synthetic world.

It scores how many attributes of its prompt a generated image got right (`attribute_accuracy`), for EVALUATION only:
never make it a training reward, as a policy optimised against it would learn its blind spots, and the point of the
testbed is to judge the served rewards by a reader they never saw. It reads a render (`scenes.render_image`) or a
model's blurred, noisy, color-cast imitation of one in three steps:

1. each pixel takes the nearest palette color (OBJECT_RGB, OUTLINE_RGB, every BACKGROUND_RGB color) within
   MAX_DISTANCE RGB levels, read again once the image's color cast, seen on the background, is taken out;
2. background: the background whose colors cover most pixels;
3. objects: the pixels of any object color, lone pixels dropped and pinholes filled, split into 8-connected
   components (plain numpy: no scipy at runtime). A component of plausible size and box is unmixed into its share of
   object color per pixel (object, outline and the best-fitting local background color), and that soft mass is
   explained by each of the renderer's own shape masks, blurred: a blur keeps a shape's area and centroid and only
   widens its spread, so area, centroid and spread fix each shape's template with no search. A component no shape
   explains (MAX_FIT_ERROR) is not an object. count = the objects found; color = the object color with most of their
   pixels; object = the shape with the least summed error over them.

Fields are None when unreadable: background when no background's colors cover MIN_BACKGROUND_SHARE of the image;
color and object when no object is found (count 0). count is capped at MAX_COUNT (5 = "five or more", no prompt's
count). Random noise and flat images are not read as scenes (the tests check it).

Measured accuracy, `python -m trainer.local_models.oracle 500`: 500 renders per row, the 112 prompts of
`split_prompts()["heldout"]` cycled, `default_rng(12345)`; `degrade` blurs, adds noise and a cast. "degraded" is
what a tiny diffusion model plausibly leaves (sigma 0.7 px at 32 px and 1.4 px at 64 px, the same blur relative to
the objects; noise std 8 levels), "+ color cast" adds up to +-20 levels per channel, "stress" is worse (a 32 px
pyramid loses its apex):

    size  condition               count  color  object  background    all
      32  clean                   1.000  1.000   0.978       1.000  0.978
      32  degraded (0.7 px, 8)    1.000  1.000   0.974       1.000  0.974
      32  + color cast (20)       1.000  1.000   0.982       1.000  0.982
      32  stress (1.0 px, 16)     0.984  1.000   0.808       1.000  0.798
      64  clean                   1.000  1.000   1.000       1.000  1.000
      64  degraded (1.4 px, 8)    1.000  1.000   0.998       1.000  0.998
      64  + color cast (20)       1.000  1.000   0.996       1.000  0.996
      64  stress (2.0 px, 16)     0.990  0.998   0.918       1.000  0.912

Shape is the weak attribute: at 32 px a small ball and a small gem can cover the same pixels, and under heavy blur
gems and pyramids lose their corners and read as balls. An image takes ~10 ms (32 px) to ~20 ms (64 px).
"""

import sys

import numpy as np

from trainer.local_models.scenes import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    OBJECT_HALF_SIZE,
    OBJECT_RGB,
    OBJECTS,
    OUTLINE_RGB,
    render_image,
    shape_mask,  # the renderer's own shapes are the templates, so the oracle follows any change to them
    split_prompts,
)

# A pixel farther than this (Euclidean, RGB levels) from every palette color is unknown. The nearest object color is
# at least 71 levels from any background color (blue and the sea), so noise of std 8 (14 levels on average) stays
# well inside it.
MAX_DISTANCE = 60.0
# The background is unreadable when its colors cover less than this share of the image (objects cover at most ~40%).
MIN_BACKGROUND_SHARE = 0.3
# A component smaller than this fraction of the smallest rendered object (a pyramid of the smallest half size) is
# speckle, not an object; one larger than this multiple of the largest (a cube of the largest) is not one object.
MIN_AREA_FRACTION = 0.15
MAX_AREA_MULTIPLE = 2.0
# A component must fill at least this share of its bounding box, whose sides may differ at most this factor: every
# shape fills half of its box or more, and its box is square.
MIN_FILL = 0.35
MAX_ASPECT = 2.0
# A component that no shape explains (squared error of the best template over the object's area above this) is not an
# object: renders mostly stay under 0.1 (a green object touching trees in the forest can reach 0.36, as forest green
# unmixes as outline and green), blobs of random noise lie around 0.45.
MAX_FIT_ERROR = 0.4
# Counts above this are reported as this value ("five or more").
MAX_COUNT = 5

# Of each shape of `scenes.shape_mask`, per power of its half size: its area, how far its centroid lies below its
# centre; and its spread (the summed variance along both axes) per unit area.
_AREA = {"ball": np.pi, "cube": 1.8**2, "pyramid": 2.0, "gem": 2 * 1.1**2}
_CENTROID_BELOW_CENTRE = {"ball": 0.0, "cube": 0.0, "pyramid": 1 / 3, "gem": 0.0}
_SPREAD = {"ball": 1 / (2 * np.pi), "cube": 1 / 6, "pyramid": 7 / 36, "gem": 1 / 6}

# Object colors, the outline, then background colors (the background of each is _BACKGROUND_OF's).
_PALETTE = np.array(
    list(OBJECT_RGB.values()) + [OUTLINE_RGB] + [rgb for colors in BACKGROUND_RGB.values() for rgb in colors.values()],
    dtype=np.float64,
)  # (P, 3)
_N_OBJECT_COLORS = len(OBJECT_RGB)
_BACKGROUND_OF = {_N_OBJECT_COLORS + 1 + i: b for i, b in enumerate(b for b, c in BACKGROUND_RGB.items() for _ in c)}


def _neighbours(arr: np.ndarray) -> np.ndarray:
    """(9, H, W): `arr` shifted to each position of its 3x3 neighbourhood, zero-padded."""
    h, w = arr.shape
    padded = np.pad(arr, 1)
    return np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        mask = _neighbours(mask).any(axis=0)
    return mask


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a (H, W) bool mask, as bool masks (numpy max-label propagation)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = np.where(mask, _neighbours(labels).max(axis=0), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return [labels == label for label in np.unique(labels[mask])]


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the first two axes (sigma in pixels, edges reflected), as float64."""
    out = image.astype(np.float64)
    if sigma <= 0:
        return out
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):  # separable
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)], mode="reflect")
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return out


def _shape_errors(mass: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(4,): squared error of each shape of OBJECTS as the explanation of an object's `mass` (H, W) in `region`.

    A blur keeps a shape's mass (its area) and centroid and adds sigma**2 to the variance along each axis, so each
    shape gives one template with no search: its half size from the mass, its centre from the centroid, the blur from
    the spread the shape lacks. The template is the renderer's own mask, blurred.
    """
    ys, xs = np.nonzero(region)
    ys, xs, weight = ys + 0.5, xs + 0.5, mass[region]  # pixel centres, as in shape_mask
    area = weight.sum()
    cy, cx = (weight * ys).sum() / area, (weight * xs).sum() / area
    spread = (weight * ((ys - cy) ** 2 + (xs - cx) ** 2)).sum() / area
    errors = []
    for shape in OBJECTS:
        half = np.sqrt(area / _AREA[shape])
        sigma = np.sqrt(max(0.0, (spread - _SPREAD[shape] * area) / 2))
        template = shape_mask(shape, mass.shape[0], cy - _CENTROID_BELOW_CENTRE[shape] * half, cx, half)
        errors.append(((_blur(template, sigma)[region] - weight) ** 2).sum())
    return np.array(errors)


def _object_mass(pixels: np.ndarray, nearest: np.ndarray, region: np.ndarray, color: int) -> np.ndarray:
    """(H, W): the share of object color in each pixel of `region` (0 elsewhere), by linear unmixing of a pixel into
    object color, outline and one background color: of those seen just outside the region, the one that fits best
    (a ball on the beach may touch sky, sea and sand)."""
    pixels = pixels[region] - OUTLINE_RGB  # (N, 3), relative to the outline color
    ring = _dilate(region, 3) & ~region
    backgrounds = [i for i in np.unique(nearest[ring]) if i > _N_OBJECT_COLORS] or [_N_OBJECT_COLORS]
    best_share, best_cost = np.zeros(len(pixels)), np.full(len(pixels), np.inf)
    for index in backgrounds:
        endmembers = np.stack([_PALETTE[color], _PALETTE[index]], axis=1) - np.array(OUTLINE_RGB)[:, None]  # (3, 2)
        shares = np.linalg.lstsq(endmembers, pixels.T, rcond=None)[0]  # (2, N)
        cost = ((endmembers @ shares - pixels.T) ** 2).sum(axis=0)
        better = cost < best_cost
        best_share[better], best_cost[better] = shares[0][better], cost[better]
    mass = np.zeros(region.shape)
    mass[region] = np.clip(best_share, 0.0, 1.0)
    return mass


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """(H, W): the index of the nearest _PALETTE color to each pixel of (H, W, 3), -1 where none is within reach."""
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, P)
    return np.where(distances.min(axis=-1) <= MAX_DISTANCE, distances.argmin(axis=-1), -1)


def read_attributes(image: np.ndarray) -> dict:
    """count, color, object and background of a (H, W, 3) uint8 square image of the testbed world.

    Returns a dict with the keys of `scenes.ATTRIBUTES`: count an int in [0, MAX_COUNT], the others values of
    `scenes.VALUES` or None when unreadable (see the module docstring).

    Raises:
        ValueError: the image is not a square (H, W, 3) uint8 array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.dtype != np.uint8:
        raise ValueError(f"image must be a square (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    size = image.shape[0]
    # 1. nearest palette color per pixel, read again once a color cast seen on the background (the median offset of
    # its pixels from their palette colors, away from edges, where colors blend) is taken out
    pixels = image.astype(np.float64)
    nearest = _nearest(pixels)
    on_background = (nearest > _N_OBJECT_COLORS) & (_neighbours(nearest + 1) == nearest + 1).all(axis=0)
    if on_background.any():
        pixels = pixels - np.median(pixels[on_background] - _PALETTE[nearest[on_background]], axis=0)
        nearest = _nearest(pixels)

    # 2. background
    shares = dict.fromkeys(BACKGROUND_RGB, 0.0)
    for index, name in _BACKGROUND_OF.items():
        shares[name] += float((nearest == index).mean())
    background = max(shares, key=shares.get)
    if shares[background] < MIN_BACKGROUND_SHARE:
        background = None

    # 3. objects
    is_object = (nearest >= 0) & (nearest < _N_OBJECT_COLORS)
    around = _neighbours(is_object).sum(axis=0) - is_object  # object neighbours of each pixel, of 8
    is_object = (is_object & (around >= 1)) | (around >= 6)  # drop lone pixels, fill pinholes; shapes keep corners
    min_area = MIN_AREA_FRACTION * 2.0 * (OBJECT_HALF_SIZE[0] * size) ** 2  # a pyramid's area is 2 half**2
    max_area = MAX_AREA_MULTIPLE * (1.8 * OBJECT_HALF_SIZE[1] * size) ** 2  # a cube's side is 1.8 half
    reach = max(2, round(size / 16))  # how far a blurred object's mass spreads, in pixels
    found, errors, count = np.zeros(_N_OBJECT_COLORS), np.zeros(len(OBJECTS)), 0
    for component in _components(is_object):
        ys, xs = np.nonzero(component)
        height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
        plausible = min_area <= ys.size <= max_area and ys.size >= MIN_FILL * height * width
        if not plausible or max(height, width) > MAX_ASPECT * min(height, width):
            continue
        labels = nearest[component]
        counts = np.bincount(labels[(labels >= 0) & (labels < _N_OBJECT_COLORS)], minlength=_N_OBJECT_COLORS)
        region = _dilate(component, reach)
        mass = _object_mass(pixels, nearest, region, int(counts.argmax()))
        if mass.sum() < min_area:
            continue
        fit = _shape_errors(mass, region)
        if fit.min() > MAX_FIT_ERROR * mass.sum():
            continue
        found, errors, count = found + counts, errors + fit, count + 1
    if count == 0:
        return {"count": 0, "color": None, "object": None, "background": background}
    return {
        "count": min(count, MAX_COUNT),
        "color": list(OBJECT_RGB)[int(found.argmax())],
        "object": OBJECTS[int(errors.argmin())],  # a scene's objects share one shape
        "background": background,
    }


def attribute_accuracy(images, attrs_list) -> dict[str, float]:
    """Fraction of images whose read attribute equals the given one, per attribute, and "all" (all four right).

    Raises:
        ValueError: no images, or not one attribute dict per image.
    """
    images, attrs_list = list(images), list(attrs_list)
    if not images or len(images) != len(attrs_list):
        raise ValueError(f"need one attribute dict per image, got {len(images)} images and {len(attrs_list)} dicts")
    right = np.array(
        [
            [read[key] == attrs[key] for key in ATTRIBUTES]
            for read, attrs in zip(map(read_attributes, images), attrs_list, strict=True)
        ]
    )  # (N, 4) bool
    return {**dict(zip(ATTRIBUTES, right.mean(axis=0).tolist(), strict=True)), "all": float(right.all(axis=1).mean())}


def degrade(
    image: np.ndarray, rng: np.random.Generator, blur_sigma: float, noise_std: float, color_cast: float = 0.0
) -> np.ndarray:
    """`image` gaussian-blurred (sigma in pixels, edges reflected), plus gaussian noise (std in levels) and a color
    cast (one offset per channel, uniform in +-`color_cast` levels), as uint8: a generative model's artefacts."""
    out = _blur(image, blur_sigma) + rng.normal(0.0, noise_std, image.shape)
    if color_cast:
        out = out + rng.uniform(-color_cast, color_cast, 3)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# The conditions of the docstring's table: (size, name, blur sigma in pixels, noise std and color cast in levels).
CONDITIONS = [
    (32, "clean", 0.0, 0.0, 0.0),
    (32, "degraded (0.7 px, 8)", 0.7, 8.0, 0.0),
    (32, "+ color cast (20)", 0.7, 8.0, 20.0),
    (32, "stress (1.0 px, 16)", 1.0, 16.0, 0.0),
    (64, "clean", 0.0, 0.0, 0.0),
    (64, "degraded (1.4 px, 8)", 1.4, 8.0, 0.0),
    (64, "+ color cast (20)", 1.4, 8.0, 20.0),
    (64, "stress (2.0 px, 16)", 2.0, 16.0, 0.0),
]


def heldout_accuracy(n: int, size: int, blur: float, noise: float, cast: float = 0.0, seed: int = 0) -> dict:
    """`attribute_accuracy` on `n` renders of held-out prompts (cycled), degraded as given, seeded by `seed`."""
    heldout = split_prompts()["heldout"]
    rng = np.random.default_rng(seed)
    attrs_list = [heldout[i % len(heldout)] for i in range(n)]
    images = [degrade(render_image(a, rng, size), rng, blur, noise, cast) for a in attrs_list]
    return attribute_accuracy(images, attrs_list)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    print(f"{'size':>4}  {'condition':<22}" + "".join(f"{k:>12}" for k in (*ATTRIBUTES, "all")))
    for size, name, *levels in CONDITIONS:
        accuracy = heldout_accuracy(n, size, *levels, seed=12345)
        print(f"{size:>4}  {name:<22}" + "".join(f"{accuracy[k]:>12.3f}" for k in (*ATTRIBUTES, "all")))

"""Held-out metrics of the testbed world, beside the served rewards: what a reader that never trained anything sees.

A fine-tuning run on the synthetic world's prompts (trainer/local_models/scenes.py) can be judged by more than the
rewards it optimised (config section `testbed`):

- `oracle_metrics`: the share of images whose count, color, object, background (and all four) the testbed's oracle
  reads back as their prompt says; per-image 0/1 correctness, so each is an accuracy in [0, 1];
- `Fidelity`: each image's cosine distance (1 - cos, in [0, 2]) between its CLIP image embedding and the mean
  embedding of fresh renders of its prompt; lower = closer to the world's images. A policy that games a reward
  with images no render looks like drifts away here even when the oracle still reads its attributes.

Both take flat lists, one prompt per image, and return metric keys of the job's rows (`eval/oracle/<attr>/mean`,
`/se`; `eval/fidelity/mean`, `/se`), with the standard error over images, std (ddof=1) / sqrt(n).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from services.clip import clip_embeddings, load_clip
from trainer.local_models.oracle import read_attributes
from trainer.local_models.scenes import ATTRIBUTES, parse_prompt, render_image

# The attributes the oracle's accuracy is reported for: all four at once, then each.
ORACLE_ATTRIBUTES = ("all", *ATTRIBUTES)
# Random stream of the fidelity references' renders, np.random.default_rng([run.seed, STREAM_FIDELITY]); after
# trainer/sampling.py's STREAM_TRAIN, STREAM_EVAL and STREAM_TIMESTEPS (0-2).
STREAM_FIDELITY = 3
# Images per CLIP forward pass.
EMBED_BATCH = 64


def parse_testbed_prompts(prompts: Sequence[str], what: str = "held-out prompt") -> list[dict]:
    """The attribute dict of each prompt (`scenes.parse_prompt`).

    Raises:
        ValueError: a prompt is not a testbed prompt; the message names the first, why, and how many fail.
    """
    out, bad = [], []
    for i, prompt in enumerate(prompts):
        try:
            out.append(parse_prompt(prompt))
        except ValueError as e:
            bad.append((i, e))
    if bad:
        i, error = bad[0]
        raise ValueError(
            f"{len(bad)} of {len(prompts)} {what}s do not parse as testbed prompts; the first, number {i + 1}: {error}"
        )
    return out


def mean_se(values: np.ndarray) -> dict[str, float]:
    """{"mean", "se"} of per-image values: se = std (ddof=1) / sqrt(n), NaN for a single image."""
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "se": se}


def oracle_metrics(images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """`eval/oracle/<attr>/mean` and `/se` for attr in ORACLE_ATTRIBUTES: the oracle's reading of each (H, W, 3)
    uint8 image against the attributes of its prompt (a testbed prompt). An attribute the oracle cannot read counts
    as wrong.

    Raises:
        ValueError: no images, not one prompt per image, or a prompt that is not a testbed prompt.
    """
    if not len(images) or len(images) != len(prompts):
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    attrs = parse_testbed_prompts(prompts)
    reads = [read_attributes(image) for image in images]
    # (N, 4) bool: each image's attributes read as its prompt says
    right = np.array([[read[key] == a[key] for key in ATTRIBUTES] for read, a in zip(reads, attrs, strict=True)])
    per_image = {"all": right.all(axis=1), **{key: right[:, i] for i, key in enumerate(ATTRIBUTES)}}
    return {
        f"eval/oracle/{attr}/{stat}": value
        for attr in ORACLE_ATTRIBUTES
        for stat, value in mean_se(per_image[attr]).items()
    }


class Fidelity:
    """Distance of images to the world's renders of their prompts, in a CLIP's image-embedding space.

    The CLIP loads once; each prompt's reference, the unit-norm mean of the unit-norm embeddings of `renders`
    renders of it at `resolution` px, is drawn once here from np.random.default_rng([seed, STREAM_FIDELITY]) (the
    prompts in the given order), so every round is measured against the same references.
    """

    def __init__(
        self, clip: str, prompts: Sequence[str], resolution: int, renders: int = 16, seed: int = 0, device="cpu"
    ):
        self.device = device
        self.model, self.processor = load_clip(clip, "testbed.fidelity_clip", "fidelity CLIP")
        self.model.to(device).eval()
        rng = np.random.default_rng([seed, STREAM_FIDELITY])
        self.references: dict[str, np.ndarray] = {}  # prompt -> (D,) unit-norm
        for prompt, attrs in zip(prompts, parse_testbed_prompts(prompts), strict=True):
            if prompt not in self.references:
                embeddings = self.embed([render_image(attrs, rng, resolution) for _ in range(renders)])  # (R, D)
                mean = embeddings.mean(axis=0)
                self.references[prompt] = mean / np.linalg.norm(mean)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, D) float32 unit-norm image embeddings (`get_image_features` after the CLIP's processor)."""
        chunks = [
            clip_embeddings(self.model, self.processor, images[i : i + EMBED_BATCH], None, self.device)[0].numpy()
            for i in range(0, len(images), EMBED_BATCH)
        ]
        return np.concatenate(chunks)

    def distances(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """(N,) cosine distance, 1 - cos, of each (H, W, 3) uint8 image to its prompt's reference.

        Raises:
            ValueError: not one prompt per image, or a prompt without a reference.
        """
        if not len(images) or len(images) != len(prompts):
            raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
        unknown = sorted(set(prompts) - set(self.references))
        if unknown:
            raise ValueError(f"no fidelity reference for prompt(s) {unknown}; references: {list(self.references)}")
        references = np.stack([self.references[p] for p in prompts])  # (N, D)
        return 1.0 - (self.embed(images) * references).sum(axis=1)

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
        """`eval/fidelity/mean` and `/se` over the images (see `distances`)."""
        return {f"eval/fidelity/{stat}": value for stat, value in mean_se(self.distances(images, prompts)).items()}

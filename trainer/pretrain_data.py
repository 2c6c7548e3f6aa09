"""Pre-training (image, prompt) pairs for the beta term of the reward-weighted loss (Lee et al. 2023).

Two layouts:
- a JSONL of {"image": path, "prompt": text} per line, image paths relative to the JSONL;
- a folder of images (png/jpg/jpeg/webp), each with a sidecar `<stem>.txt` holding its prompt.

Images are resized (bicubic) to the training resolution; they are encoded by the VAE once per job.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.codec import ImageError, decode_encoded
from services.config import read_jsonl

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _load_image(path: Path, resolution: int, where: str) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"{where}: image {path} does not exist")
    try:
        array = decode_encoded(path.read_bytes())  # (H, W, 3) uint8
    except ImageError as e:
        raise ValueError(f"{where}: image {path} is unreadable: {e}") from None
    if array.shape[:2] != (resolution, resolution):
        array = np.asarray(Image.fromarray(array).resize((resolution, resolution), Image.Resampling.BICUBIC))
    return array


def load_pretrain_pairs(path: str | Path, resolution: int) -> tuple[np.ndarray, list[str]]:
    """(images (N, resolution, resolution, 3) uint8, prompts) from a JSONL or a folder (see the module docstring)."""
    path = Path(path).expanduser()
    images, prompts = [], []
    if path.is_dir():
        for image_path in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image_path.with_suffix(".txt")
            if not caption.is_file():
                raise FileNotFoundError(f"{image_path} has no prompt file {caption.name} next to it")
            images.append(_load_image(image_path, resolution, str(image_path)))
            prompts.append(caption.read_text().strip())
    elif path.is_file():
        for number, record in read_jsonl(path):
            where = f"{path}:{number}"
            if not isinstance(record.get("image"), str):
                raise ValueError(f"{where}: expected an object with string 'image' and 'prompt'")
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string")
            images.append(_load_image(path.parent / record["image"], resolution, where))
            prompts.append(record["prompt"].strip())
    else:
        raise FileNotFoundError(f"pre-training data {path} does not exist")
    if not images:
        raise ValueError(f"pre-training data {path} holds no (image, prompt) pairs")
    return np.stack(images), prompts


def write_rendered_pairs(out_dir: str | Path, n: int, resolution: int, seed: int = 0) -> Path:
    """Writes `n` rendered testbed scenes with their prompts ("two green balls in the city") as a JSONL set.

    A stand-in pre-training set for the local profile, where no image-text dataset is available offline.
    """
    from PIL import Image

    from trainer.local_models.scenes import random_attrs, render_image, render_prompt

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        attrs = random_attrs(rng)
        name = f"images/{i:05d}.png"
        Image.fromarray(render_image(attrs, rng, max(resolution, 16))).save(out_dir / name)
        lines.append(json.dumps({"image": name, "prompt": render_prompt(attrs)}))
    path = out_dir / "pairs.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path

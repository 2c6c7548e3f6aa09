"""Binary human feedback on (image, prompt) pairs: the training data of the learned alignment reward.

Format: a JSONL file, one object per line, images as files next to it (paths relative to the JSONL's folder):

    {"image": "images/0001.png", "prompt": "two green dogs in the city", "label": 1,
     "count": 2, "color": "green", "object": "dog", "background": "city"}

`label` is 1 (good: the image matches the prompt) or 0 (bad); true/false are accepted. The attribute fields
(count, color, object, background) are optional. They describe the prompt; samples that have them get the
prompt-classification augmentation during training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.codec import ImageError, decode_encoded
from services.config import read_jsonl

ATTRIBUTE_FIELDS = ("count", "color", "object", "background")


class FeedbackError(ValueError):
    """Problems found in a feedback file, each with its line number."""


@dataclass(frozen=True)
class FeedbackSample:
    image: Path
    prompt: str
    # 1 = good, 0 = bad.
    label: int
    # Prompt attributes (count, color, object, background) when all are given, else None.
    attrs: dict | None
    # 1-based line in the JSONL file.
    line: int


def _label(value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise ValueError(f"label must be 0, 1, true or false, got {value!r}")


def load_feedback(path: str | Path, check_images: bool = True, max_errors: int = 20) -> list[FeedbackSample]:
    """Reads a feedback JSONL; every problem (bad JSON, missing field, bad label, missing or unreadable image) is
    collected with its line number and raised together as one FeedbackError."""
    path = Path(path)
    if not path.is_file():
        raise FeedbackError(f"feedback file {path} does not exist")
    samples, errors = [], []
    for n, row in read_jsonl(path, on_error=errors.append):  # bad JSON lines go to `errors` too
        if len(errors) >= max_errors:
            break
        where = f"{path}:{n}"
        try:
            missing = [k for k in ("image", "prompt", "label") if k not in row]
            if missing:
                raise ValueError(f"missing field(s) {missing}")
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise ValueError("prompt must be a non-empty string")
            label = _label(row["label"])
            image = path.parent / row["image"]
            if check_images:
                if not image.is_file():
                    raise ValueError(f"image {row['image']!r} not found (looked for {image})")
                decode_encoded(image.read_bytes())
            attrs = {k: row[k] for k in ATTRIBUTE_FIELDS} if all(k in row for k in ATTRIBUTE_FIELDS) else None
            samples.append(FeedbackSample(image, row["prompt"], label, attrs, n))
        except ImageError as e:
            errors.append(f"{where}: unreadable image {row['image']!r}: {e.message}")
        except (ValueError, TypeError) as e:
            errors.append(f"{where}: {e}")
    if len(errors) >= max_errors:
        errors = [*errors[:max_errors], "(stopped after this many errors)"]
    if errors:
        raise FeedbackError(f"{len(errors)} problem(s) in {path}:\n" + "\n".join(errors))
    if not samples:
        raise FeedbackError(f"{path} has no feedback samples")
    return samples


def load_images(samples: list[FeedbackSample]) -> list[np.ndarray]:
    """The samples' images as (H, W, 3) uint8 arrays."""
    return [decode_encoded(s.image.read_bytes()) for s in samples]

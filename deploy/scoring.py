"""Scoring image files with a served reward over gRPC: (id, image, prompt) from a folder or a JSONL, one row each.

Used by `rewardfleet score` and the demo; the rows print with `deploy.tables.format_table`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import typer

from services.config import read_jsonl

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def read_pairs(path: Path, prompt: str | None) -> list[tuple[str, Path, str]]:
    """(id, image path, prompt) from a folder of images + one prompt, or from a JSONL of {image, prompt[, id]}."""
    if path.is_dir():
        if not prompt:
            raise typer.BadParameter("scoring a folder needs --prompt")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise typer.BadParameter(f"no {sorted(IMAGE_SUFFIXES)} files in {path}")
        return [(p.name, p, prompt) for p in files]
    if path.suffix != ".jsonl":
        raise typer.BadParameter(f"{path} is neither a folder of images nor a .jsonl file")
    pairs = []
    try:
        rows = list(read_jsonl(path))
    except ValueError as e:
        raise typer.BadParameter(f"{e}; expected {{'image': ..., 'prompt': ...}} per line") from None
    for n, row in rows:
        image, row_prompt = row.get("image"), row.get("prompt", prompt)
        if not isinstance(image, str):
            raise typer.BadParameter(f"{path}:{n}: expected {{'image': ..., 'prompt': ...}} (no 'image' path)")
        if not row_prompt:
            raise typer.BadParameter(f"{path}:{n}: no prompt (and no --prompt default)")
        image_path = (path.parent / image) if not Path(image).is_absolute() else Path(image)
        pairs.append((str(row.get("id", image)), image_path, row_prompt))
    return pairs


def score_files(
    pairs: list[tuple[str, Path, str]], target: str, application: str, chunk: int = 64, progress: bool = True
) -> list[dict]:
    """Scores image files over gRPC (files travel encoded, as they are); one row per pair, in order."""
    from tqdm import tqdm

    from services.client import RewardClient

    rows = []
    with (
        RewardClient(target, application) as client,
        tqdm(
            total=len(pairs), desc=f"scoring ({application})", unit="img", disable=not progress, file=sys.stderr
        ) as bar,
    ):
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            images = []
            for _, image_path, _ in part:
                try:
                    images.append(image_path.read_bytes())
                except OSError as e:
                    raise typer.BadParameter(f"cannot read {image_path}: {e}") from None
            results = client.score(images, [p for _, _, p in part], ids=[i for i, _, _ in part])
            for (sample_id, image_path, prompt), r in zip(part, results, strict=True):
                rows.append(
                    {
                        "id": sample_id,
                        "image": str(image_path),
                        "prompt": prompt,
                        "reward": None if math.isnan(r.reward) else r.reward,
                        "components": r.components,
                        **({"caption": r.caption} if r.caption is not None else {}),
                        **({"segments": [s.__dict__ for s in r.segments]} if r.segments else {}),
                        "error": f"{r.error_code}: {r.error_message}" if r.error_code else None,
                    }
                )
            bar.update(len(part))
    return rows

"""Prompts for fine-tuning: read from a file, or generated in the papers' count / color / background style.

    load_prompts("prompts.txt")     # one prompt per line; blank lines and lines starting with "#" are skipped
    load_prompts("prompts.jsonl")   # one {"prompt": ...} object per line (other keys are ignored)
    generate_prompts(100, seed=0)   # "two green dogs in the city", ...

`split_train_eval` keeps held-out evaluation prompts disjoint from the training prompts, so a reward gain on them
is not memorisation of the training prompts; `resolve_prompts` gives the fine-tuning job both, as its config says.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from services.config import read_jsonl
from trainer.config import PromptsConfig

# Lee et al.'s prompts combine a count, a color, an object and a background ("two green dogs in the city").
COUNTS = ("one", "two", "three", "four")
COLORS = ("red", "green", "blue", "yellow", "purple", "black", "white", "brown")
# (singular, plural)
OBJECTS = (
    ("dog", "dogs"),
    ("cat", "cats"),
    ("apple", "apples"),
    ("car", "cars"),
    ("bird", "birds"),
    ("cup", "cups"),
    ("ball", "balls"),
    ("flower", "flowers"),
)
BACKGROUNDS = ("in the city", "in the forest", "on the beach", "in the snow", "on a table", "in a field")


def paper_prompt(count: int, color: str, obj: tuple[str, str], background: str) -> str:
    """One prompt: `count` is 1-4, e.g. paper_prompt(2, "green", ("dog", "dogs"), "in the city")."""
    noun = obj[0] if count == 1 else obj[1]
    return f"{COUNTS[count - 1]} {color} {noun} {background}"


def generate_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct prompts drawn (seeded) from every count x color x object x background combination."""
    combos = list(itertools.product(range(1, len(COUNTS) + 1), COLORS, OBJECTS, BACKGROUNDS))
    if not 1 <= n <= len(combos):
        raise ValueError(f"n must be in [1, {len(combos)}] (the distinct combinations), got {n}")
    order = np.random.default_rng(seed).permutation(len(combos))[:n]
    return [paper_prompt(*combos[i]) for i in order]


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL of {"prompt": ...} (by suffix .jsonl)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".jsonl":
        prompts = []
        for number, record in read_jsonl(path):
            prompt = record.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{number}: expected an object with a non-empty string 'prompt'")
            prompts.append(prompt.strip())
    else:
        lines = (line.strip() for line in path.read_text().splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def split_train_eval(prompts: list[str], eval_count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, eval): `eval_count` distinct prompts held out (seeded draw), the rest for training, order kept.

    Duplicates are dropped first, so one prompt can never be on both sides.
    """
    unique = list(dict.fromkeys(prompts))
    if not 1 <= eval_count < len(unique):
        raise ValueError(
            f"eval_count must be in [1, {len(unique) - 1}] to leave training prompts ({len(unique)} distinct), "
            f"got {eval_count}"
        )
    held = set(np.random.default_rng(seed).choice(len(unique), eval_count, replace=False).tolist())
    train = [p for i, p in enumerate(unique) if i not in held]
    evals = [p for i, p in enumerate(unique) if i in held]
    return train, evals


def resolve_prompts(config: PromptsConfig, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), disjoint."""
    if config.eval_file:
        train = load_prompts(config.train_file) if config.train_file else generate_prompts(config.generate, seed)
        evals = list(dict.fromkeys(load_prompts(config.eval_file)))
        overlap = sorted(set(train) & set(evals))
        if overlap:
            raise ValueError(f"{len(overlap)} held-out prompt(s) are also training prompts, e.g. {overlap[0]!r}")
        return list(dict.fromkeys(train)), evals
    pool = (
        load_prompts(config.train_file)
        if config.train_file
        else generate_prompts(config.generate + config.eval_count, seed)
    )
    return split_train_eval(pool, config.eval_count, seed)

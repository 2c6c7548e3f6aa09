"""The testbed world's trained models, shipped with the package, and the files the fine-tuning job reads about it.

Training the world's text-to-image model and captioner takes longer than a first build should (41 and 10 minutes
on one core), so their weights ship in `trainer/local_models/weights/` (float16, a few MB), with `recipe.json`: the
WORLD_VERSION and the configs they were trained with. `recipe()` is the current code's recipe; a test checks that the
shipped weights were made by it, so a change to a recipe without retraining fails CI. Retrain with one command:

    python -m trainer.local_models.world

`install_world` (part of `rewardfleet build-local`) copies them into ~/.cache/rewardfleet/world, where the local
profile points, and writes the job's inputs next to them: the training and held-out prompt files (the "train" and
"heldout" splits of `split_prompts`: held-out prompts are unseen by every model of the world) and rendered
pre-training pairs of the training prompts (the beta term of Lee et al.'s loss).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from services.config import to_dict
from trainer.local_models.cache import build_once
from trainer.local_models.scenes import render_image, render_prompt, split_prompts

# Bump with any change to what is shipped (a recipe change also changes `recipe()`).
WORLD_VERSION = 1
SHIPPED = Path(__file__).parent / "weights"
WORLD_ROOT = "~/.cache/rewardfleet/world"
MODELS = ("text_to_image", "captioner")
RECIPE_FILE = "recipe.json"
# Fine-tuning prompts: this many of the "train" split (every round samples K images of each, so all 224 would make a
# round take minutes on 2 cores). Pre-training pairs: renders of every "train" prompt, this many each.
FINETUNE_PROMPTS = 32
PRETRAIN_PER_PROMPT = 2
# Numpy seed-sequence streams of the prompt choice and the pre-training renders.
STREAM_FINETUNE_PROMPTS = 6
STREAM_PRETRAIN = 7


def recipe() -> dict:
    """What the shipped weights must have been trained with: WORLD_VERSION and each model's config."""
    from trainer.local_models.captioner import CaptionerConfig
    from trainer.local_models.testbed import TestbedConfig
    from trainer.local_models.text_to_image import TextToImageConfig

    # The stand-in CLIP's recipe too: its text tower is the text-to-image model's text encoder.
    return {
        "version": WORLD_VERSION,
        "testbed": to_dict(TestbedConfig()),
        "text_to_image": to_dict(TextToImageConfig()),
        "captioner": to_dict(CaptionerConfig()),
    }


def shipped_recipe(root: Path = SHIPPED) -> dict | None:
    """The recipe recorded with the shipped weights; None when none are shipped."""
    path = root / RECIPE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_shipped(root: Path = SHIPPED) -> None:
    """Raises RuntimeError unless the shipped weights exist and match `recipe()`."""
    missing = [name for name in MODELS if not (root / name).is_dir()]
    recorded = shipped_recipe(root)
    if missing or recorded is None:
        raise RuntimeError(f"the world's trained weights are missing under {root} ({missing or RECIPE_FILE}); {_HOW}")
    if recorded != json.loads(json.dumps(recipe())):
        raise RuntimeError(f"the weights under {root} were trained with another recipe than the code's; {_HOW}")


_HOW = "retrain them with: python -m trainer.local_models.world"


def train_world(out: Path = SHIPPED, progress: bool = True) -> dict:
    """Trains every shipped model from scratch into `out` (replacing it), then writes recipe.json; returns metrics.

    The stand-in CLIP is built afresh in a temporary directory, as `testbed.build_testbed` does for the local profile.
    """
    from trainer.local_models.captioner import CaptionerConfig, train_captioner
    from trainer.local_models.testbed import TestbedConfig, pretrain_clip
    from trainer.local_models.text_to_image import TextToImageConfig, train_text_to_image

    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix="world-", dir=out.parent))
    try:
        testbed = TestbedConfig()
        clip = pretrain_clip(split_prompts(testbed.seed)["clip"], testbed, staging / "clip", progress)
        train_text_to_image(staging / "text_to_image", clip, TextToImageConfig(), progress)
        train_captioner(staging / "captioner", CaptionerConfig(), progress)
        shutil.rmtree(staging / "clip")
        (staging / RECIPE_FILE).write_text(json.dumps(recipe(), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: json.loads(next((out / name).glob("*_metrics.json")).read_text()) for name in MODELS}


def install_world(root: str | Path = WORLD_ROOT) -> dict[str, Path]:
    """The shipped models copied under `root`, with the job's prompt files and pre-training pairs; returns paths.

    Cached under the shipped recipe: a later call returns at once, an upgraded package reinstalls.
    """
    check_shipped()
    root = Path(root).expanduser()

    def build() -> dict[str, Path]:
        paths = {}
        for name in MODELS:
            shutil.copytree(SHIPPED / name, root / name)
            paths[name] = root / name
        paths.update(write_job_inputs(root))
        return paths

    return build_once(root, {"recipe": shipped_recipe()}, build, marker="world.json", clean=True)


def write_job_inputs(root: Path, seed: int = 0) -> dict[str, Path]:
    """train_prompts.txt (FINETUNE_PROMPTS of the "train" split), heldout_prompts.txt (the "heldout" split) and
    pretrain/ (renders of every "train" prompt, each with a sidecar .txt: the pre-training pairs of the beta term)."""
    from PIL import Image

    from trainer.local_models.testbed import TestbedConfig

    testbed = TestbedConfig(seed=seed)
    splits = split_prompts(seed, testbed.clip_fraction, testbed.heldout_fraction)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    chosen = np.random.default_rng([seed, STREAM_FINETUNE_PROMPTS]).permutation(len(splits["train"]))
    prompts = {
        "train": [splits["train"][i] for i in sorted(chosen[:FINETUNE_PROMPTS])],
        "heldout": splits["heldout"],
    }
    for name, chosen_attrs in prompts.items():
        paths[f"{name}_prompts"] = root / f"{name}_prompts.txt"
        paths[f"{name}_prompts"].write_text("".join(render_prompt(a) + "\n" for a in chosen_attrs))
    pretrain = root / "pretrain"
    pretrain.mkdir()
    rng = np.random.default_rng([seed, STREAM_PRETRAIN])
    for i, attrs in enumerate(a for a in splits["train"] for _ in range(PRETRAIN_PER_PROMPT)):
        Image.fromarray(render_image(attrs, rng, testbed.image_size)).save(pretrain / f"{i:05d}.png")
        (pretrain / f"{i:05d}.txt").write_text(render_prompt(attrs) + "\n")
    paths["pretrain"] = pretrain
    return paths


if __name__ == "__main__":
    metrics = train_world(Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED)
    print(json.dumps(metrics, indent=2))

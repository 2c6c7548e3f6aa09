"""Synthetic feedback testbed for the learned alignment reward (Lee et al. 2023), runnable on CPU.

Lee et al. train a reward on human (image, prompt, good/bad) feedback, with prompts that combine count, color and
background ("two green dogs in the city"), on top of frozen CLIP embeddings. Neither the feedback nor CLIP is
available offline, so this module provides both in miniature, over the rendered scenes of `scenes.py`:

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
`build_testbed` runs everything end to end (`testbed_reward.build_testbed_once` caches it).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field, field_validator, model_validator

from services.config import Config, to_dict
from trainer.local_models.scenes import perturb, pretraining_caption, render_image, render_prompt, split_prompts

# Numpy seed-sequence streams (`default_rng([seed, stream])`), so each use of randomness is independent of the others.
STREAM_CLIP_PAIRS = 0
STREAM_CLIP_EVAL = 1
STREAM_TRAIN_FEEDBACK = 2
STREAM_HELDOUT_FEEDBACK = 3
# Held-out retrieval check of the stand-in CLIP: batches of this many distinct prompts (chance = 1 / this).
RETRIEVAL_BATCH = 32
RETRIEVAL_BATCHES = 16


# --- Config ------------------------------------------------------------------------------------------------------


class TestbedConfig(Config):
    """The testbed's knobs. Defaults are the local profile's testbed; the numbers behind them: benchmarks/README.md."""

    seed: int = Field(0, description="Seeds the prompt split, every rendering stream and the stand-in CLIP's init.")
    # 32 rather than 64: a step costs a third as much, and in the same time the stand-in learns to count better
    # (linear probe on its image embeddings, 4 counts, from captions stating every count: 0.87 after 12 epochs at
    # 32 px, 0.81 after 6 at 64 px).
    image_size: int = Field(
        32,
        description="Side of rendered images in pixels; also the stand-in CLIP's input size (a multiple of "
        "clip_patch_size, >= 16).",
    )
    # 112 + 112 of the 448 prompts; training feedback gets the rest (224 prompts). The reward learns which number word
    # matches which count from the training prompts: with the earlier 240-prompt vocabulary (5 colors, 3 objects), 60
    # training prompts gave +5 to +6 accuracy points over CLIP score and 120 gave +9 (seed 0).
    clip_fraction: float = Field(
        0.25, gt=0, description="Fraction of the 448 prompts for the stand-in CLIP's pretraining."
    )
    heldout_fraction: float = Field(0.25, gt=0, description="Fraction of the 448 prompts for held-out feedback.")
    # 16 x 224 = 3,584 training samples. With 8 per prompt and 60 training prompts (480 samples) the learned reward
    # overfit and fell below CLIP score on unseen prompts.
    images_per_prompt: int = Field(16, ge=1, description="Feedback samples (images) per prompt.")
    positive_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fraction of each prompt's samples whose image matches the prompt (before label noise).",
    )
    label_noise: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="Probability that a label is flipped, as human raters disagree; caps any "
        "reward's accuracy at 1 - label_noise.",
    )
    # About 107 per prompt. With 6,000 the stand-in's image embeddings encode the count less well (linear probe 0.75,
    # seed 0).
    clip_pairs: int = Field(
        12000,
        ge=1,
        description='Rendered (image, prompt) pairs the stand-in CLIP is pretrained on ("clip" split only).',
    )
    # With clip_lr, enough for the stand-in to learn counts from the digits (about 2 min on one CPU core; fewer epochs,
    # a larger batch or a higher rate left counts worse learned). Measured on seeds 0-4: it retrieves the right prompt
    # among 32 62-87% of the time (number words do not tell it 2, 3 and 4 apart) and its score classifies the
    # held-out feedback 0.66-0.72 right, while the learned reward reaches 0.80-0.83.
    clip_epochs: int = Field(12, ge=1, description="Passes over the pretraining pairs.")
    # Prompts spell the count out, so the stand-in never learns which count a number word means (its image embeddings
    # still encode the count, from the digits): it notices a wrong count only through the noun's singular or plural,
    # one against many. With number words (False) the same stand-in rejects most changed counts and scores close to
    # the 0.90 that label noise allows, which leaves a learned reward nothing to win. Noisy number words (right only
    # some of the time) were tried first: the stand-in then encodes counts in neither tower, and no head can recover
    # them.
    clip_count_as_digit: bool = Field(
        True, description='Pretraining captions write the count as a digit ("3 green balls in the city").'
    )
    clip_batch_size: int = Field(
        64, ge=1, description="Pairs per contrastive batch (the InfoNCE negatives are the rest of the batch)."
    )
    clip_lr: float = Field(
        1e-3,
        gt=0,
        description="AdamW peak learning rate (linear warmup over the first 5% of steps, then cosine decay).",
    )
    clip_hidden: int = Field(
        64, ge=8, description="Width of both CLIP towers and of the shared embedding space (a multiple of 4)."
    )
    clip_layers: int = Field(2, ge=1, description="Transformer layers of each tower.")
    clip_patch_size: int = Field(8, ge=1, description="Side of the vision tower's square patches in pixels.")

    # pytest would try to collect a class named Test*.
    __test__: ClassVar[bool] = False

    @field_validator("clip_hidden")
    @classmethod
    def _heads_divide_width(cls, value: int) -> int:
        if value % 4:
            raise ValueError(f"must be a multiple of 4 (4 attention heads), got {value}")
        return value

    @model_validator(mode="after")
    def _check_sizes_and_splits(self) -> TestbedConfig:
        if self.image_size < 16 or self.image_size % self.clip_patch_size:
            raise ValueError(
                f"TestbedConfig.image_size must be >= 16 and a multiple of clip_patch_size ({self.clip_patch_size}), "
                f"got {self.image_size}"
            )
        if self.clip_fraction + self.heldout_fraction >= 1:
            raise ValueError(
                f"TestbedConfig.clip_fraction ({self.clip_fraction}) and heldout_fraction ({self.heldout_fraction}) "
                "must leave prompts for training feedback"
            )
        return self


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

    from trainer.local_models.tiny import tiny_clip_text_config, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    hidden = config.clip_hidden
    tower = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=config.clip_layers, num_attention_heads=4
    )
    # The tiny CLIP's text conventions (eos = [SEP], so CLIP pools the hidden state there), widened.
    text_config = {**tiny_clip_text_config(tokenizer), **tower}
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


def build_testbed(out_dir: str | Path, config: TestbedConfig | None = None, progress: bool = True) -> dict[str, Path]:
    """Splits prompts, pretrains the stand-in CLIP on "clip" (out_dir/clip), writes feedback for "train" and "heldout".

    `config` defaults to TestbedConfig(). Returns {"clip": model directory, "train": train feedback.jsonl, "heldout":
    held-out feedback.jsonl}.
    """
    out_dir = Path(out_dir)
    config = config or TestbedConfig()
    splits = split_prompts(config.seed, config.clip_fraction, config.heldout_fraction)
    clip = pretrain_clip(splits["clip"], config, out_dir / "clip", progress)
    train = write_feedback(
        out_dir / "train", splits["train"], config, np.random.default_rng([config.seed, STREAM_TRAIN_FEEDBACK])
    )
    heldout = write_feedback(
        out_dir / "heldout", splits["heldout"], config, np.random.default_rng([config.seed, STREAM_HELDOUT_FEEDBACK])
    )
    return {"clip": clip, "train": train, "heldout": heldout}

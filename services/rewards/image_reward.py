"""ImageReward v1.0 (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): a BLIP reward model trained on 137k expert comparisons of generated images (ImageRewardDB).

Score: a human-preference reward for the image given its prompt, higher = preferred. It is the head's output z-scored
with the release's constants, reward = (raw - 0.16717362830052426) / 1.0333394966054072, so it is unbounded; real
generations score about -2..2: the README's example (four generations of one prompt) scores 0.58, 0.27, -1.41 and
-2.03. The score mixes prompt alignment, fidelity and aesthetics, and is meant for ranking
images, above all images of the same prompt. `components["raw"]` is the head's output before that normalisation.
Scores do not depend on the other samples in a batch.

Model: BLIP's ViT-L/16 encodes the 224 px image into 1 + 196 tokens. BLIP's BERT (12 layers, cross-attention to those
tokens in every layer) encodes the prompt with them, bidirectionally. The [CLS] token's final hidden state goes
through the head: Linear 768 -> 1024 -> 128 -> 64 -> 16 -> 1, with dropout between the layers and no activations,
so the head is one affine map.

The release (hub THUDM/ImageReward; `huggingface-cli download THUDM/ImageReward ImageReward.pt med_config.json
--local-dir ~/.cache/ImageReward`) is two files:
- `ImageReward.pt`: a torch state dict of the THUDM/ImageReward repo's `ImageReward` module.
  `blip.visual_encoder.*` is BLIP's timm-style ViT; `blip.text_encoder.*` is BLIP's med.py BertModel (no pooler,
  no token-type embeddings, `crossattention` in every layer, and its persistent `embeddings.position_ids` buffer);
  `blip.vision_proj` / `blip.text_proj` are BLIP's contrastive projections, which the score does not use; and
  `mlp.layers.{0,2,4,6,7}` is the head (Sequential indices; the dropouts sit at 1, 3 and 5).
- `med_config.json`: the text encoder's BERT config (vocab 30524 = bert-base-uncased + [DEC] + [ENC]).

`load` converts the weights into transformers' `BlipVisionModel` and `BlipTextModel`. The text encoder's keys are
med.py's own (`embeddings.position_ids` aside). The ViT's are renamed (`_VISION_RENAMES`), and the fused q/k/v
layout and the shapes of `cls_token` and `pos_embed` are the same in both. Loading is strict, unlike the release's
`load_state_dict(strict=False)`: a missing, extra or differently shaped key is an error naming it in the release's
names. A file of another format (a CLIP checkpoint, an aesthetic-predictor head) is refused as such.

Where this reward follows the release's code rather than its files:
  * the ViT's widths, depth, patch size and resolution come from the checkpoint's shapes. The heads
    (`vision_heads`) cannot be read from the shapes, and LayerNorm eps 1e-6 comes from BLIP's vit.py;
  * the cross-attention's key/value input width is the ViT's width. BLIP's code overrides the config's
    `encoder_width` with it, and the release's med_config.json says 768 (BLIP-base's ViT width; the repo's
    train/src/config copy and published copies of the hub file agree) for its 1024-wide ViT-L;
  * prompts are tokenized as the release does (bert-base-uncased + bos [DEC] + additional special [ENC],
    padding="max_length", truncation, 35 tokens), and [CLS] stays first: unlike BLIP's own ITM head, ImageReward does
    not put [ENC] in its place. The padding mask is med.py's -10000 where transformers adds the float32 minimum:
    both give exactly zero attention after the softmax.

Preprocessing: the release applies Resize(224, bicubic, shortest side) -> CenterCrop(224) -> ToTensor ->
Normalize(OpenAI CLIP mean/std) to a PIL image. Transformers' PIL-backend CLIP processor (`CLIPImageProcessorPil`)
resizes the same way (measured: identical pixels for square, non-square, up- and downscaled images). Its torchvision
backend (`CLIPImageProcessor` in transformers 5) rounds by one uint8 level at some pixels. The one difference
left is the crop: transformers floors the crop offset where torchvision rounds it half to even, which moves the
crop by one pixel when the resized long side exceeds 224 by 4k + 3 pixels (e.g. 224 x 231). So the processor only
resizes and normalises, and the crop is torchvision's own `center_crop`. The output is then the release's to the last
bit.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from services.config import Config
from services.models import load_pretrained
from services.registry import register
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

OWNER = "image_reward reward"
# The release's file names (hub THUDM/ImageReward); the release's own default directory is ~/.cache/ImageReward.
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
RELEASE_DIR = "~/.cache/ImageReward"
# The release's normalisation of the head's output: reward = (raw - mean) / std (ImageReward.py).
RELEASE_MEAN = 0.16717362830052426
RELEASE_STD = 1.0333394966054072
# OpenAI CLIP's pixel mean and std, which the release normalises with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Prompts are padded and truncated to this many tokens, [CLS] and [SEP] included (the release's max_length).
MAX_LENGTH = 35
# The special tokens BLIP's `init_tokenizer` adds to bert-base-uncased: bos [DEC] (id 30522), [ENC] (id 30523).
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
# BLIP's ViT builds its LayerNorms with eps 1e-6 (vit.py); transformers' BlipVisionConfig defaults to 1e-5.
VISION_LAYER_NORM_EPS = 1e-6
# The head's layer widths after its input (the text width), and its dropouts (ImageReward.py `MLP`).
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)

# Key prefixes of the release's state dict.
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
PROJECTIONS = ("blip.vision_proj", "blip.text_proj")
# med.py registers the text encoder's position ids as a persistent buffer; transformers recomputes the same arange.
POSITION_IDS = TEXT + "embeddings.position_ids"
# BlipVisionModel name part -> BLIP's (timm) ViT name part, applied in order; the rest of every key is the same.
_VISION_RENAMES = (
    ("embeddings.class_embedding", "cls_token"),  # (1, 1, W) in both
    ("embeddings.position_embedding", "pos_embed"),  # (1, 1 + P, W) in both: a parameter, not an nn.Embedding
    ("embeddings.patch_embedding", "patch_embed.proj"),  # Conv2d (W, 3, p, p)
    ("encoder.layers.", "blocks."),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("self_attn.qkv", "attn.qkv"),  # one (3W, W) Linear in both: q, k, v stacked, heads contiguous in each
    ("self_attn.projection", "attn.proj"),
    ("post_layernorm", "norm"),
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class ImageRewardConfig(Config):
    checkpoint: str = Field(
        f"{RELEASE_DIR}/{CHECKPOINT_FILE}",
        description=(
            "The ImageReward checkpoint: ImageReward.pt from the hub repo THUDM/ImageReward, a torch state dict of "
            "the release's ImageReward module (blip.visual_encoder.*, blip.text_encoder.*, blip.vision_proj, "
            "blip.text_proj, mlp.layers.*), keys possibly 'module.'-prefixed. A path; '~' is expanded."
        ),
    )
    med_config: str = Field(
        f"{RELEASE_DIR}/{MED_CONFIG_FILE}",
        description=(
            "The text encoder's BERT config: med_config.json from THUDM/ImageReward. Its encoder_width is ignored, as "
            "the release's code ignores it: the cross-attention reads the ViT's width. A path; '~' is expanded."
        ),
    )
    tokenizer: str = Field(
        "bert-base-uncased",
        description=(
            "BERT tokenizer source (hub id or local directory): bert-base-uncased, as the release. The reward adds "
            "BLIP's [DEC] (bos) and [ENC] tokens itself, so it must end up with the text encoder's vocab_size tokens."
        ),
    )
    tokenizer_revision: str | None = Field(None, description="Hub revision of the tokenizer; None for the default.")
    image_size: int = Field(
        224,
        ge=1,
        description="Side the image is resized (shortest side) and center-cropped to; must be the ViT's resolution.",
    )
    vision_heads: int = Field(
        16,
        ge=1,
        description="Attention heads of the ViT, which its weights cannot tell: 16 for the release's ViT-L/16.",
    )
    image_mean: tuple[float, float, float] = Field(
        OPENAI_CLIP_MEAN, description="Per-channel pixel mean (RGB, in [0, 1]); the release's is OpenAI CLIP's."
    )
    image_std: tuple[float, float, float] = Field(
        OPENAI_CLIP_STD, description="Per-channel pixel std (RGB, in [0, 1]); the release's is OpenAI CLIP's."
    )
    reward_mean: float = Field(RELEASE_MEAN, description="Subtracted from the head's output (the release's constant).")
    reward_std: float = Field(
        RELEASE_STD, gt=0.0, description="The head's output minus reward_mean is divided by this (the release's)."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description=(
            "dtype of the two BLIP towers (float16 and bfloat16 are for GPUs); the head always runs in float32, as "
            "the release casts the features to float before it."
        ),
    )
    batch_size: int = Field(32, ge=1, description="Most images per forward pass.")


def release_vision_key(key: str) -> str:
    """The release's (BLIP's timm-style ViT) name of a `BlipVisionModel` state-dict key, without `VISION`."""
    for model_part, release_part in _VISION_RENAMES:
        key = key.replace(model_part, release_part)
    return key


def build_head(input_width: int):
    """The release's head: an nn.Sequential whose state-dict keys are the checkpoint's `mlp.layers.*` without the
    prefix. Its dropouts (no-ops in eval) stay, so the Linear layers keep the release's indices 0, 2, 4, 6, 7."""
    import torch

    layers: list[torch.nn.Module] = []
    width = input_width
    for i, out in enumerate(HEAD_WIDTHS):
        layers.append(torch.nn.Linear(width, out))
        if i < len(HEAD_DROPOUTS):
            layers.append(torch.nn.Dropout(HEAD_DROPOUTS[i]))
        width = out
    return torch.nn.Sequential(*layers)


def check_format(state: dict[str, Any], source: str) -> None:
    """Refuses a state dict that is not ImageReward's, saying what it looks like where it can tell."""
    from services.clip_checkpoints import detect_format

    absent = [prefix for prefix in (VISION, TEXT, HEAD) if not any(k.startswith(prefix) for k in state)]
    if not absent:
        return
    try:
        looks_like = f"; it looks like a CLIP checkpoint ({detect_format(state)} layout)"
    except ValueError:
        looks_like = ""
    if not looks_like and all(re.match(r"^layers\.\d+\.(weight|bias)$", k) for k in state):
        looks_like = "; it looks like a bare MLP head (e.g. the LAION aesthetic predictor's), without BLIP's towers"
    raise ValueError(
        f"{OWNER}: checkpoint {source!r} is not an ImageReward checkpoint: it has no {[p + '*' for p in absent]} "
        f"keys{looks_like}; its keys include {sorted(state)[:6]}"
    )


def _require(state: dict[str, Any], keys: Sequence[str], source: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{OWNER}: checkpoint {source!r} lacks the keys {missing}")


def vision_config(state: dict[str, Any], image_size: int, heads: int, source: str):
    """BlipVisionConfig of the checkpoint's ViT: widths, depth, patch and grid from its shapes."""
    from transformers import BlipVisionConfig

    shape_keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"]
    _require(state, [VISION + k for k in shape_keys], source)
    width = state[VISION + "cls_token"].shape[-1]
    patch = state[VISION + "patch_embed.proj.weight"].shape[-1]  # (W, 3, p, p)
    positions = state[VISION + "pos_embed"].shape[1]  # 1 + (S / p)^2
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1 or grid * patch != image_size:
        raise ValueError(
            f"{OWNER}: checkpoint {source!r} has a ViT of {positions} positions and {patch} px patches, which does "
            f"not take {image_size} px images (image_size): it needs {image_size // patch}^2 + 1 positions"
        )
    if width % heads:
        raise ValueError(f"{OWNER}: vision_heads {heads} does not divide the checkpoint's ViT width {width}")
    layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k.removeprefix(VISION))))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state[VISION + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",  # nn.GELU (exact erf), as BLIP's ViT
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )


def text_config(med: dict[str, Any], vision_width: int, source: str):
    """BlipTextConfig of med_config.json (a BERT config); the cross-attention reads `vision_width`-wide tokens."""
    from transformers import BertConfig, BlipTextConfig

    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in med]
    if missing:
        raise ValueError(f"{OWNER}: med_config {source!r} lacks {missing}")
    if med.get("add_cross_attention") is not True:
        raise ValueError(
            f"{OWNER}: med_config {source!r} must have add_cross_attention true: ImageReward's text encoder "
            "cross-attends to the image in every layer"
        )
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{OWNER}: med_config {source!r}: only absolute position embeddings are supported")
    bert = BertConfig()  # the defaults med.py's BertConfig.from_json_file fills in
    return BlipTextConfig(
        **{k: med[k] for k in required},
        max_position_embeddings=med.get("max_position_embeddings", bert.max_position_embeddings),
        hidden_act=med.get("hidden_act", bert.hidden_act),
        layer_norm_eps=med.get("layer_norm_eps", bert.layer_norm_eps),
        pad_token_id=med.get("pad_token_id", bert.pad_token_id),
        encoder_hidden_size=vision_width,
        # In transformers' BLIP text model, is_decoder in the config builds the cross-attention layers; the forward
        # pass's own is_decoder (False in `score`) keeps self-attention bidirectional, as BLIP's mode="multimodal".
        is_decoder=True,
    )


def load_part(model, state: dict[str, Any], prefix: str, release_name, what: str, source: str) -> None:
    """Loads `model` from the checkpoint keys under `prefix`, strictly: a missing, extra or differently shaped key is
    a ValueError naming it in the release's names. (`load_strict`, which then loads, would name transformers' keys,
    e.g. "2.bias" for "mlp.layers.2.bias", so the checks are made here first.)"""
    from services.clip_checkpoints import load_strict

    expected = model.state_dict()
    names = {prefix + release_name(k): k for k in expected}  # release key -> model key
    part = {k: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = sorted(names.keys() - part.keys()), sorted(part.keys() - names.keys())
    if missing or unexpected:
        raise ValueError(
            f"{OWNER}: checkpoint {source!r} does not fit the {what}: missing keys {missing[:6]}, "
            f"unexpected keys {unexpected[:6]}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[names[k]].shape)}"
        for k, v in sorted(part.items())
        if v.shape != expected[names[k]].shape
    ]
    if wrong:
        raise ValueError(f"{OWNER}: checkpoint {source!r} does not fit the {what}: {'; '.join(wrong[:6])}")
    load_strict(model, {names[k]: v for k, v in part.items()})


def read_release(config: ImageRewardConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, med_config) of the release files named by `config`, checked to be ImageReward's."""
    import torch

    from services.clip_checkpoints import read_checkpoint, unwrap

    paths = {"checkpoint": Path(config.checkpoint).expanduser(), "med_config": Path(config.med_config).expanduser()}
    for field, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"{OWNER}: {field} {str(path)!r} does not exist; download {CHECKPOINT_FILE} and {MED_CONFIG_FILE} "
                f"from the hub repo THUDM/ImageReward and set checkpoint and med_config to their paths"
            )
    checkpoint, med_path = str(paths["checkpoint"]), str(paths["med_config"])
    try:
        med = json.loads(paths["med_config"].read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{OWNER}: med_config {med_path!r} is not valid JSON ({e})") from None
    if not isinstance(med, dict):
        raise ValueError(f"{OWNER}: med_config {med_path!r} must hold a JSON object, got {type(med).__name__}")
    try:
        state = unwrap(read_checkpoint(checkpoint))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{OWNER}: cannot read checkpoint {checkpoint!r} ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{OWNER}: checkpoint {checkpoint!r}: {e}") from None
    check_format(state, checkpoint)
    known = tuple(f"{p}.{kind}" for p in PROJECTIONS for kind in ("weight", "bias"))
    others = sorted(k for k in state if not k.startswith((VISION, TEXT, HEAD)) and k not in known)
    if others:
        raise ValueError(f"{OWNER}: checkpoint {checkpoint!r} has unexpected keys {others[:6]}")
    position_ids = state.pop(POSITION_IDS, None)
    if position_ids is not None and not torch.equal(position_ids.flatten(), torch.arange(position_ids.numel())):
        raise ValueError(f"{OWNER}: checkpoint {checkpoint!r}: {POSITION_IDS} is not 0, 1, 2, ...")
    return state, med


def check_projections(state: dict[str, Any], vision_width: int, text_width: int, source: str) -> None:
    """The contrastive projections are part of the release's key set, though unused: they must be there, in shape."""
    names = [f"{p}.{kind}" for p in PROJECTIONS for kind in ("weight", "bias")]
    _require(state, names, source)
    embed = state[names[0]].shape[0]  # BLIP's embed_dim, 256
    shapes = [(embed, vision_width), (embed,), (embed, text_width), (embed,)]
    expected = dict(zip(names, shapes, strict=True))
    wrong = [f"{n}: {tuple(state[n].shape)} vs {shape}" for n, shape in expected.items() if state[n].shape != shape]
    if wrong:
        raise ValueError(f"{OWNER}: checkpoint {source!r} has projections of the wrong shape: {'; '.join(wrong)}")


def load_image_reward(config: ImageRewardConfig):
    """(vision, text, head, tokenizer) of the release files named by `config`, on CPU, in float32, eval mode."""
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel
    from transformers.initialization import no_init_weights

    state, med = read_release(config)
    source = str(Path(config.checkpoint).expanduser())
    vision_cfg = vision_config(state, config.image_size, config.vision_heads, source)
    med_source = str(Path(config.med_config).expanduser())
    text_cfg = text_config(med, vision_cfg.hidden_size, med_source)
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained, config.tokenizer, OWNER, "BERT tokenizer", revision=config.tokenizer_revision
    )
    # As BLIP's init_tokenizer; adding a token the tokenizer already has is a no-op.
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    if len(tokenizer) != text_cfg.vocab_size:
        raise ValueError(
            f"{OWNER}: tokenizer {config.tokenizer!r} has {len(tokenizer)} tokens with {DEC_TOKEN} and {ENC_TOKEN}, "
            f"but the text encoder's vocab_size is {text_cfg.vocab_size}: use bert-base-uncased, as the release"
        )
    # Every parameter is overwritten by the strict loads, so the random init (seconds for ViT-L) is skipped.
    with no_init_weights():
        vision = BlipVisionModel(vision_cfg)
        text = BlipTextModel(text_cfg, add_pooling_layer=False)
    head = build_head(text_cfg.hidden_size)
    load_part(vision, state, VISION, release_vision_key, "BLIP ViT", source)
    load_part(text, state, TEXT, lambda k: k, f"BLIP text encoder of med_config {med_source!r}", source)
    load_part(head, state, HEAD, lambda k: k, "ImageReward head", source)
    check_projections(state, vision_cfg.hidden_size, text_cfg.hidden_size, source)
    return vision.eval(), text.eval(), head.eval(), tokenizer


def image_processor(config: ImageRewardConfig):
    """The release's resize and normalisation, without its center crop (see the module docstring)."""
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


@register("image_reward")
class ImageReward(Reward):
    Config = ImageRewardConfig

    def __init__(self, config: ImageRewardConfig | None = None, *, vision=None, text=None, head=None, tokenizer=None):
        """`vision` (BlipVisionModel), `text` (BlipTextModel with cross-attention), `head` (`build_head`) and
        `tokenizer` (with [DEC] and [ENC]) inject already-built modules (tests); else `load` reads the release."""
        super().__init__(config)
        modules = (vision, text, head, tokenizer)
        if any(m is None for m in modules) and any(m is not None for m in modules):
            raise ValueError(f"{OWNER}: inject all of vision, text, head and tokenizer, or none")
        self.vision, self.text, self.head, self.tokenizer = modules
        self.injected = vision is not None
        self.processor = None
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        import torch

        self.device = device
        self.dtype = getattr(torch, self.config.dtype)
        if self.vision is None:
            self.vision, self.text, self.head, self.tokenizer = load_image_reward(self.config)
        self.vision = self.vision.to(device, self.dtype).eval()
        self.text = self.text.to(device, self.dtype).eval()
        self.head = self.head.to(device, torch.float32).eval()
        self.processor = image_processor(self.config)

    def pixel_values(self, images: Sequence[np.ndarray]):
        """(B, 3, S, S) float32 on CPU: the release's preprocessing (resize, center crop, normalise)."""
        import torch
        from torchvision.transforms.functional import center_crop

        size = self.config.image_size
        # Resized (shortest side = S) and normalised, each (3, S, L) or (3, L, S); then torchvision's crop rounding.
        resized = self.processor(images=list(images), input_data_format="channels_last")["pixel_values"]
        return torch.stack([center_crop(torch.from_numpy(np.asarray(p)), [size, size]) for p in resized])

    def raw_scores(self, images: Sequence[np.ndarray], prompts: Sequence[str]):
        """The head's outputs, (B,) float32 on CPU, for one forward pass over these samples."""
        import torch

        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        pixels = self.pixel_values(images).to(self.device, self.dtype)  # (B, 3, S, S)
        with torch.inference_mode():
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + P, Wv)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)  # (B, 1 + P)
            hidden = self.text(
                input_ids=tokens["input_ids"].to(self.device),  # (B, 35), [CLS] first
                attention_mask=tokens["attention_mask"].to(self.device),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                is_decoder=False,
            ).last_hidden_state  # (B, 35, Wt)
            raw = self.head(hidden[:, 0].float()).squeeze(-1)  # (B,)
        return raw.cpu()

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        cfg = self.config
        outputs = []
        for start in range(0, len(images), cfg.batch_size):
            end = start + cfg.batch_size
            raw = self.raw_scores(images[start:end], prompts[start:end])
            outputs += [
                RewardOutput(reward=(r - cfg.reward_mean) / cfg.reward_std, components={"raw": r})
                for r in raw.tolist()
            ]
        return outputs

    def info(self) -> RewardInfo:
        cfg = self.config
        if self.injected:
            models = (ModelSource("blip", "(injected)"), ModelSource("tokenizer", "(injected)"))
        else:
            models = (
                ModelSource("blip", cfg.checkpoint),
                ModelSource("blip_config", cfg.med_config),
                ModelSource("tokenizer", cfg.tokenizer, cfg.tokenizer_revision or ""),
            )
        return RewardInfo(
            description=(
                "ImageReward v1.0: human-preference reward from BLIP (ViT-L image tokens, cross-attended by the "
                "prompt's BERT) and an MLP on [CLS], z-scored by the release's constants; unbounded, real "
                "generations about -2..2; compare images of one prompt; higher = preferred. components.raw is the "
                "MLP output before normalisation."
            ),
            min_reward=float("-inf"),
            max_reward=float("inf"),
            models=models,
        )

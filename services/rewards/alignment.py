"""Learned alignment reward (Lee et al. 2023, "Aligning Text-to-Image Models using Human Feedback").

Frozen CLIP image and text embeddings -> MLP head (optionally a correction to an affine map of the CLIP cosine) ->
sigmoid. The head is trained (`rewardfleet train-reward`, trainer/reward_training.py) on binary human feedback (image,
prompt, good/bad) with MSE to the label, plus the paper's prompt-classification augmentation.

Score: the predicted probability that a rater judges the image to match its prompt, range [0, 1]; higher = better
aligned. `components["clip_score"]` is the cosine similarity of the same CLIP embeddings ([-1, 1]), the baseline the
learned reward is measured against.

A trained reward is a directory:
- `alignment_reward.json`: the CLIP source (hub id, or a path relative to the directory) and the head's config;
- `head.safetensors`: the head's weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from services.clip import clip_embeddings, load_clip
from services.config import Config, from_dict, to_dict
from services.registry import register
from services.resolution import from_processor
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

MODEL_FILE = "alignment_reward.json"
HEAD_FILE = "head.safetensors"


class HeadConfig(Config):
    """The head's architecture, stored in `alignment_reward.json` so a reward directory rebuilds its head."""

    embed_dim: int = Field(768, ge=1, description="CLIP embedding width (projection_dim).")
    hidden_sizes: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        (512, 128), description="Hidden layer widths of the MLP."
    )
    dropout: float = Field(0.1, ge=0.0, le=1.0, description="Dropout between hidden layers (training only).")
    residual: bool = Field(
        False,
        description=(
            "Residual head: logit = scale * cosine + bias + MLP(features), so the MLP learns a correction to the "
            "CLIP-score classifier rather than the whole decision, which generalises better to unseen prompts. The "
            "MLP's last layer starts at zero, so an untrained residual head is the CLIP-score classifier."
        ),
    )


def build_head(config: HeadConfig):
    """The MLP: features [image, text, image * text] (3 * embed_dim) -> hidden layers (GELU) -> one logit.

    The element-wise product exposes per-dimension agreement, which a pure concatenation would have to learn.
    With `config.residual`, a ModuleDict {"mlp": the MLP (last layer zero), "cosine": Linear(1, 1) on the cosine};
    `head_logits` adds the two. Call heads only through `head_logits`.
    """
    import torch

    layers: list[torch.nn.Module] = []
    width = 3 * config.embed_dim
    for hidden in config.hidden_sizes:
        layers += [torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Dropout(config.dropout)]
        width = hidden
    layers.append(torch.nn.Linear(width, 1))
    mlp = torch.nn.Sequential(*layers)
    if not config.residual:
        return mlp
    torch.nn.init.zeros_(layers[-1].weight)
    torch.nn.init.zeros_(layers[-1].bias)
    # Scale and bias of the cosine; `set_cosine_affine` sets them from data before training.
    return torch.nn.ModuleDict({"mlp": mlp, "cosine": torch.nn.Linear(1, 1)})


def set_cosine_affine(head, scale: float, bias: float) -> None:
    """Sets a residual head's cosine term to scale * cosine + bias."""
    import torch

    with torch.no_grad():
        head["cosine"].weight.fill_(scale)
        head["cosine"].bias.fill_(bias)


def head_logits(head, image_emb, text_emb):
    """Head logits for unit-norm embeddings; image_emb and text_emb broadcast: (..., D) -> (...)."""
    import torch

    image_emb, text_emb = torch.broadcast_tensors(image_emb, text_emb)
    product = image_emb * text_emb  # (..., D); sums to the cosine
    features = torch.cat([image_emb, text_emb, product], dim=-1)  # (..., 3D)
    if isinstance(head, torch.nn.ModuleDict):
        cosine = product.sum(-1, keepdim=True)  # (..., 1)
        return (head["cosine"](cosine) + head["mlp"](features)).squeeze(-1)
    return head(features).squeeze(-1)


def save_alignment_model(out_dir: str | Path, clip_source: str, head, head_config: HeadConfig, **extra: Any) -> Path:
    """Writes a trained reward directory (see the module docstring); `extra` goes into the JSON (e.g. metrics)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    (out / MODEL_FILE).write_text(json.dumps({"clip": clip_source, "head": to_dict(head_config), **extra}, indent=2))
    return out


class AlignmentConfig(Config):
    model_dir: str = Field(
        "alignment_reward",
        description=(
            "Directory of a trained reward (alignment_reward.json + head.safetensors), e.g. written by "
            "`rewardfleet train-reward`; '~' is expanded."
        ),
    )
    batch_size: int = Field(64, ge=1, description="Most images per CLIP forward pass.")


@register("alignment")
class Alignment(Reward):
    Config = AlignmentConfig

    def __init__(self, config: AlignmentConfig | None = None, *, clip=None, processor=None, head=None):
        """`clip` + `processor` + `head` inject already-built modules (tests); else `load` reads `model_dir`."""
        super().__init__(config)
        self.clip, self.processor, self.head = clip, processor, head
        self.clip_source = "(injected)"
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        from safetensors.torch import load_file

        self.device = device
        if self.head is None:
            model_dir = Path(self.config.model_dir).expanduser()
            spec_path = model_dir / MODEL_FILE
            if not spec_path.is_file():
                raise FileNotFoundError(
                    f"alignment reward: {spec_path} does not exist; model_dir must be a directory written by "
                    "`rewardfleet train-reward` (alignment_reward.json + head.safetensors)"
                )
            spec = json.loads(spec_path.read_text())
            head_config = from_dict(HeadConfig, spec["head"], where=f"{spec_path}: head")
            self.head = build_head(head_config)
            self.head.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
            # A relative CLIP path is relative to the reward directory, so the directory can be moved as a whole.
            local = model_dir / spec["clip"]
            self.clip_source = str(local) if local.exists() else spec["clip"]
            self.clip, self.processor = load_clip(self.clip_source, "alignment reward", "CLIP model")
        self.clip = self.clip.to(device).eval()
        self.head = self.head.to(device).eval()

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        import torch

        outputs = []
        for start in range(0, len(images), self.config.batch_size):
            chunk, texts = (
                images[start : start + self.config.batch_size],
                prompts[start : start + self.config.batch_size],
            )
            unique = list(dict.fromkeys(texts))
            image_emb, text_emb = clip_embeddings(self.clip, self.processor, chunk, unique, self.device)
            text_emb = text_emb[[unique.index(t) for t in texts]]  # (B, D)
            with torch.inference_mode():
                reward = torch.sigmoid(head_logits(self.head, image_emb.to(self.device), text_emb.to(self.device)))
            clip_score = (image_emb * text_emb).sum(-1)  # (B,)
            for r, c in zip(reward.cpu().tolist(), clip_score.tolist(), strict=True):
                outputs.append(RewardOutput(reward=r, components={"clip_score": c}))
        return outputs

    def info(self) -> RewardInfo:
        return RewardInfo(
            description=(
                "Learned alignment reward (Lee et al.): predicted probability that a rater judges the image to match "
                "the prompt, from an MLP on frozen CLIP embeddings; components.clip_score is the CLIP cosine."
            ),
            min_reward=0.0,
            max_reward=1.0,
            models=(ModelSource("clip", self.clip_source), ModelSource("head", self.config.model_dir)),
            # The processor is the only reader of the images: a client may resize as it does.
            input_resolution=from_processor(self.processor),
        )

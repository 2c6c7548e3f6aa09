"""CLIP score: how well the image matches the prompt by CLIP's image-text cosine (Hessel et al. 2021, CLIPScore).

Both towers of a transformers CLIP embed the image and the prompt; the cosine of the unit-norm embeddings is clamped
at zero and scaled: `reward = scale * max(cos, 0)`.

Scale: `scale = 100` (the default) is TorchMetrics' `CLIPScore` and the number most text-to-image papers and
trainers report (Flow-GRPO, DanceGRPO); the CLIPScore paper uses `scale = 2.5`. Range [0, scale]; higher = better
aligned. With `openai/clip-vit-large-patch14` (the cluster profile), matching real image-prompt pairs score about
25-35 at scale 100 and unrelated ones about 10-20, so differences of a few points matter. `components["cosine"]` is
the unclamped cosine in [-1, 1]. The score does not depend on the other samples in a batch: each prompt is
embedded once per batch and each image on its own row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from services.clip import clip_cosines, load_clip
from services.config import Config
from services.registry import register
from services.resolution import from_processor
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput


class ClipScoreConfig(Config):
    clip: str = Field(
        "openai/clip-vit-large-patch14",
        description="Any transformers CLIP (hub id or local directory with config, weights, tokenizer, processor).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `clip`; None = default.")
    scale: float = Field(
        100.0, gt=0, description="Multiplier of the clamped cosine: 100 as in TorchMetrics, 2.5 as in the paper."
    )
    batch_size: int = Field(64, ge=1, description="Most images per CLIP forward pass.")


@register("clip_score")
class ClipScore(Reward):
    Config = ClipScoreConfig

    def __init__(self, config: ClipScoreConfig | None = None, *, clip=None, processor=None):
        """`clip` + `processor` inject an already-built CLIPModel and CLIPProcessor (tests); else `load` reads
        `config.clip`."""
        super().__init__(config)
        self.clip, self.processor = clip, processor
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        self.device = device
        if self.clip is None:
            self.clip, self.processor = load_clip(self.config.clip, "clip_score reward", revision=self.config.revision)
        self.clip = self.clip.to(device).eval()

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        cosines = clip_cosines(self.clip, self.processor, images, prompts, self.device, self.config.batch_size)
        return [
            RewardOutput(reward=self.config.scale * max(c, 0.0), components={"cosine": c}) for c in cosines.tolist()
        ]

    def info(self) -> RewardInfo:
        return RewardInfo(
            description=(
                f"CLIP score: {self.config.scale:g} * max(cosine, 0) of CLIP's image and prompt embeddings; higher = "
                "better aligned. components.cosine is the unclamped cosine."
            ),
            min_reward=0.0,
            max_reward=self.config.scale,
            models=(ModelSource("clip", self.config.clip, self.config.revision or ""),),
            # The processor is the only reader of the images: a client may resize as it does.
            input_resolution=from_processor(self.processor),
        )

"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H fine-tuned on human choices between generated images.

The release `yuvalkirstain/PickScore_v1` is a transformers CLIPModel; its processor is the one it was trained with,
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (a separate hub repo). As in the model card:
`reward = logit_scale.exp() * cos(image_embedding, prompt_embedding)`.

Score: the preference logit; two images for one prompt compare by `softmax([s1, s2])`, the probability that a person
picks each. Range [-logit_scale.exp(), logit_scale.exp()] (about [-100, 100]); real generations score about 17-23,
and a gap of 1 means about 73% preference. Higher = preferred. `components["cosine"]` is the cosine in [-1, 1] and
`components["logit_scale"]` the multiplier. Scores do not depend on the other samples in a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from services.clip import clip_cosines
from services.config import Config
from services.models import load_pretrained
from services.registry import register
from services.resolution import from_processor
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

OWNER = "pickscore reward"


class PickScoreConfig(Config):
    model: str = Field(
        "yuvalkirstain/PickScore_v1", description="The PickScore CLIPModel (hub id or local directory)."
    )
    processor: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="The CLIP processor (tokenizer + image processor) PickScore was trained with.",
    )
    revision: str | None = Field(None, description="Hub revision of `model`; None = default.")
    batch_size: int = Field(32, ge=1, description="Most images per CLIP forward pass.")


@register("pickscore")
class PickScore(Reward):
    Config = PickScoreConfig

    def __init__(self, config: PickScoreConfig | None = None, *, model=None, processor=None):
        """`model` + `processor` inject an already-built CLIPModel and CLIPProcessor (tests); else `load` reads
        them from the config."""
        super().__init__(config)
        self.model, self.processor = model, processor
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = device
        if self.model is None:
            cfg = self.config
            self.processor = load_pretrained(CLIPProcessor.from_pretrained, cfg.processor, OWNER, "CLIP processor")
            self.model = load_pretrained(
                CLIPModel.from_pretrained, cfg.model, OWNER, "PickScore model", revision=cfg.revision
            )
        self.model = self.model.to(device).eval()
        self.logit_scale = float(self.model.logit_scale.detach().exp().cpu())

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        cosines = clip_cosines(self.model, self.processor, images, prompts, self.device, self.config.batch_size)
        return [
            RewardOutput(reward=self.logit_scale * c, components={"cosine": c, "logit_scale": self.logit_scale})
            for c in cosines.tolist()
        ]

    def info(self) -> RewardInfo:
        scale = getattr(self, "logit_scale", 100.0)  # the release's (and CLIP's usual) value before `load`
        return RewardInfo(
            description=(
                "PickScore: logit_scale * cosine of the PickScore CLIP's image and prompt embeddings, a human "
                "preference logit (softmax over a prompt's images = pick probabilities); higher = preferred."
            ),
            min_reward=-scale,
            max_reward=scale,
            models=(
                ModelSource("clip", self.config.model, self.config.revision or ""),
                ModelSource("processor", self.config.processor),
            ),
            # The processor is the only reader of the images: a client may resize as it does.
            input_resolution=from_processor(self.processor),
        )

"""HPS v2.1 (Wu et al. 2023, "Human Preference Score v2"): a CLIP ViT-H-14 fine-tuned on 798k human choices
between generated images (HPD v2).

Score: the cosine similarity of the image's and the prompt's L2-normalised embeddings in HPS's CLIP, as the
release's `score.py` computes it (`diag(image_features @ text_features.T)`); range [-1, 1], higher = more preferred.
HPS reports the raw cosine; its README's benchmark tables and most papers multiply it by 100 ("HPS 30.2"). Real
generations score about 0.15-0.35: the README's v2.1 benchmark averages run from 0.145 (GLIDE) over 0.254 (SD 1.4)
to 0.313 (SDXL refiner 0.9). As the README says, only images of the same prompt compare meaningfully, and v2.0 and
v2.1 scores do not compare at all. `components["cosine"]` repeats the score under the name the other CLIP-similarity
rewards use for their cosine. Scores do not depend on the other samples in a batch.

The release `HPS_v2.1_compressed.pt` (hub xswu/HPSv2) is an open_clip checkpoint, `{"state_dict": ...}` in
open_clip's (= OpenAI CLIP's) keys; HPSv2's code builds open_clip's ViT-H-14 and loads it. This reward instead
converts it on load into a transformers `CLIPModel` (`services.clip_checkpoints.to_transformers` + `load_strict`) and
does not use open_clip at serving time: every CLIP-based reward then runs one implementation (transformers CLIP
through `services.clip`: one processor, batching and device path, SDPA attention), and open_clip stays the
independent reference that tests/services/test_hpsv2.py compares against (within 1e-5).

The weights say nothing about the activation or the number of attention heads, so the architecture comes from
`clip_config` (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: the ViT-H-14 HPS fine-tuned, 16 heads per tower, GELU), which
also gives the tokenizer (CLIP's BPE, 77 tokens) and image processor. That repo's own 4 GB of weights are never read:
the model is built from its config.json without initialisation and every parameter comes from the checkpoint, loaded
strictly (a missing, extra or differently shaped key is an error naming it). A config whose activation is not exact
GELU is refused: QuickGELU (OpenAI's CLIP weights, HPS v1) or a tanh approximation loads the same shapes without
complaint and scores wrong (on the tiny model by ~5e-3 and ~1e-4).

Preprocessing. HPS applies open_clip's transform to a PIL image: Resize(224, bicubic, shortest side), CenterCrop(224),
ToTensor, Normalize(OpenAI mean/std); the laion processor's config says the same. Transformers' CLIPImageProcessor
(5.x, torchvision backend) computes the same output size and arithmetic, with two measured differences (the tests
pin both):
  * resizing: it resamples uint8 tensors with torch's antialiased bicubic where open_clip uses PIL's, which round
    differently: at most one uint8 level at some pixels when downscaling (none on smooth images; images already 224
    on the short side are not resampled by either). On the tiny model's cosines that is up to ~3e-4 for pixel
    noise, the worst case.
  * center crop: torchvision rounds the offset (d / 2, half to even) where transformers floors it, so when the
    resized long side exceeds 224 by 3, 7, 11, ... (4k + 3) pixels the crop sits one pixel further left (or up).
    Square images and most aspect ratios are unaffected; SDXL's 1216x832 (resized to 327x224: 103 over) is not.
HPS also scores under CUDA autocast (float16); this reward computes in float32, which differs from the release's
numbers by float16 rounding.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from services.clip import clip_cosines
from services.config import Config
from services.models import load_pretrained
from services.registry import register
from services.resolution import from_processor
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

OWNER = "hpsv2 reward"
# The release's file name (hub xswu/HPSv2); HPS v2.0 is `HPS_v2_compressed.pt`, same format.
CHECKPOINT_FILE = "HPS_v2.1_compressed.pt"


class Hpsv2Config(Config):
    checkpoint: str = Field(
        CHECKPOINT_FILE,
        description=(
            "The HPS checkpoint: HPS_v2.1_compressed.pt from the hub repo xswu/HPSv2 (HPS_v2_compressed.pt for "
            "v2.0), an open_clip ViT-H-14 checkpoint {'state_dict': ...}, keys possibly 'module.'-prefixed; a "
            "transformers CLIPModel state dict of the same model loads too. A path; '~' is expanded."
        ),
    )
    clip_config: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description=(
            "Transformers CLIP source (hub id or local directory) giving the architecture (config.json), tokenizer "
            "and image processor of the model HPS fine-tuned; its own weights are not loaded."
        ),
    )
    batch_size: int = Field(32, ge=1, description="Most images per CLIP forward pass.")


def check_architecture(config, source: str) -> None:
    """Refuses a CLIP config that cannot be HPS v2's: both towers must use exact GELU, as open_clip's ViT-H-14 does.

    The checkpoint cannot tell (activations have no weights), and a QuickGELU model loads the same shapes."""
    acts = {tower: getattr(config, f"{tower}_config").hidden_act for tower in ("text", "vision")}
    wrong = {tower: act for tower, act in acts.items() if act != "gelu"}
    if wrong:
        raise ValueError(
            f"{OWNER}: clip_config {source!r} has hidden_act {wrong} but HPS v2 checkpoints are open_clip ViT-H-14, "
            "whose towers use exact GELU ('gelu'); QuickGELU belongs to OpenAI's CLIP weights (e.g. HPS v1). Point "
            "clip_config at laion/CLIP-ViT-H-14-laion2B-s32B-b79K or a copy of its config."
        )


@register("hpsv2")
class Hpsv2(Reward):
    Config = Hpsv2Config

    def __init__(self, config: Hpsv2Config | None = None, *, clip=None, processor=None):
        """`clip` + `processor` inject an already-built transformers CLIPModel (with HPS weights) and its
        CLIPProcessor (tests); else `load` builds them from `checkpoint` and `clip_config`."""
        super().__init__(config)
        if (clip is None) != (processor is None):
            raise ValueError(f"{OWNER}: inject both clip and processor, or neither")
        self.clip, self.processor = clip, processor
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        self.device = device
        if self.clip is None:
            self.clip, self.processor = self._load_clip()
        self.clip = self.clip.to(device).eval()

    def _load_clip(self):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor
        from transformers.initialization import no_init_weights

        from services.clip_checkpoints import load_strict, read_checkpoint, to_transformers

        cfg = self.config
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{OWNER}: checkpoint {str(path)!r} does not exist; download {CHECKPOINT_FILE} from the hub repo "
                "xswu/HPSv2 and set `checkpoint` to its path"
            )
        # The small files first, so that a wrong clip_config fails before gigabytes are read.
        config = load_pretrained(CLIPConfig.from_pretrained, cfg.clip_config, OWNER, "CLIP config")
        check_architecture(config, cfg.clip_config)
        processor = load_pretrained(CLIPProcessor.from_pretrained, cfg.clip_config, OWNER, "CLIP processor")
        try:
            checkpoint = read_checkpoint(path)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"{OWNER}: cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e})") from None
        try:
            state_dict = to_transformers(checkpoint, vision=True)
        except ValueError as e:
            raise ValueError(f"{OWNER}: checkpoint {str(path)!r} is not an HPS v2 CLIP checkpoint: {e}") from None
        del checkpoint
        # Every parameter is overwritten by the strict load, so the random init of ViT-H's ~1B parameters is skipped.
        with no_init_weights():
            model = CLIPModel(config)
        try:
            load_strict(model, state_dict)
        except ValueError as e:
            raise ValueError(
                f"{OWNER}: checkpoint {str(path)!r} does not fit the CLIP of clip_config {cfg.clip_config!r}: {e}"
            ) from None
        return model, processor

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        cosines = clip_cosines(self.clip, self.processor, images, prompts, self.device, self.config.batch_size)
        return [RewardOutput(reward=c, components={"cosine": c}) for c in cosines.tolist()]

    def info(self) -> RewardInfo:
        return RewardInfo(
            description=(
                "HPS v2.1: cosine of the image and prompt embeddings of a CLIP ViT-H-14 fine-tuned on human "
                "preferences (the raw cosine; papers often report x100); real generations score about 0.15-0.35, "
                "compare images of one prompt only; higher = preferred."
            ),
            min_reward=-1.0,
            max_reward=1.0,
            models=(
                ModelSource("hps_checkpoint", self.config.checkpoint),
                ModelSource("clip", self.config.clip_config),
            ),
            # The processor is the only reader of the images: a client may resize as it does.
            input_resolution=from_processor(self.processor),
        )

"""LAION aesthetic score: the improved aesthetic predictor (Schuhmann, LAION-Aesthetics v2), DDPO's aesthetic reward.

A head on the L2-normalised CLIP ViT-L/14 (OpenAI) image embedding predicts the mean rating people give the image
for how good it looks, on a 1-10 scale; it was regressed (MSE) on SAC (ratings of generated images), LAION-Logos and
AVA (photo-contest ratings).

Score: the predicted rating; higher = more aesthetic. Reference points: LAION-Aesthetics v2 is LAION-5B filtered by
this score at 4.5 (laion/aesthetics_v2_4.5 keeps 1.33B pairs), 5, 6 and 6.5, and Stable Diffusion v1.2+ trained on
the 5+ subset; typical LAION and Stable Diffusion images score about 5-6 (approximate). The HPS v2 README measures
the predictor at 57.4% pairwise accuracy on ImageReward's test set and 76.8% on HPD v2's (HPS v2.1: 66.8%, 84.1%).
The rating scale is 1-10, but the head is affine, so its exact range on unit-norm inputs is `bias -/+ |weight|` of
the composed map: `info()` reports that once loaded (before, (-inf, inf)).

The score does not depend on the prompt: prompts are accepted and ignored. No components: the score is one affine
function of the unit embedding, so it has no parts to show, and the embedding's norm before normalisation, which the
recipe discards, is no quality signal. Prompt alignment is what the alignment and hpsv2 rewards measure; combine them
with this one in an assemble application.

The release `sac+logos+ava1-l14-linearMSE.pth` (GitHub christophschuhmann/improved-aesthetic-predictor) is a torch
state dict of its training script's `MLP.layers = Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))`: keys `layers.{0,2,4,6,7}.{weight,bias}`.
Despite the name it has no activations (commented out in the release; "linearMSE" is that variant, the "reluMSE"
heads have other keys and are rejected), so the five layers compose to one affine map; they are applied as released.
The hidden widths are read from the state dict, and its input must be the CLIP's projection_dim (768 for
openai/clip-vit-large-patch14). The release's `clip.load` preprocessing is OpenAI's Resize(224, bicubic) ->
CenterCrop -> Normalize; the transformers CLIP processor matches it up to the resize and crop rounding measured in
`services/rewards/hpsv2.py`'s docstring. The release also embeds in float16 on CUDA; this reward in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
from pydantic import Field

from services.clip import clip_embeddings, load_clip
from services.config import Config
from services.registry import register
from services.resolution import from_processor
from services.reward import ModelSource, Reward, RewardInfo, RewardOutput

OWNER = "aesthetic reward"
# The release's file name.
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
# Positions of the Linear layers in the release's `layers` Sequential, and the Dropouts between them (inactive at
# inference; kept so the module is the release's).
LINEAR_INDICES = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


class AestheticConfig(Config):
    clip: str = Field(
        "openai/clip-vit-large-patch14",
        description=(
            "The CLIP whose image embedding the head reads: any transformers CLIP source (hub id or local "
            "directory); the release head was trained on openai/clip-vit-large-patch14 (projection_dim 768)."
        ),
    )
    head: str = Field(
        HEAD_FILE,
        description=(
            f"The head: {HEAD_FILE} from GitHub christophschuhmann/improved-aesthetic-predictor, a torch state dict "
            "(layers.{0,2,4,6,7}.{weight,bias}) whose input width is the CLIP's projection_dim. A path; '~' is "
            "expanded."
        ),
    )
    batch_size: int = Field(64, ge=1, description="Most images per CLIP forward pass.")


def head_widths(state_dict: dict) -> tuple[int, ...]:
    """The widths (input, hidden..., 1) of a head state dict in the release's layout.

    Anything else is a ValueError naming the keys (another model's state dict, the ReLU variant) or the shapes (a
    chain that does not connect, an output that is not one number)."""
    import torch

    expected = {f"layers.{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            "not the improved-aesthetic-predictor head (keys layers.{0,2,4,6,7}.{weight,bias}): "
            f"missing keys {missing[:6]}, unexpected keys {unexpected[:6]}"
        )
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state_dict.items()}
    listed = ", ".join(f"{k} {shapes[k]}" for i in LINEAR_INDICES for k in (f"layers.{i}.weight", f"layers.{i}.bias"))
    weight = shapes["layers.0.weight"]
    widths = [weight[1] if len(weight) == 2 else -1]
    for i in LINEAR_INDICES:
        weight, bias = shapes[f"layers.{i}.weight"], shapes[f"layers.{i}.bias"]
        if not (len(weight) == 2 and weight[1] == widths[-1] and bias == weight[:1]):
            raise ValueError(f"the head's layer shapes do not chain at layers.{i}: {listed}")
        widths.append(weight[0])
    if widths[-1] != 1:
        raise ValueError(f"the head must output one number, layers.7 outputs {widths[-1]}: {listed}")
    return tuple(widths)


def build_head(widths: Sequence[int]):
    """The release's `layers` Sequential at these widths (Linear at LINEAR_INDICES, Dropout between, no activation).

    Its state dict keys are the release's without the `layers.` prefix."""
    import torch

    modules: list[torch.nn.Module] = []
    for (width_in, width_out), index in zip(pairwise(widths), LINEAR_INDICES, strict=True):
        modules.append(torch.nn.Linear(width_in, width_out))
        if index + 1 in DROPOUTS:
            modules.append(torch.nn.Dropout(DROPOUTS[index + 1]))
    return torch.nn.Sequential(*modules)


def read_head(path: str | Path) -> dict:
    """The state dict in the head file at `path`; FileNotFoundError or ValueError naming it."""
    import torch

    from services.clip_checkpoints import read_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{OWNER}: head {str(path)!r} does not exist; download {HEAD_FILE} from GitHub "
            "christophschuhmann/improved-aesthetic-predictor and set `head` to its path"
        )
    state = read_checkpoint(path)
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{OWNER}: head {str(path)!r} is not a flat state dict of tensors (found {found})")
    try:
        head_widths(state)
    except ValueError as e:
        raise ValueError(f"{OWNER}: head {str(path)!r}: {e}") from None
    return state


def affine_range(head, width: int) -> tuple[float, float]:
    """(min, max) of an affine head over unit-norm inputs: bias -/+ |weight| of the composed map."""
    import torch

    with torch.inference_mode():
        param = next(head.parameters())
        bias = head(torch.zeros(1, width, dtype=param.dtype, device=param.device))  # (1, 1)
        weight = head(torch.eye(width, dtype=param.dtype, device=param.device)) - bias  # (width, 1)
    b, norm = float(bias), float(weight.norm())
    return b - norm, b + norm


@register("aesthetic")
class Aesthetic(Reward):
    Config = AestheticConfig

    def __init__(self, config: AestheticConfig | None = None, *, clip=None, processor=None, head=None):
        """`clip` + `processor` inject a transformers CLIPModel and its CLIPProcessor, `head` an affine module (as the
        release's) mapping (N, D) unit embeddings to (N, 1) ratings (tests); `load` reads what is not injected."""
        super().__init__(config)
        if (clip is None) != (processor is None):
            raise ValueError(f"{OWNER}: inject both clip and processor, or neither")
        self.clip, self.processor, self.head = clip, processor, head
        self.range = (float("-inf"), float("inf"))
        self.device = "cpu"

    def load(self, device: str = "cpu") -> None:
        cfg = self.config
        self.device = device
        # The head first: it is small, so a wrong file fails before the CLIP is read.
        state = read_head(cfg.head) if self.head is None else None
        if self.clip is None:
            self.clip, self.processor = load_clip(cfg.clip, OWNER, "CLIP model")
        width = self.clip.config.projection_dim
        if state is not None:
            head_in = state["layers.0.weight"].shape[1]
            if head_in != width:
                raise ValueError(
                    f"{OWNER}: head {cfg.head!r} takes {head_in}-wide embeddings (layers.0.weight "
                    f"{tuple(state['layers.0.weight'].shape)}), but the CLIP {cfg.clip!r} embeds images in {width} "
                    "dimensions (projection_dim); the release head needs openai/clip-vit-large-patch14 (768)"
                )
            self.head = build_head(head_widths(state))
            self.head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
        self.clip = self.clip.to(device).eval()
        self.head = self.head.to(device).eval()
        self.range = affine_range(self.head, width)

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        import torch

        outputs = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            image_emb, _ = clip_embeddings(self.clip, self.processor, images[start : start + size], None, self.device)
            with torch.inference_mode():
                rating = self.head(image_emb.to(self.device)).squeeze(-1)  # (B,)
            outputs += [RewardOutput(reward=r) for r in rating.float().cpu().tolist()]
        return outputs

    def info(self) -> RewardInfo:
        return RewardInfo(
            description=(
                "LAION aesthetic score: predicted 1-10 rating of how good the image looks, an affine head on the "
                "unit CLIP ViT-L/14 image embedding; ignores the prompt; higher = more aesthetic. Range: the head's "
                "exact bounds on unit embeddings once loaded."
            ),
            min_reward=self.range[0],
            max_reward=self.range[1],
            models=(ModelSource("clip", self.config.clip), ModelSource("head", self.config.head)),
            # The processor is the only reader of the images: a client may resize as it does.
            input_resolution=from_processor(self.processor),
        )

"""The one reward interface every reward implements, and the values it returns.

A reward is built from its config (a `services.config.Config`: cheap, no heavy imports), then `load(device)` does
the heavy setup once (weights, processors), then `score(images, prompts)` scores a batch. Images are the canonical
(H, W, 3) uint8 RGB arrays of `services.codec`, read-only: a raw image is a view of the request's bytes, never
copied, so a reward must not write to it. Rewards that take models can also be built from already-constructed
modules, so tests inject tiny seeded models.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from services.resolution import InputResolution

# Hugging Face image processors wrap their input with torch.from_numpy, which warns once per process about read-only
# arrays (the canonical images above) although the processors only read them and write their own float tensors.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass
class SegmentScore:
    """One labelled region of an image (semantic reward)."""

    label: str
    # Fraction of the image area, in [0, 1].
    area_fraction: float
    # Confidence of the label, in [0, 1].
    label_confidence: float
    # Likelihood that the label belongs in the prompted scene, in [0, 1].
    likelihood: float


@dataclass
class RewardOutput:
    """The score of one sample, with the parts that explain it."""

    reward: float
    # Named parts of the reward, e.g. {"jpeg_kb": 12.3}.
    components: dict[str, float] = field(default_factory=dict)
    # Caption the reward generated (caption reward).
    caption: str | None = None
    # Labelled regions (semantic reward).
    segments: list[SegmentScore] = field(default_factory=list)


@dataclass(frozen=True)
class SampleFailure:
    """A sample the reward could not score; the rest of the batch is unaffected."""

    # A `reward.v1.ErrorCode` name, e.g. "SCORING_FAILED".
    code: str
    message: str


@dataclass(frozen=True)
class ModelSource:
    """A model a reward loads: its role and where the weights come from (hub id or local path).

    `Describe` lists them, and the replica's provenance covers them (`services.provenance.build_provenance`).
    """

    # Role of the model in the reward, e.g. "captioner".
    role: str
    # Hub id, local file or directory ("~" allowed), or "" for none.
    source: str
    # Hub revision (branch, tag or commit) or another version label; "" when unknown.
    revision: str = ""


@dataclass(frozen=True)
class RewardInfo:
    """What the score means and its range, for `Describe` and the docs."""

    description: str
    min_reward: float
    max_reward: float
    higher_is_better: bool = True
    models: tuple[ModelSource, ...] = ()
    # Options accepted in ScoreRequest.options: name -> description.
    options: tuple[tuple[str, str], ...] = ()
    # The resize the reward applies first, declared only where a client resizing instead leaves every score
    # bit-identical (`services.resolution`); None otherwise.
    input_resolution: InputResolution | None = None


class Reward(abc.ABC):
    """Base class of all rewards. Subclasses set `Config` and register with `@services.registry.register(name)`."""

    # Registered name (snake_case, = file stem = Serve application name); set by `register`.
    name: ClassVar[str] = ""
    # The reward's config: a `services.config.Config` subclass (frozen, validated, a description per field).
    Config: ClassVar[type]

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(self.config).__name__}")

    @abc.abstractmethod
    def load(self, device: str = "cpu") -> None:
        """Loads weights and moves models to `device` ("cpu", "cuda", "cuda:1"). Called once before `score`."""

    @abc.abstractmethod
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput | SampleFailure]:
        """Scores a batch: `images[i]` is (H, W, 3) uint8 RGB, generated from `prompts[i]`.

        Returns one entry per sample, in order. The score of a sample must not depend on the other samples in the
        batch. Raising fails the whole batch; the serving layer then rescores sample by sample to isolate the cause.
        """

    @abc.abstractmethod
    def info(self) -> RewardInfo:
        """Meaning, range and models of the score."""

"""The image size a reward's model reads, declared in `Describe`, and the resize a client may do before sending it.

A CLIP- or BLIP-style reward resizes every image before its model sees it (shorter side to 224, or to 384 x 384,
bicubic). A client holding 512 x 512 pixels can do that resize itself and send 4-5x fewer bytes, but only where the
score stays bit-identical to resizing on the server. A reward declares an `InputResolution` only when that holds:

1. The client's resize is the server's own op. Transformers' torchvision-backend image processors (the default class
   in transformers 5) resize a uint8 (N, 3, H, W) tensor with `torchvision.transforms.v2.functional.resize`,
   bicubic, antialiased, to the size `InputResolution.target_size` computes (their rule); `resize` calls the same
   function the same way. Bicubic only: torchvision resizes uint8 bilinear natively on AVX2 CPUs and through float32
   elsewhere, so bilinear results would depend on the CPU.
2. Resizing an image already at the target size is the identity: torchvision returns its input when the size
   matches, and `target_size` maps a resized image to its own size.
3. The image processor is the only reader of the image in the reward (each declaring reward says so in `info()`).
4. Client and server run the same torch and torchvision: `implementation` names them, and a client with other
   versions sends full size. torch's uint8 antialiased resize is integer arithmetic, so CPU vendors and dispatch
   levels agree (tests/services/test_resolution.py compares each level the CPU offers).

Only images that get smaller are resized (an upscale would send more bytes); encoded images are sent as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from protos.reward.v1 import reward_pb2

# The one interpolation a declaration may name (see point 1 of the module docstring).
RESAMPLE = "bicubic"


@dataclass(frozen=True)
class InputResolution:
    """The resize a reward applies to every image first: shorter side to `shortest_edge` (aspect kept), or exactly
    `height` x `width`; bicubic, antialiased, by `implementation`."""

    shortest_edge: int = 0
    height: int = 0
    width: int = 0
    # "torch==X torchvision==Y": the resize is bit-identical only with these versions.
    implementation: str = ""
    resample: str = RESAMPLE

    def __post_init__(self):
        exact = self.height > 0 and self.width > 0
        if (self.shortest_edge > 0) == exact or min(self.shortest_edge, self.height, self.width) < 0:
            raise ValueError(
                f"input resolution: set shortest_edge > 0 or both height and width > 0, got shortest_edge="
                f"{self.shortest_edge}, height={self.height}, width={self.width}"
            )
        if self.resample != RESAMPLE:
            raise ValueError(f"input resolution: resample must be {RESAMPLE!r}, got {self.resample!r}")
        if not self.implementation:
            raise ValueError("input resolution: implementation (the torch and torchvision versions) is required")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the reward resizes a `height` x `width` image to: transformers' `shortest_edge` rule
        (long side = int(edge * long / short)), or the fixed size."""
        if not self.shortest_edge:
            return self.height, self.width
        edge = self.shortest_edge
        if width <= height:
            return int(edge * height / width), edge
        return edge, int(edge * width / height)

    def to_proto(self) -> reward_pb2.InputResolution:
        return reward_pb2.InputResolution(
            shortest_edge=self.shortest_edge,
            height=self.height,
            width=self.width,
            resample=self.resample,
            implementation=self.implementation,
        )

    @classmethod
    def from_proto(cls, message: reward_pb2.InputResolution) -> InputResolution:
        return cls(message.shortest_edge, message.height, message.width, message.implementation, message.resample)


def local_implementation() -> str:
    """This process's resize implementation, as `InputResolution.implementation` names it."""
    import torch
    import torchvision

    return f"torch=={torch.__version__} torchvision=={torchvision.__version__}"


def from_processor(processor: Any) -> InputResolution | None:
    """The resize a transformers processor (or its `image_processor`) applies first, when a client may do it instead
    (module docstring); None otherwise: no processor yet, another backend or pipeline, no resize, or a size rule or
    interpolation not covered."""
    if processor is None:
        return None
    from transformers.image_processing_backends import TorchvisionBackend
    from transformers.image_utils import PILImageResampling

    image_processor = getattr(processor, "image_processor", processor)
    cls = type(image_processor)
    if not isinstance(image_processor, TorchvisionBackend) or not getattr(image_processor, "do_resize", False):
        return None
    # A subclass with its own resize or pipeline may resize differently, or read the image before resizing.
    if cls.resize is not TorchvisionBackend.resize or cls._preprocess is not TorchvisionBackend._preprocess:
        return None
    if image_processor.resample != PILImageResampling.BICUBIC:
        return None
    size = image_processor.size
    others = [size.longest_edge, size.max_height, size.max_width, size.min_pixels, size.max_pixels]
    if any(v is not None for v in others):
        return None
    if size.shortest_edge and size.height is None and size.width is None:
        return InputResolution(shortest_edge=int(size.shortest_edge), implementation=local_implementation())
    if size.shortest_edge is None and size.height and size.width:
        return InputResolution(height=int(size.height), width=int(size.width), implementation=local_implementation())
    return None


def resize(image: np.ndarray, resolution: InputResolution) -> np.ndarray:
    """`image` ((H, W, 3) uint8) resized as the reward resizes it, when that makes it smaller; else `image` itself."""
    height, width = image.shape[:2]
    new_height, new_width = resolution.target_size(height, width)
    if new_height * new_width >= height * width:
        return image
    import torch
    from torchvision.transforms.v2 import functional as tvF

    # The processor's layout: a contiguous (1, 3, H, W) uint8 tensor (it stacks same-size images along dim 0).
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()[None]  # (1, 3, H, W)
    out = tvF.resize(pixels, [new_height, new_width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())  # (H', W', 3) uint8

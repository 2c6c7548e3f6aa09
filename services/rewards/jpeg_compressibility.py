"""JPEG compressibility reward (DDPO, Black et al. 2023).

Score: minus the size, in kB (1 kB = 1000 bytes), of the image encoded as JPEG at a fixed quality. Range (-inf, 0]:
0 is unreachable (every JPEG has headers, about 0.6 kB); at quality 95 a flat 512x512 image scores about -4.7 and
uniform pixel noise at 512x512 about -308 (the lower end grows with the pixel count). Higher means more
compressible: fewer edges and less texture. It needs no weights, which makes it the reward the trainer's
end-to-end tests optimise.

The JPEG is written to a per-thread in-memory file (a memfd on Linux, a temporary file elsewhere) and only its length
is read. Pillow's encoder releases the GIL when it writes to a file descriptor but holds it while it fills a
`BytesIO`, so this is what lets the replica's concurrent batches (`max_concurrent_batches`) encode on several cores
(benchmarks/README.md); the bytes, and so the scores, are the same as a `BytesIO` save.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pydantic import Field

from services.config import Config
from services.registry import register
from services.reward import Reward, RewardInfo, RewardOutput


class JpegCompressibilityConfig(Config):
    quality: int = Field(95, ge=1, le=95, description="JPEG quality used to measure size (1-95); DDPO uses 95.")


_scratch = threading.local()


def jpeg_size(image: np.ndarray, quality: int) -> int:
    """Bytes of `image` ((H, W, 3) uint8) encoded as JPEG at `quality`, encoded without holding the GIL."""
    out = getattr(_scratch, "file", None)
    if out is None:
        # Unbuffered, so tell() is the descriptor's own offset, where Pillow's C encoder wrote to.
        if hasattr(os, "memfd_create"):
            out = io.FileIO(os.memfd_create("rewardfleet-jpeg"), "w+b")
        else:
            out = tempfile.TemporaryFile(buffering=0)
        _scratch.file = out
    out.seek(0)  # bytes left past the end from a larger image are never read
    Image.fromarray(image).save(out, format="JPEG", quality=quality)
    return out.tell()


@register("jpeg_compressibility")
class JpegCompressibility(Reward):
    Config = JpegCompressibilityConfig

    def load(self, device: str = "cpu") -> None:
        # Nothing to load: the reward is pure computation on the CPU whatever the device.
        pass

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[RewardOutput]:
        outputs = []
        for image in images:
            kb = jpeg_size(image, self.config.quality) / 1000.0
            outputs.append(RewardOutput(reward=-kb, components={"jpeg_kb": kb}))
        return outputs

    def info(self) -> RewardInfo:
        return RewardInfo(
            description=(
                f"Minus the JPEG size in kB at quality {self.config.quality}; higher = more compressible "
                "(simpler image). Prompt-independent."
            ),
            min_reward=float("-inf"),
            max_reward=0.0,
        )

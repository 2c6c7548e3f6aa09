"""The one place images are validated, decoded and encoded.

Canonical in-memory image of rewardfleet: a C-contiguous `numpy.ndarray` of dtype uint8 and shape (H, W, 3), RGB.
It is what raw wire images already are (so the raw transport decodes with no copy) and what PIL and the Hugging Face
image processors take directly. Rewards receive images in this format only and must treat them as read-only.

Decoding never raises anything but `ImageError`, whose `code` is the name of a `reward.v1.ErrorCode`; the serving
layer turns it into a per-sample error so one bad image never costs the rest of its batch.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # services.shared_memory imports this module
    from services.shared_memory import SegmentReader

# Formats accepted for encoded images on the wire.
ENCODED_FORMATS = ("PNG", "JPEG", "WEBP")
# Default limit on height * width of one image (4096 x 4096), checked from the header before any pixel is decoded.
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An image that cannot be used; `code` is a `reward.v1.ErrorCode` name (e.g. "INVALID_IMAGE")."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def check_image_size(height: int, width: int, max_pixels: int) -> None:
    """INVALID_IMAGE for a size that is not positive, IMAGE_TOO_LARGE above `max_pixels`."""
    if height <= 0 or width <= 0:
        raise ImageError("INVALID_IMAGE", f"image size must be positive, got {height}x{width}")
    if height * width > max_pixels:
        raise ImageError(
            "IMAGE_TOO_LARGE", f"image is {height}x{width} = {height * width} pixels, more than the limit {max_pixels}"
        )


def decode_encoded(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decodes PNG/JPEG/WebP bytes to a (H, W, 3) uint8 RGB array.

    The size is checked from the header before decoding, so an oversized (or decompression-bomb) image costs nothing.
    Alpha is dropped; grey, palette and CMYK images become RGB; of an animated image the first frame is used.
    """
    if not data:
        raise ImageError("INVALID_IMAGE", "image bytes are empty")
    try:
        img = Image.open(io.BytesIO(data), formats=ENCODED_FORMATS)
    except Image.DecompressionBombError as e:
        # PIL refuses headers over twice its own MAX_IMAGE_PIXELS before we see the size: too large all the same.
        raise ImageError("IMAGE_TOO_LARGE", f"image has more pixels than the limit {max_pixels} ({e})") from None
    except Exception as e:  # PIL raises several types for unidentifiable data
        raise ImageError("INVALID_IMAGE", f"not a decodable PNG, JPEG or WebP image ({type(e).__name__})") from None
    width, height = img.size
    check_image_size(height, width, max_pixels)
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        array = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # truncated or corrupt data surfaces only when the pixels are decoded
        raise ImageError("INVALID_IMAGE", f"corrupt {img.format} image: {type(e).__name__}: {e}"[:300]) from None
    if array.shape != (height, width, 3):
        raise ImageError("INVALID_IMAGE", f"decoded to unexpected shape {array.shape}")
    return np.ascontiguousarray(array)


def decode_raw(
    height: int, width: int, data: bytes | memoryview, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Views raw uint8 RGB bytes as a (H, W, 3) array (no copy; read-only)."""
    check_image_size(height, width, max_pixels)
    expected = height * width * 3
    if len(data) != expected:
        raise ImageError(
            "INVALID_IMAGE",
            f"raw image data has {len(data)} bytes, expected height*width*3 = {expected} for {height}x{width}",
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)


def decode_sample_image(
    sample: Any,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    raw_data: memoryview | None = None,
    segments: SegmentReader | None = None,
) -> np.ndarray:
    """Decodes the image of a `reward.v1.Sample`, whichever transport it uses.

    `raw_data`, when given, is the raw image's pixel bytes as a view into the request (`services.wire`): reading
    `sample.raw.data` from protobuf would copy them. `segments` reads shared-memory images (`services.shared_memory`);
    None: the application does not accept them.
    """
    kind = sample.WhichOneof("image")
    if kind == "encoded":
        return decode_encoded(sample.encoded, max_pixels)
    if kind == "raw":
        data = raw_data if raw_data is not None else sample.raw.data
        return decode_raw(sample.raw.height, sample.raw.width, data, max_pixels)
    if kind == "shared_memory":
        if segments is None:
            raise ImageError(
                "SHARED_MEMORY_UNAVAILABLE",
                "this application does not accept shared-memory images (`shared_memory: false`); send the pixels in "
                "the request",
            )
        shm = sample.shared_memory
        return segments.pixels(shm.segment, shm.offset, shm.height, shm.width, max_pixels)
    raise ImageError("MISSING_IMAGE", "sample has no image (set `encoded`, `raw` or `shared_memory`)")


def to_hwc_uint8(image: Any) -> np.ndarray:
    """Converts a client-side image to the canonical (H, W, 3) uint8 RGB array.

    Accepts PIL images, numpy arrays and torch tensors (anything with `.detach()`), laid out (H, W, 3), (3, H, W) or
    (H, W) grey; uint8 values, or floats in [0, 1] (scaled by 255 and rounded, as diffusers' `numpy_to_pil` does).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if hasattr(image, "detach"):  # torch.Tensor, without importing torch here
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), (3, H, W) or (H, W), got {array.shape}")
    if array.shape[2] != 3 and array.shape[0] == 3:
        array = array.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if array.shape[2] != 3:
        raise ValueError(f"expected 3 channels in (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"expected uint8 or float image values, got dtype {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(array)


def encode_image(array: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    """Encodes a (H, W, 3) uint8 array as PNG, JPEG or WebP bytes."""
    fmt = fmt.upper()
    if fmt not in ENCODED_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; valid: {list(ENCODED_FORMATS)}")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()

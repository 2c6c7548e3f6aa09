import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from protos.reward.v1 import reward_pb2
from services.codec import (
    ImageError,
    decode_encoded,
    decode_raw,
    decode_sample_image,
    encode_image,
    to_hwc_uint8,
)

ERROR_CODES = set(reward_pb2.ErrorCode.keys())


def _check_decoded(array, height=None, width=None):
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    if height is not None:
        assert array.shape[:2] == (height, width)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_encoded_arbitrary_bytes_only_raises_image_error(data):
    try:
        _check_decoded(decode_encoded(data))
    except ImageError as e:
        assert e.code in ERROR_CODES and e.message


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["PNG", "JPEG", "WEBP"]),
    seed=st.integers(0, 2**16),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8),
)
def test_decode_corrupted_valid_images_only_raises_image_error(fmt, seed, cut, flips):
    array = np.random.default_rng(seed).integers(0, 255, (17, 23, 3), dtype=np.uint8)
    data = bytearray(encode_image(array, fmt))
    for pos, value in flips:
        data[int(pos * (len(data) - 1))] = value
    data = bytes(data[: max(1, int(cut * len(data)))])
    try:
        _check_decoded(decode_encoded(data), 17, 23)
    except ImageError as e:
        assert e.code in ERROR_CODES and e.message


@settings(max_examples=300, deadline=None)
@given(height=st.integers(-3, 70), width=st.integers(-3, 70), extra=st.integers(-5, 5))
def test_decode_raw_any_shape_and_length(height, width, extra):
    n = max(0, max(height, 0) * max(width, 0) * 3 + extra)
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    try:
        array = decode_raw(height, width, data, max_pixels=64 * 64)
    except ImageError as e:
        assert e.code in {"INVALID_IMAGE", "IMAGE_TOO_LARGE"}
        if height > 0 and width > 0 and height * width > 64 * 64:
            assert e.code == "IMAGE_TOO_LARGE"
        return
    assert (height, width, extra) == (*array.shape[:2], 0)
    assert array.tobytes() == data


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**16))
def test_png_round_trip_is_lossless(height, width, seed):
    array = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_encoded(encode_image(array, "PNG")), array)


def test_size_limit_checked_from_header_before_decoding():
    # 5000 x 5000 with huge runs compresses to a tiny PNG: the limit must reject it without decoding pixels.
    data = encode_image(np.zeros((5000, 5000, 3), np.uint8), "PNG")
    assert len(data) < 200_000
    with pytest.raises(ImageError) as e:
        decode_encoded(data, max_pixels=4096 * 4096)
    assert e.value.code == "IMAGE_TOO_LARGE" and "5000x5000" in e.value.message


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_other_modes_become_rgb(mode):
    img = Image.new(mode, (9, 5))
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    _check_decoded(decode_encoded(buf.getvalue()), 5, 9)


def test_other_formats_are_rejected():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    with pytest.raises(ImageError) as e:
        decode_encoded(buf.getvalue())
    assert e.value.code == "INVALID_IMAGE"


def test_sample_without_image():
    with pytest.raises(ImageError) as e:
        decode_sample_image(reward_pb2.Sample(prompt="x"))
    assert e.value.code == "MISSING_IMAGE"


def test_to_hwc_uint8_layouts():
    import torch

    hwc = np.random.default_rng(1).integers(0, 255, (6, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_hwc_uint8(hwc.transpose(2, 0, 1)), hwc)
    np.testing.assert_array_equal(to_hwc_uint8(torch.from_numpy(hwc.transpose(2, 0, 1).copy())), hwc)
    np.testing.assert_array_equal(to_hwc_uint8(Image.fromarray(hwc)), hwc)
    np.testing.assert_array_equal(to_hwc_uint8(hwc.astype(np.float32) / 255.0), hwc)
    assert to_hwc_uint8(np.zeros((6, 4))).shape == (6, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        to_hwc_uint8(np.zeros((6, 4, 5)))
    with pytest.raises(ValueError, match="dtype"):
        to_hwc_uint8(np.zeros((6, 4, 3), dtype=np.int64))

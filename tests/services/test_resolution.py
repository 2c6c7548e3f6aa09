"""Input resolution: what a processor declares, and that resizing on the client leaves the model's input bit-identical
(processor pixels and reward scores), on every CPU dispatch level torch offers here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BlipImageProcessor, CLIPImageProcessor, CLIPImageProcessorPil
from transformers.image_transforms import get_resize_output_image_size

from protos.reward.v1 import reward_pb2
from services.resolution import InputResolution, from_processor, local_implementation, resize
from services.rewards.caption import Caption, CaptionConfig, TextEncoderConfig
from services.rewards.clip_score import ClipScore
from trainer.local_models.tiny import MINILM, tiny_blip2, tiny_clip

LOCAL = local_implementation()
CLIP_224 = InputResolution(shortest_edge=224, implementation=LOCAL)
BLIP_384 = InputResolution(height=384, width=384, implementation=LOCAL)


def _image(seed: int, height: int, width: int) -> np.ndarray:
    """Noise over a gradient: the resize's rounding shows at every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = ((x * 255) // max(width, 1) + (y * 128) // max(height, 1)) % 256
    noise = rng.integers(0, 64, (height, width, 3))
    return ((base[..., None] + noise) % 256).astype(np.uint8)


def _pixels(processor, images) -> torch.Tensor:
    return processor(images=list(images), return_tensors="pt", input_data_format="channels_last")["pixel_values"]


# --- the declaration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"shortest_edge": 224, "height": 224, "width": 224}, {"height": 384}, {"shortest_edge": -1}],
)
def test_a_resolution_sets_a_shortest_edge_or_both_sides(kwargs):
    with pytest.raises(ValueError, match="shortest_edge > 0 or both height and width"):
        InputResolution(implementation=LOCAL, **kwargs)


def test_a_resolution_names_its_implementation_and_resamples_bicubic():
    with pytest.raises(ValueError, match="implementation"):
        InputResolution(shortest_edge=224)
    with pytest.raises(ValueError, match="resample must be 'bicubic'"):
        InputResolution(shortest_edge=224, implementation=LOCAL, resample="bilinear")


def test_the_declaration_round_trips_through_describe():
    for resolution in (CLIP_224, BLIP_384):
        message = reward_pb2.DescribeResponse(input_resolution=resolution.to_proto())
        message = reward_pb2.DescribeResponse.FromString(message.SerializeToString())
        assert InputResolution.from_proto(message.input_resolution) == resolution


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 1024))
def test_target_size_is_transformers_rule_and_maps_its_output_to_itself(height, width, edge):
    resolution = InputResolution(shortest_edge=edge, implementation=LOCAL)
    target = resolution.target_size(height, width)
    image = np.zeros((height, width, 1), np.uint8)
    rule = get_resize_output_image_size(image, edge, default_to_square=False, input_data_format="channels_last")
    assert target == tuple(rule)
    if min(target) > 0:
        assert resolution.target_size(*target) == target


def test_processors_declare_only_the_resizes_a_client_can_repeat():
    assert from_processor(CLIPImageProcessor()) == CLIP_224
    assert from_processor(BlipImageProcessor()) == BLIP_384
    assert from_processor(tiny_clip()[1]) == InputResolution(shortest_edge=32, implementation=LOCAL)
    assert from_processor(tiny_blip2()[1]) == InputResolution(height=32, width=32, implementation=LOCAL)
    assert from_processor(None) is None
    # PIL backend, no resize, bilinear (native uint8 on AVX2 only), another size rule, a resize of its own.
    assert from_processor(CLIPImageProcessorPil()) is None
    assert from_processor(CLIPImageProcessor(do_resize=False)) is None
    assert from_processor(CLIPImageProcessor(resample=2)) is None
    assert from_processor(CLIPImageProcessor(size={"shortest_edge": 224, "longest_edge": 300})) is None

    class OwnResize(CLIPImageProcessor):
        def resize(self, image, size, resample=None, antialias=True, **kwargs):
            return super().resize(image, size, resample, antialias, **kwargs)

    assert from_processor(OwnResize()) is None


# --- bit-identity ------------------------------------------------------------------------------------------------


def test_resize_only_makes_images_smaller():
    small = _image(0, 200, 300)
    assert resize(small, CLIP_224) is small  # 200 x 300 -> 224 x 336 would be larger
    big = _image(1, 512, 768)
    out = resize(big, CLIP_224)
    assert out.shape == (224, 336, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert resize(out, CLIP_224) is out
    wide = _image(2, 300, 512)  # 384 x 384 has fewer pixels than 300 x 512: resized although one side grows
    assert resize(wide, BLIP_384).shape == (384, 384, 3)


SIZES = [(512, 512), (512, 768), (768, 512), (1216, 832), (231, 224), (225, 1000), (640, 360), (383, 385)]


@pytest.mark.parametrize(
    ("processor", "resolution"),
    [(CLIPImageProcessor(), CLIP_224), (BlipImageProcessor(), BLIP_384)],
    ids=["clip-224-crop", "blip-384"],
)
def test_processor_pixels_are_bit_identical_after_a_client_resize(processor, resolution):
    assert from_processor(processor) == resolution
    images = [_image(i, h, w) for i, (h, w) in enumerate(SIZES)]
    resized = [resize(x, resolution) for x in images]
    assert sum(r is not x for r, x in zip(resized, images, strict=True)) >= 6
    # One image at a time, and as one batch (the processor groups images of one size).
    for x, r in zip(images, resized, strict=True):
        assert torch.equal(_pixels(processor, [x]), _pixels(processor, [r]))
    assert torch.equal(_pixels(processor, images), _pixels(processor, resized))


@settings(max_examples=25, deadline=None)
@given(st.integers(33, 400), st.integers(33, 400), st.integers(0, 2**16))
def test_any_size_is_bit_identical_for_a_small_model(height, width, seed):
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    resolution = from_processor(processor)
    image = _image(seed, height, width)
    assert torch.equal(_pixels(processor, [image]), _pixels(processor, [resize(image, resolution)]))


def test_scores_are_bit_identical_after_a_client_resize():
    """The whole reward, not only its pixels: clip_score and caption on tiny seeded models."""
    clip = ClipScore(clip=tiny_clip()[0], processor=tiny_clip()[1])
    captioner, processor = tiny_blip2()
    encoder = TextEncoderConfig(kind="sentence_transformers", source=MINILM)
    caption = Caption(CaptionConfig(max_new_tokens=4, text_encoder=encoder), captioner=captioner, processor=processor)
    images = [_image(i, h, w) for i, (h, w) in enumerate([(64, 64), (96, 160), (200, 120), (33, 40)])]
    prompts = ["a red cube", "two cats", "a beach", "a dog"]
    for reward in (clip, caption):
        reward.load("cpu")
        resolution = reward.info().input_resolution
        assert resolution is not None
        resized = [resize(x, resolution) for x in images]
        assert all(r.size < x.size for r, x in zip(resized, images, strict=True))
        full = reward.score(images, prompts)
        small = reward.score(resized, prompts)
        assert [o.reward for o in small] == [o.reward for o in full]
        assert [o.components for o in small] == [o.components for o in full]
        assert [o.caption for o in small] == [o.caption for o in full]


# Run in a fresh interpreter per dispatch level: torch reads ATEN_CPU_CAPABILITY once, at import.
_DIGEST = f"""
import hashlib, json
import numpy as np, torch
from services.resolution import InputResolution, local_implementation, resize
digest = hashlib.sha256()
for edge in ({{"shortest_edge": 224}}, {{"height": 384, "width": 384}}):
    resolution = InputResolution(implementation=local_implementation(), **edge)
    for i, (h, w) in enumerate({SIZES!r}):
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        digest.update(resize(image, resolution).tobytes())
print(json.dumps([torch.backends.cpu.get_cpu_capability(), digest.hexdigest()]))
"""


def test_the_resize_is_the_same_on_every_cpu_dispatch_level():
    """torch's uint8 antialiased bicubic is integer arithmetic: its generic kernel (any CPU) and its vectorised ones
    (AVX2; AVX512 where the CPU has it) give the same bytes. One fresh interpreter at the CPU's own level, and one per
    level below it (torch reads ATEN_CPU_CAPABILITY at import)."""
    levels = {"AVX512": ("default", "avx2"), "AVX2": ("default",)}.get(torch.backends.cpu.get_cpu_capability(), ())
    results = {}
    for level in (None, *levels):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if level is not None:
            env["ATEN_CPU_CAPABILITY"] = level
        out = subprocess.run(
            [sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, timeout=300, check=True
        )
        capability, digest = json.loads(out.stdout.strip().splitlines()[-1])
        results[capability] = digest
    assert len(results) == 1 + len(levels), results  # each level really ran
    assert len(set(results.values())) == 1, results

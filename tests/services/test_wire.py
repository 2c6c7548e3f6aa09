"""The hand-written wire format (services/wire.py) against protobuf's own: same bytes out, same pixels in."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.reward.v1 import reward_pb2
from services.client import RewardClient, frame_image_sample, make_sample
from services.wire import frame_sample, raw_data_views

texts = st.text(max_size=40)


@st.composite
def samples(draw) -> reward_pb2.Sample:
    """Samples of every shape the wire allows: raw (any sizes, data of any length), encoded, or no image."""
    sample = reward_pb2.Sample(id=draw(texts), prompt=draw(texts))
    kind = draw(st.sampled_from(["raw", "encoded", "none"]))
    if kind == "raw":
        sample.raw.height = draw(st.integers(0, 2**32 - 1))
        sample.raw.width = draw(st.integers(0, 300))
        sample.raw.data = draw(st.binary(max_size=300))
    elif kind == "encoded":
        sample.encoded = draw(st.binary(max_size=300))
    return sample


@settings(max_examples=300, deadline=None)
@given(samples())
def test_framed_samples_are_byte_identical_to_protobuf(sample):
    kind = sample.WhichOneof("image")
    if kind is None:
        return  # the client never sends a sample without an image
    if kind == "raw":
        raw = sample.raw
        framed = frame_sample(sample.id, sample.prompt, raw=(raw.height, raw.width, memoryview(raw.data)))
    else:
        framed = frame_sample(sample.id, sample.prompt, encoded=sample.encoded)
    assert b"".join(framed.parts) == sample.SerializeToString()
    assert framed.size == sample.ByteSize()


def test_the_client_frames_what_make_sample_builds(rng):
    image = rng.integers(0, 256, (17, 9, 3), dtype=np.uint8)
    for fmt in ("raw", "png"):
        framed = frame_image_sample("a", "two cats", image, fmt)
        assert b"".join(framed.parts) == make_sample("a", "two cats", image, fmt).SerializeToString()
    client = RewardClient("127.0.0.1:1", "x", discover_limits=False)
    images = [image, image.transpose(1, 0, 2)]  # the second is not C-contiguous: the client makes it so
    (request,), _, _ = client.plan(client.frame_samples(images, ["p", "q"]))
    assert request == reward_pb2.ScoreRequest(samples=client.make_samples(images, ["p", "q"])).SerializeToString()


@settings(max_examples=300, deadline=None)
@given(st.lists(samples(), max_size=5), st.dictionaries(texts, texts, max_size=2))
def test_raw_views_are_the_pixels_protobuf_parses(sample_list, options):
    data = reward_pb2.ScoreRequest(samples=sample_list, options=options).SerializeToString()
    views = raw_data_views(data)
    parsed = reward_pb2.ScoreRequest.FromString(data)
    assert views is not None and len(views) == len(parsed.samples)
    for sample, view in zip(parsed.samples, views, strict=True):
        if sample.WhichOneof("image") == "raw" and sample.raw.data:
            assert view is not None and bytes(view) == sample.raw.data
        elif view is not None:
            assert sample.WhichOneof("image") == "raw" and bytes(view) == sample.raw.data


@settings(max_examples=400, deadline=None)
@given(st.lists(samples(), min_size=1, max_size=3), st.data())
def test_a_view_of_mangled_bytes_is_never_other_than_protobufs_value(sample_list, data):
    """Cut, flipped, spliced or duplicated fields: where the walk gives a view, it equals what protobuf parsed."""
    wire = reward_pb2.ScoreRequest(samples=sample_list).SerializeToString()
    i = data.draw(st.integers(0, len(wire)))
    mutation = data.draw(st.sampled_from(["cut", "flip", "splice", "repeat"]))
    if mutation == "cut":
        wire = wire[:i]
    elif mutation == "flip" and i < len(wire):
        wire = wire[:i] + bytes([wire[i] ^ (1 << data.draw(st.integers(0, 7)))]) + wire[i + 1 :]
    elif mutation == "splice":
        wire = wire[:i] + data.draw(st.binary(min_size=1, max_size=16)) + wire[i:]
    else:  # a sample whose image field comes twice: protobuf merges the two raw images
        twice = reward_pb2.Sample(raw=reward_pb2.RawImage(height=1, width=1, data=b"abc"))
        twice_wire = twice.SerializeToString()
        wire += b"\x0a" + bytes([2 * len(twice_wire)]) + twice_wire * 2
    try:
        parsed = reward_pb2.ScoreRequest.FromString(wire)
    except Exception:
        return  # the replica rejects it before reading any pixel
    views = raw_data_views(wire)
    if views is None:
        return
    assert len(views) == len(parsed.samples)
    for sample, view in zip(parsed.samples, views, strict=True):
        if view is not None:
            assert sample.WhichOneof("image") == "raw" and bytes(view) == sample.raw.data

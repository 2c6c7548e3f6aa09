"""The protobuf wire format of `reward.v1.Sample`, by hand, for the one hot path: raw pixels in a ScoreRequest.

protobuf's Python runtime (upb) copies a bytes field each time it is read and computes `ByteSize()` by serializing
the message. For a request of 32 raw 512x512 images (25 MB) that is a full copy of the pixels per access, on both
sides of the wire (measured in benchmarks/README.md, "Where the served path's CPU goes"). So:

- the client writes each sample's wire bytes itself (`frame_sample`): a small header, then the pixel buffer, joined
  once into the request. The bytes are exactly what `Sample.SerializeToString()` gives (tests/services/test_wire.py);
- the replica still parses every request with protobuf, the parser of record, and reads the pixels of each raw
  image through `raw_data_views`: memoryviews into the request bytes, no copy. Where the layout is anything but
  plain (a field repeated, a group, bytes that do not walk) it gives None and the caller reads protobuf's copy, so a
  view is always the value protobuf parsed.

Field numbers are those of protos/reward/v1/reward.proto.
"""

from __future__ import annotations

from dataclasses import dataclass

# Wire types.
VARINT, I64, LEN, I32 = 0, 1, 2, 5
# ScoreRequest.samples = 1; Sample: id = 1, prompt = 2, encoded = 3, raw = 4, shared_memory = 5; RawImage:
# height = 1, width = 2, data = 3; SharedMemoryImage: segment = 1, offset = 2, height = 3, width = 4.
REQUEST_SAMPLES = 1
SAMPLE_ID, SAMPLE_PROMPT, SAMPLE_ENCODED, SAMPLE_RAW, SAMPLE_SHARED_MEMORY = 1, 2, 3, 4, 5
RAW_HEIGHT, RAW_WIDTH, RAW_DATA = 1, 2, 3
SHM_SEGMENT, SHM_OFFSET, SHM_HEIGHT, SHM_WIDTH = 1, 2, 3, 4


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def _len_field(field: int, size: int) -> bytes:
    """Tag and length prefix of a length-delimited field of `size` bytes."""
    return tag(field, LEN) + varint(size)


@dataclass(frozen=True)
class FramedSample:
    """One `reward.v1.Sample` in wire form: `parts` joined are its serialized bytes (`size` of them)."""

    id: str
    parts: tuple[bytes | memoryview, ...]
    size: int
    # For a raw image: the sample's prompt and its (height, width, pixel buffer), so a client can send the same
    # sample in shared memory instead (`frame_sample(shared_memory=...)`).
    prompt: str = ""
    raw: tuple[int, int, memoryview] | None = None

    def framed(self) -> list[bytes | memoryview]:
        """The parts of `ScoreRequest.samples` entry: field tag, length, then the sample's bytes."""
        return [_len_field(REQUEST_SAMPLES, self.size), *self.parts]


def frame_sample(
    sample_id: str,
    prompt: str,
    *,
    raw: tuple[int, int, memoryview] | None = None,
    encoded: bytes | None = None,
    shared_memory: tuple[str, int, int, int] | None = None,
) -> FramedSample:
    """The wire form of a Sample with a raw image (height, width, pixel buffer), encoded bytes, or a shared-memory
    image (segment, offset, height, width).

    Canonical proto3 encoding, as `SerializeToString` writes it: fields in number order, empty strings and zero
    numbers left out, the oneof's field written even when empty. The pixel buffer is referenced, not copied.
    """
    if sum(x is not None for x in (raw, encoded, shared_memory)) != 1:
        raise ValueError("frame_sample takes exactly one of raw=, encoded= and shared_memory=")
    head = bytearray()
    for field, text in ((SAMPLE_ID, sample_id), (SAMPLE_PROMPT, prompt)):
        if text:
            data = text.encode("utf-8")
            head += _len_field(field, len(data)) + data
    if encoded is not None:
        head += _len_field(SAMPLE_ENCODED, len(encoded))
        return FramedSample(sample_id, (bytes(head), encoded), len(head) + len(encoded))
    if shared_memory is not None:
        segment, offset, height, width = shared_memory
        inner = bytearray()
        if segment:
            name = segment.encode("utf-8")
            inner += _len_field(SHM_SEGMENT, len(name)) + name
        for field, value in ((SHM_OFFSET, offset), (SHM_HEIGHT, height), (SHM_WIDTH, width)):
            if value:
                inner += tag(field, VARINT) + varint(value)
        head += _len_field(SAMPLE_SHARED_MEMORY, len(inner)) + inner
        return FramedSample(sample_id, (bytes(head),), len(head))
    height, width, pixels = raw
    pixels = memoryview(pixels).cast("B")
    inner = bytearray()
    for field, value in ((RAW_HEIGHT, height), (RAW_WIDTH, width)):
        if value:
            inner += tag(field, VARINT) + varint(value)
    if len(pixels):
        inner += _len_field(RAW_DATA, len(pixels))
    head += _len_field(SAMPLE_RAW, len(inner) + len(pixels)) + inner
    return FramedSample(sample_id, (bytes(head), pixels), len(head) + len(pixels), prompt, (height, width, pixels))


class _Malformed(Exception):
    pass


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int):
    """(field number, wire type, value start, value end) of each field in buf[pos:end]; varints are skipped over."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            start = pos
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == LEN:
            size, start = _read_varint(buf, pos, end)
            pos = start + size
        elif wire_type in (I64, I32):
            start = pos
            pos += 8 if wire_type == I64 else 4
        else:  # groups (deprecated, never in this API) and invalid types
            raise _Malformed
        if pos > end or field == 0:
            raise _Malformed
        yield field, wire_type, start, pos


def raw_data_views(request: bytes) -> list[memoryview | None] | None:
    """For each sample of a serialized ScoreRequest, in order: a view of its raw image's pixel bytes, or None.

    None for a sample whose image is encoded or missing, or whose layout is not plain: the image field, or the
    raw image's data field, given more than once (protobuf merges those; its parsed value is then the one to use).
    Returns None as a whole for bytes that do not walk as a message: protobuf has the last word on those.
    """
    buf = memoryview(request)
    views: list[memoryview | None] = []
    try:
        for field, wire_type, start, end in _fields(buf, 0, len(buf)):
            if field != REQUEST_SAMPLES:
                continue
            if wire_type != LEN:
                return None
            views.append(_sample_view(buf, start, end))
    except _Malformed:
        return None
    return views


def _sample_view(buf: memoryview, start: int, end: int) -> memoryview | None:
    images = [(f, s, e) for f, w, s, e in _fields(buf, start, end) if f in (SAMPLE_ENCODED, SAMPLE_RAW) and w == LEN]
    if len(images) != 1 or images[0][0] != SAMPLE_RAW:
        return None
    _, raw_start, raw_end = images[0]
    data = [(s, e) for f, w, s, e in _fields(buf, raw_start, raw_end) if f == RAW_DATA and w == LEN]
    if len(data) != 1:
        return None
    return buf[data[0][0] : data[0][1]]

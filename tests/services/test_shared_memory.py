"""Shared-memory images: the client's segment pool and the replica's read-only views (services/shared_memory.py)."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from protos.reward.v1 import reward_pb2
from services.admission import decode_samples
from services.codec import ImageError
from services.shared_memory import SHM_DIR, SegmentPool, SegmentReader, aligned, host_identity, write_pixels
from services.wire import frame_sample


@pytest.fixture
def pool():
    pool = SegmentPool()
    yield pool
    pool.close()


def _write(pool, images):
    """One segment holding `images` back to back at aligned offsets; (segment, offsets)."""
    segment = pool.lease(sum(aligned(img.nbytes) for img in images))
    offsets, offset = [], 0
    for img in images:
        write_pixels(segment, offset, memoryview(img).cast("B"))
        offsets.append(offset)
        offset += aligned(img.nbytes)
    return segment, offsets


def test_the_replica_views_the_clients_pixels_without_copying_and_sees_rewrites(pool, rng):
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (16, 16), (1, 1))]
    segment, offsets = _write(pool, images)
    reader = SegmentReader()
    views = [reader.pixels(segment.name, o, *img.shape[:2], 10**6) for img, o in zip(images, offsets, strict=True)]
    for view, img in zip(views, images, strict=True):
        assert view.shape == img.shape and view.dtype == np.uint8 and np.array_equal(view, img)
        assert not view.flags.writeable  # mapped read-only: a reward cannot write into a client's memory
    assert len(reader) == 1  # one mapping for the segment, whatever the number of images in it
    # A view is the segment itself: the client's next request in the same segment is what the replica reads next.
    fresh = np.full_like(images[1], 9)
    write_pixels(segment, offsets[1], memoryview(fresh).cast("B"))
    assert np.array_equal(views[1], fresh)


@pytest.mark.parametrize(
    "name",
    ["", "../rewardfleet_x", "rewardfleet_/../etc/passwd", "psm_0123", "rewardfleet_", "rewardfleet_a b", "x" * 300],
)
def test_only_rewardfleet_segments_are_opened(name):
    with pytest.raises(ImageError) as err:
        SegmentReader().pixels(name, 0, 1, 1, 10**6)
    assert err.value.code == "INVALID_IMAGE" and "not allowed" in err.value.message


def test_bounds_sizes_and_missing_segments_are_per_sample_errors(pool, rng):
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    segment, _ = _write(pool, [image])
    reader = SegmentReader()
    cases = {
        "past the end": ((segment.name, segment.size - 10, 8, 8, 10**6), "INVALID_IMAGE", "needs"),
        "zero height": ((segment.name, 0, 0, 8, 10**6), "INVALID_IMAGE", "positive"),
        "over the pixel limit": ((segment.name, 0, 8, 8, 63), "IMAGE_TOO_LARGE", "limit"),
        "gone": (("rewardfleet_never_made", 0, 1, 1, 10**6), "SHARED_MEMORY_UNAVAILABLE", "does not exist"),
    }
    for what, (args, code, words) in cases.items():
        with pytest.raises(ImageError) as err:
            reader.pixels(*args)
        assert (err.value.code, words in err.value.message) == (code, True), what
    assert np.array_equal(reader.pixels(segment.name, 0, 8, 8, 10**6), image)  # the reader still works


def test_a_link_named_like_a_segment_is_not_followed(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 4096)
    link = SHM_DIR / f"rewardfleet_link_{os.getpid()}"
    link.symlink_to(target)
    try:
        with pytest.raises(ImageError) as err:
            SegmentReader().pixels(link.name, 0, 8, 8, 10**6)
        assert err.value.code == "SHARED_MEMORY_UNAVAILABLE"
    finally:
        link.unlink()


def test_a_segment_replaced_under_the_same_name_is_mapped_again_and_unlinked_ones_are_dropped(rng):
    name = f"rewardfleet_test_{os.getpid()}"
    path = SHM_DIR / name
    first, second = (rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(2))
    reader = SegmentReader()
    try:
        path.write_bytes(first.tobytes())
        assert np.array_equal(reader.pixels(name, 0, 4, 4, 10**6), first)
        path.unlink()  # the client made a new segment with the same name: another inode, and another size
        path.write_bytes(second.tobytes() + b"\0" * 64)
        assert np.array_equal(reader.pixels(name, 0, 4, 4, 10**6), second)
        path.unlink()
        with pytest.raises(ImageError) as err:
            reader.pixels(name, 0, 4, 4, 10**6)
        assert err.value.code == "SHARED_MEMORY_UNAVAILABLE" and len(reader) == 0
    finally:
        path.unlink(missing_ok=True)


def test_mappings_of_segments_that_went_away_are_dropped_when_a_new_one_arrives(pool, rng):
    image = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    reader = SegmentReader(max_segments=3)
    pools = [SegmentPool() for _ in range(5)]
    for p in pools:
        segment, _ = _write(p, [image])
        reader.pixels(segment.name, 0, 4, 4, 10**6)
        assert len(reader) <= 3  # at most max_segments mappings
        p.release([segment])
    for p in pools[:-1]:
        p.close()  # unlinked by their clients
    segment, _ = _write(pool, [image])
    reader.pixels(segment.name, 0, 4, 4, 10**6)
    assert len(reader) == 2  # the new one and pools[-1]'s: the unlinked ones were dropped
    pools[-1].close()


def test_the_pool_reuses_released_segments_and_close_unlinks_them():
    pool = SegmentPool(keep=2)
    a = pool.lease(100)
    pool.release([a])
    b = pool.lease(50)
    assert b is a and pool.created == 1  # reused: big enough, and free
    c = pool.lease(3 << 20)  # larger than any free segment: a new one, in whole MiB
    assert c.size == 3 << 20 and pool.created == 2
    d = pool.lease(10)  # a and c are leased: a third
    pool.release([b, c, d])
    names = [s.name for s in (b, c, d)]
    assert sum((SHM_DIR / n).exists() for n in names) == 2  # keeps 2 free: the third was unlinked
    leased = pool.lease(10)
    pool.close()  # unlinks the free ones and the leased one too
    assert not any((SHM_DIR / n).exists() for n in [*names, leased.name])
    pool.release([leased])


def test_host_identity_is_the_same_for_this_process_and_names_the_kernel():
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert host_identity() == host_identity() and host_identity().startswith(boot_id + ":")


def test_decoding_a_request_of_shared_memory_samples(pool, rng):
    image = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    segment, (offset,) = _write(pool, [image])
    ok = reward_pb2.Sample(
        prompt="p", shared_memory=reward_pb2.SharedMemoryImage(segment=segment.name, offset=offset, height=6, width=6)
    )
    wire = b"".join(frame_sample("", "p", shared_memory=(segment.name, offset, 6, 6)).parts)
    assert wire == ok.SerializeToString()
    bad = reward_pb2.Sample(prompt="p", shared_memory=reward_pb2.SharedMemoryImage(segment="../x", height=6, width=6))
    (image_ok, prompt), failure = decode_samples([ok, bad], 10**6, 100, None, SegmentReader())
    assert np.array_equal(image_ok, image) and prompt == "p" and failure.code == "INVALID_IMAGE"
    # An application with `shared_memory: false` reads none, and says what to do instead.
    (refused,) = decode_samples([ok], 10**6, 100)
    assert refused.code == "SHARED_MEMORY_UNAVAILABLE" and "send the pixels in the request" in refused.message


def test_a_segment_larger_than_what_dev_shm_has_left_fails_at_once_and_leaves_nothing():
    """Its pages are allocated when it is made: ENOSPC now, not a SIGBUS when the client writes the pixels."""
    st = os.statvfs(SHM_DIR)
    before = set(os.listdir(SHM_DIR))
    pool = SegmentPool()
    with pytest.raises(OSError) as err:
        pool.lease(st.f_bavail * st.f_frsize + (1 << 30))
    assert err.value.errno == errno.ENOSPC and set(os.listdir(SHM_DIR)) == before and pool.created == 0


def test_any_reference_is_the_segments_bytes_or_an_image_error(rng):
    """hypothesis: whatever (name, offset, height, width) a request carries, the reader returns exactly the bytes at
    that place of a real segment, or raises ImageError with a wire error code; never anything else."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    pool = SegmentPool()
    segment = pool.lease(1)
    data = rng.integers(0, 256, segment.size, dtype=np.uint8)
    write_pixels(segment, 0, memoryview(data))
    reader = SegmentReader()
    names = st.one_of(st.just(segment.name), st.text(max_size=40), st.just("rewardfleet_missing"))
    sizes = st.one_of(st.integers(0, 700), st.integers(0, 2**32 - 1))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(name=names, offset=st.one_of(st.integers(0, segment.size), st.integers(0, 2**64 - 1)), h=sizes, w=sizes)
    def check(name, offset, h, w):
        try:
            view = reader.pixels(name, offset, h, w, 1 << 20)
        except ImageError as e:
            assert e.code in {"INVALID_IMAGE", "IMAGE_TOO_LARGE", "SHARED_MEMORY_UNAVAILABLE"} and e.message
            return
        assert name == segment.name and view.shape == (h, w, 3)
        assert np.array_equal(view.reshape(-1), data[offset : offset + h * w * 3])

    try:
        check()
    finally:
        pool.release([segment])
        pool.close()

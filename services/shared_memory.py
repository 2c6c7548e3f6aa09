"""Raw pixels in POSIX shared memory: the transport for a client on the replica's host.

A request of 32 raw 512x512 images is 25 MB, and gRPC copies it several times inside its C core on each side: the
receive alone costs a replica about as much CPU as the JPEG reward itself (benchmarks/README.md, "rewardfleet
against plain reward servers"). A client on the replica's host (a trainer beside its fleet) need not send the pixels
at all. With `RewardClient(shared_memory=True)` it writes each request's pixels once into a segment of its own
(`SegmentPool`) and sends where they are (`reward.v1.SharedMemoryImage`: segment, offset, height, width); the
replica maps the segment read-only and views the pixels in place (`SegmentReader`), as Triton's system
shared-memory extension does for its clients.

- The replica opens only segments named `rewardfleet_...` (letters, digits, "_", "-", "."), read-only, from
  /dev/shm: a request cannot make it read or write anything else.
- Which host: `host_identity()` is the kernel's boot id and the device of /dev/shm, so two containers on one kernel
  with separate /dev/shm mounts differ. Describe reports the replica's (`shared_memory_host`); the client uses
  shared memory only when its own is the same, and resends in the request any sample a replica answers with
  SHARED_MEMORY_UNAVAILABLE (a replica on another node behind the same proxy).
- The client owns its segments: it rewrites one only after the request that used it has been answered, and unlinks
  them on `close()` (Python's resource tracker unlinks those of a client that dies). A new segment's pages are
  allocated when it is made, so a full /dev/shm is an error the client handles (it sends pixels in the request),
  not a SIGBUS when it writes.
- The replica keeps a mapping per segment, so a segment reused for every request is mapped, and its pages faulted
  in, once. A name whose file is gone or was replaced (another inode or size) is mapped again; mappings of segments
  that no longer exist are dropped whenever a new name arrives, and at most `max_segments` are kept.

Linux only (/dev/shm); elsewhere `host_identity()` is "" and clients send pixels in the request.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from services.codec import ImageError, check_image_size

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "rewardfleet_"
_SEGMENT_NAME = re.compile(r"rewardfleet_[A-Za-z0-9_.\-]{1,200}")
# Each image starts on a 64-byte boundary in its segment (a cache line).
ALIGNMENT = 64


def host_identity() -> str:
    """Who can read this process's /dev/shm: "<boot id>:<device of /dev/shm>", or "" without one."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        device = SHM_DIR.stat().st_dev
    except OSError:
        return ""
    return f"{boot_id}:{device}"


def aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class SegmentReader:
    """The replica's side: (H, W, 3) uint8 read-only views of pixels in clients' segments (thread-safe)."""

    def __init__(self, max_segments: int = 32):
        self.max_segments = max_segments
        # name -> (inode, size, read-only mapping); most recently used last.
        self._maps: OrderedDict[str, tuple[int, int, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()

    def pixels(self, segment: str, offset: int, height: int, width: int, max_pixels: int) -> np.ndarray:
        """The image at `offset` of `segment`; ImageError (INVALID_IMAGE, IMAGE_TOO_LARGE or
        SHARED_MEMORY_UNAVAILABLE) for anything else."""
        if not _SEGMENT_NAME.fullmatch(segment):
            raise ImageError(
                "INVALID_IMAGE",
                f"shared-memory segment name {segment[:80]!r} is not allowed: it must start with "
                f"{SEGMENT_PREFIX!r} and use only letters, digits, '_', '-' and '.'",
            )
        check_image_size(height, width, max_pixels)
        nbytes = height * width * 3
        mapping = self._mapping(segment)
        if offset + nbytes > len(mapping):
            raise ImageError(
                "INVALID_IMAGE",
                f"shared-memory image {height}x{width} at offset {offset} needs {offset + nbytes} bytes; segment "
                f"{segment!r} has {len(mapping)}",
            )
        # A view into the mapping, no copy; the mapping lives as long as any view of it.
        return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset).reshape(height, width, 3)

    def _mapping(self, segment: str) -> mmap.mmap:
        path = SHM_DIR / segment
        with self._lock:
            try:
                st = path.lstat()  # a link is not followed: only a segment itself is read
                if not stat.S_ISREG(st.st_mode):
                    raise OSError
            except OSError:
                self._maps.pop(segment, None)
                raise ImageError(
                    "SHARED_MEMORY_UNAVAILABLE",
                    f"shared-memory segment {segment!r} does not exist on this replica's host "
                    f"({host_identity() or 'no /dev/shm'}); send the pixels in the request",
                ) from None
            cached = self._maps.get(segment)
            if cached is not None and cached[:2] == (st.st_ino, st.st_size):
                self._maps.move_to_end(segment)
                return cached[2]
            self._forget_stale()
            if st.st_size == 0:
                raise ImageError("INVALID_IMAGE", f"shared-memory segment {segment!r} is empty")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    mapping = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
            except OSError as e:
                raise ImageError(
                    "SHARED_MEMORY_UNAVAILABLE", f"cannot map shared-memory segment {segment!r}: {e.strerror}"
                ) from None
            self._maps[segment] = (st.st_ino, st.st_size, mapping)
            while len(self._maps) > self.max_segments:
                self._maps.popitem(last=False)
            return mapping

    def _forget_stale(self) -> None:
        """Drops the mappings of segments that were unlinked or replaced (called with the lock held)."""
        for name, (inode, size, _) in list(self._maps.items()):
            try:
                st = (SHM_DIR / name).lstat()
                if (st.st_ino, st.st_size) == (inode, size):
                    continue
            except OSError:
                pass
            del self._maps[name]  # views still in use keep their mapping alive until they go

    def __len__(self) -> int:
        return len(self._maps)


class SegmentPool:
    """The client's side: segments it writes requests' pixels into, leased per request and reused (thread-safe)."""

    def __init__(self, keep: int = 8):
        # Free segments kept for reuse; more than this are unlinked when released.
        self.keep = keep
        self._free: list[shared_memory.SharedMemory] = []
        self._leased: dict[str, shared_memory.SharedMemory] = {}
        self._lock = threading.Lock()
        self.created = 0

    def lease(self, nbytes: int) -> shared_memory.SharedMemory:
        """A segment of at least `nbytes` that no other request is using; OSError (ENOSPC) when /dev/shm is full."""
        with self._lock:
            fitting = [s for s in self._free if s.size >= nbytes]
            if fitting:
                segment = min(fitting, key=lambda s: s.size)
                self._free.remove(segment)
            else:
                size = max(1, -(-nbytes // (1 << 20))) << 20  # whole MiB, so similar requests fit later
                name = f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(8)}"
                segment = shared_memory.SharedMemory(name=name, create=True, size=size)
                try:
                    _reserve(segment.name, size)
                except OSError:
                    _destroy(segment)
                    raise
                self.created += 1
            self._leased[segment.name] = segment
            return segment

    def release(self, segments: list[shared_memory.SharedMemory]) -> None:
        """Returns leased segments: their requests have been answered (or given up on)."""
        with self._lock:
            for segment in segments:
                self._leased.pop(segment.name, None)
                self._free.append(segment)
            self._free.sort(key=lambda s: s.size, reverse=True)
            while len(self._free) > self.keep:
                _destroy(self._free.pop())

    def close(self) -> None:
        """Unlinks every segment; leased ones stay mapped here until they are released."""
        with self._lock:
            self.keep = 0
            while self._free:
                _destroy(self._free.pop())
            for segment in self._leased.values():
                _unlink(segment)


def _reserve(name: str, size: int) -> None:
    """Allocates a new segment's pages now. A segment is sparse until written, and writing past what /dev/shm has
    left (Docker's default is 64 MB) kills the writer with SIGBUS; fallocate fails with ENOSPC instead."""
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def _destroy(segment: shared_memory.SharedMemory) -> None:
    segment.close()
    _unlink(segment)


def _unlink(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.unlink()
    except FileNotFoundError:  # unlinked already (`close` while it was leased)
        pass


def write_pixels(segment: shared_memory.SharedMemory, offset: int, pixels: memoryview) -> None:
    """Copies an image's pixel bytes into `segment` at `offset` (one memcpy)."""
    segment.buf[offset : offset + len(pixels)] = pixels

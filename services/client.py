"""The fleet's gRPC client, used by the CLI and the trainer.

    client = RewardClient("127.0.0.1:9000", "jpeg_compressibility")
    results = client.score(images, prompts)          # or: await client.ascore(images, prompts)

- Images may be numpy arrays or torch tensors ((H, W, 3) or (3, H, W), uint8 or float in [0, 1]; a 4-D batch is
  split along its first axis), PIL images, or already-encoded PNG/JPEG/WebP bytes. Arrays travel raw by default: no
  codec on the hot path.
- Big batches are split into requests under the server's limits (learnt once from `Describe`), several requests
  are kept in flight, and calls that fail with UNAVAILABLE or RESOURCE_EXHAUSTED, or INTERNAL because the replica
  died under the request, are retried with jittered exponential backoff (`services.retries`: one policy for the sync
  and the async API).
- `token=` sends `authorization: Bearer <token>` for applications that require one (`auth_token_env`).
- `resize_to_input=True` resizes images on the client as the reward would (to the `input_resolution` its `Describe`
  declares, e.g. 512 x 512 to 224 x 224 for CLIP rewards), when that makes them smaller: fewer bytes on the wire,
  scores bit-identical (`services.resolution`). Only raw and PNG transports, and only where the reward declares one
  and this process has the server's torch and torchvision versions; otherwise images go at full size.
- `shared_memory=True`, for a client on the fleet's host: raw pixels are written once into shared-memory segments
  this client owns, and requests carry only where they are (`services.shared_memory`); the replica maps them. Used
  only when the replica answering Describe is on this host; a sample a replica cannot read (another node behind the
  same proxy) is resent with its pixels in the request, and the client sends that way from then on.
- Results come back one per sample, in input order: scored, or with the sample's error. A sample too large to send
  at all gets a NOT_SENT error. A call that still fails after its retries raises `RewardServiceError`: the caller
  never sees a silent zero.

Importing this module is cheap (grpc, tenacity, numpy, PIL; no torch: `resize_to_input` imports it when used).
"""

from __future__ import annotations

import asyncio
import math
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import tenacity

from protos.reward.v1 import reward_pb2
from services.codec import encode_image, to_hwc_uint8
from services.resolution import InputResolution, local_implementation, resize
from services.retries import retry_policy
from services.reward import SegmentScore
from services.shared_memory import SegmentPool, aligned, host_identity, write_pixels
from services.wire import FramedSample, frame_sample

_SCORE_METHOD = "/reward.v1.RewardService/Score"
_DESCRIBE_METHOD = "/reward.v1.RewardService/Describe"


class RewardServiceError(RuntimeError):
    """A Score/Describe call that failed for good (after retries, or with a non-retryable status)."""

    def __init__(self, application: str, code: grpc.StatusCode | None, details: str):
        # The status code's name, or PROTOCOL for a response that breaks the contract (wrong result count).
        self.status = code.name if code is not None else "PROTOCOL"
        super().__init__(f"reward application {application!r}: {self.status}: {details}")
        self.application = application
        self.code = code
        self.details = details


@dataclass
class SampleResult:
    """The Python form of the wire's `reward.v1.SampleResult`: the score of one sample, or why it has none."""

    id: str
    # NaN when `error_code` is set.
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    caption: str | None = None
    segments: list[SegmentScore] = field(default_factory=list)
    # A `reward.v1.ErrorCode` name, or None when the sample was scored.
    error_code: str | None = None
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @classmethod
    def from_proto(cls, r: reward_pb2.SampleResult) -> SampleResult:
        error = r.error if r.HasField("error") else None
        return cls(
            id=r.id,
            reward=r.reward,
            components=dict(r.components),
            caption=r.caption if r.HasField("caption") else None,
            segments=[SegmentScore(s.label, s.area_fraction, s.label_confidence, s.likelihood) for s in r.segments],
            error_code=reward_pb2.ErrorCode.Name(error.code) if error is not None else None,
            error_message=error.message if error is not None else "",
        )


@dataclass
class ClientStats:
    """Counters since the client was made (for tests, benchmarks and the trainer's logs)."""

    # Score calls made, retries included.
    requests: int = 0
    # Calls retried (see `services.retries.is_retryable`).
    retries: int = 0
    samples: int = 0
    # Images resized on the client before sending (`resize_to_input`).
    resized: int = 0
    # Images sent in shared memory (`shared_memory`), and those a replica could not read, resent in the request.
    shared_memory: int = 0
    shared_memory_resent: int = 0


def _split_images(images: Any) -> list[Any]:
    """A list of single images; a 4-D array/tensor batch is split along its first axis."""
    if hasattr(images, "ndim") and images.ndim == 4:
        return [images[i] for i in range(images.shape[0])]
    return list(images)


def make_sample(sample_id: str, prompt: str, image: Any, image_format: str = "raw") -> reward_pb2.Sample:
    """A `reward.v1.Sample`; bytes are sent as encoded, anything else as raw pixels or encoded as `image_format`."""
    if isinstance(image, bytes | bytearray | memoryview):
        return reward_pb2.Sample(id=sample_id, prompt=prompt, encoded=bytes(image))
    array = to_hwc_uint8(image)  # (H, W, 3) uint8
    if image_format == "raw":
        height, width, _ = array.shape
        raw = reward_pb2.RawImage(height=height, width=width, data=array.tobytes())
        return reward_pb2.Sample(id=sample_id, prompt=prompt, raw=raw)
    return reward_pb2.Sample(id=sample_id, prompt=prompt, encoded=encode_image(array, image_format))


def frame_image_sample(sample_id: str, prompt: str, image: Any, image_format: str = "raw") -> FramedSample:
    """`make_sample`'s Sample in wire form (`services.wire`): the same bytes, with the pixels referenced, not copied
    three times over (array to bytes, into the message, out of it)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return frame_sample(sample_id, prompt, encoded=bytes(image))
    array = to_hwc_uint8(image)  # (H, W, 3) uint8, C-contiguous
    if image_format == "raw":
        height, width, _ = array.shape
        return frame_sample(sample_id, prompt, raw=(height, width, memoryview(array).cast("B")))
    return frame_sample(sample_id, prompt, encoded=encode_image(array, image_format))


def _framed(sample: reward_pb2.Sample | FramedSample) -> FramedSample:
    if isinstance(sample, FramedSample):
        return sample
    body = sample.SerializeToString()
    return FramedSample(sample.id, (body,), len(body))


def _wire_parts(samples: Sequence[FramedSample]) -> list[bytes | memoryview]:
    """The parts of a ScoreRequest's bytes holding `samples` as they were framed (pixels inside)."""
    return [part for sample in samples for part in sample.framed()]


class RewardClient:
    """Client of one reward application of the fleet (see the module docstring)."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        application: str = "jpeg_compressibility",
        *,
        max_samples_per_request: int = 32,
        max_request_bytes: int = 64 * 1024 * 1024,
        max_in_flight: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        image_format: str = "raw",
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        discover_limits: bool = True,
        channel_options: Sequence[tuple[str, Any]] = (),
        resize_to_input: bool = False,
        shared_memory: bool = False,
    ):
        if max_samples_per_request < 1 or max_in_flight < 1 or max_request_bytes < 1:
            raise ValueError("max_samples_per_request, max_request_bytes and max_in_flight must be >= 1")
        if image_format not in ("raw", "png", "jpeg", "webp"):
            raise ValueError(f"image_format must be raw, png, jpeg or webp, got {image_format!r}")
        if shared_memory and image_format != "raw":
            raise ValueError(f"shared_memory passes raw pixels: it needs image_format='raw', got {image_format!r}")
        self.target = target
        self.application = application
        # Our request limits (the server's apply as well), requests kept in flight, and each call's deadline.
        self.max_samples_per_request = max_samples_per_request
        self.max_request_bytes = max_request_bytes
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        # tenacity's arguments for every call, sync and async; each retry counts in `stats.retries`.
        self.retry_policy = retry_policy(max_retries, backoff_s, max_backoff_s, on_retry=self._count_retry)
        self.image_format = image_format
        # Ask the server (Describe, once) for its limits and stay under them as well as under ours.
        self.discover_limits = discover_limits
        self._server_limits: tuple[int, int] | None = None
        # Resize as the reward does before sending (module docstring); the resolution comes from Describe.
        self.resize_to_input = resize_to_input
        self.input_resolution: InputResolution | None = None
        self._described = False
        # Raw pixels in shared memory (module docstring): asked for, and on once Describe shows the replica's host is
        # this one. Segments are leased per request from the pool and reused.
        self.shared_memory = shared_memory
        self._shared_memory_on = False
        self._segments = SegmentPool(keep=max_in_flight + 1)
        # TLS (e.g. grpc.ssl_channel_credentials()) when the fleet is behind a TLS-terminating proxy; None: plaintext.
        self.credentials = credentials
        # The fleet's shared token, for applications served with `auth_token_env`.
        auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.metadata = (("application", application), *auth, *tuple(metadata))
        self.stats = ClientStats()
        # Extra gRPC channel arguments (`channel_options`), e.g. ("grpc.lb_policy_name", "round_robin") to spread
        # calls over every proxy a DNS name resolves to; by default channels of one process share connections.
        self._options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            *channel_options,
        ]
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: dict[str, Any] | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Event loop id -> (loop, aio channel, stub).
        self._aio: dict[int, tuple[Any, grpc.aio.Channel, dict[str, Any]]] = {}

    # --- building requests --------------------------------------------------------------------------------------

    def _inputs(self, images: Any, prompts: str | Sequence[str], ids: Sequence[str] | None) -> list[tuple]:
        """(id, prompt, image) per image; `prompts` is one prompt for all or one per image; ids default to "0", ..."""
        images = _split_images(images)
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if ids is None:
            ids = [str(i) for i in range(len(images))]
        if len(ids) != len(images):
            raise ValueError(f"got {len(images)} images but {len(ids)} ids")
        return list(zip(ids, prompts, images, strict=True))

    def _resized(self, image: Any) -> Any:
        """`image` resized to the reward's input resolution where `resize_to_input` applies, else as given."""
        resolution = self.input_resolution
        # JPEG/WebP would re-encode lossily: the server's pixels would not be the resized ones.
        lossless = self.image_format in ("raw", "png")
        if resolution is None or not lossless or isinstance(image, bytes | bytearray | memoryview):
            return image
        array = to_hwc_uint8(image)  # (H, W, 3) uint8
        out = resize(array, resolution)
        self.stats.resized += out is not array
        return out

    def make_samples(
        self, images: Any, prompts: str | Sequence[str], ids: Sequence[str] | None = None
    ) -> list[reward_pb2.Sample]:
        """`reward.v1.Sample` messages for `images` (see `_inputs`), for callers that build requests themselves;
        resized with `resize_to_input` once the client knows the reward's resolution (`describe`)."""
        return [
            make_sample(i, p, self._resized(x), self.image_format) for i, p, x in self._inputs(images, prompts, ids)
        ]

    def frame_samples(
        self, images: Any, prompts: str | Sequence[str], ids: Sequence[str] | None = None
    ) -> list[FramedSample]:
        """The samples `score` sends, in wire form (`services.wire`); `score_samples` takes them as they are."""
        return [
            frame_image_sample(i, p, self._resized(x), self.image_format)
            for i, p, x in self._inputs(images, prompts, ids)
        ]

    def plan(
        self, samples: Sequence[reward_pb2.Sample | FramedSample], segments: list | None = None
    ) -> tuple[list[bytes], list[int], list[Any]]:
        """Splits samples into serialized requests under the limits, keeping order.

        Requests are framed from each sample's wire bytes (`repeated Sample samples = 1`): the pixels are copied
        once, into the request. A sample's size is its serialized size, what the server's byte limit counts.
        Returns the request bytes, the sample count of each request, and a slot per sample: the index of its
        request, or a `SampleResult` with a NOT_SENT error for a sample larger than the byte limit on its own.

        With `segments` (a list), raw pixels go in shared memory instead: each request's are copied once into a
        segment leased from the client's pool, appended to `segments`, which the caller releases
        (`_segments.release`) once the requests are answered. Requests split as they would with the pixels inside.
        """
        max_samples, max_bytes = self.max_samples_per_request, self.max_request_bytes
        if self._server_limits is not None:
            max_samples, max_bytes = min(max_samples, self._server_limits[0]), min(max_bytes, self._server_limits[1])
        requests: list[bytes] = []
        counts: list[int] = []
        slots: list[Any] = []
        current: list[FramedSample] = []
        current_bytes = 0

        def flush():
            if segments is None:
                requests.append(b"".join(_wire_parts(current)))
            else:
                requests.append(b"".join(self._in_shared_memory(current, segments)))
            counts.append(len(current))

        for s in map(_framed, samples):
            size = s.size
            if size > max_bytes:
                slots.append(
                    SampleResult(
                        id=s.id,
                        reward=math.nan,
                        error_code="NOT_SENT",
                        error_message=f"sample of {size} bytes exceeds the request limit of {max_bytes} bytes",
                    )
                )
                continue
            if current and (len(current) >= max_samples or current_bytes + size > max_bytes):
                flush()
                current, current_bytes = [], 0
            current.append(s)
            current_bytes += size
            slots.append(len(requests))
        if current:
            flush()
        return requests, counts, slots

    def _in_shared_memory(self, samples: list[FramedSample], segments: list) -> list[bytes | memoryview]:
        """The wire parts of one request whose raw images are in a leased segment (the others as they are)."""
        raws = [s for s in samples if s.raw is not None]
        if not raws:
            return _wire_parts(samples)
        try:
            segment = self._segments.lease(sum(aligned(len(s.raw[2])) for s in raws))
        except OSError as e:  # /dev/shm is full (ENOSPC): this request carries its pixels, and so do later ones
            self._shared_memory_on = False
            warnings.warn(
                f"{self.application}: no shared memory for a request ({e}); sending pixels in requests", stacklevel=4
            )
            return _wire_parts(samples)
        segments.append(segment)
        parts: list[bytes | memoryview] = []
        offset = 0
        for s in samples:
            if s.raw is None:
                parts += s.framed()
                continue
            height, width, pixels = s.raw
            write_pixels(segment, offset, pixels)
            parts += frame_sample(s.id, s.prompt, shared_memory=(segment.name, offset, height, width)).framed()
            offset += aligned(len(pixels))
        self.stats.shared_memory += len(raws)
        return parts

    def _unreadable(self, samples: list[FramedSample], results: list[SampleResult]) -> list[int]:
        """Indices of the samples sent in shared memory that a replica could not read; shared memory goes off."""
        refused = [
            i
            for i, (s, r) in enumerate(zip(samples, results, strict=True))
            if s.raw is not None and r.error_code == "SHARED_MEMORY_UNAVAILABLE"
        ]
        if refused:
            self._shared_memory_on = False
            self.stats.shared_memory_resent += len(refused)
            self.stats.samples -= len(refused)  # counted again when resent
            why = results[refused[0]].error_message
            warnings.warn(
                f"{self.application}: a replica cannot read this client's shared memory ({why}); resending in the "
                "request, and sending pixels in requests from now on",
                stacklevel=3,
            )
        return refused

    def _results_in_order(self, counts, responses, slots) -> list[SampleResult]:
        """One result per sample, in input order, from the responses of `plan`'s requests and its slots."""
        per_request = []
        for n, resp in zip(counts, responses, strict=True):
            if len(resp.results) != n:
                raise RewardServiceError(
                    self.application, None, f"server returned {len(resp.results)} results for {n} samples"
                )
            per_request.append(iter(resp.results))
        out = []
        for slot in slots:
            out.append(slot if isinstance(slot, SampleResult) else SampleResult.from_proto(next(per_request[slot])))
        self.stats.samples += len(out)
        return out

    def _needs_describe(self) -> bool:
        return (self.discover_limits or self.resize_to_input or self.shared_memory) and not self._described

    def _set_server_limits(self, info: reward_pb2.DescribeResponse) -> None:
        """Takes what the client needs from the server's Describe: its request limits, its input resolution."""
        self._described = True
        if self.discover_limits:
            self._server_limits = (info.max_samples_per_request or 2**31, info.max_request_bytes or 2**62)
        if self.shared_memory:
            local = host_identity()
            self._shared_memory_on = bool(local) and info.shared_memory_host == local
            if not self._shared_memory_on:
                where = "does not accept shared memory" if not info.shared_memory_host else "is on another host"
                warnings.warn(
                    f"{self.application}: sending pixels in the request: the replica {where} "
                    f"(its shared memory {info.shared_memory_host or '-'}, this process's {local or '-'})",
                    stacklevel=3,
                )
        if self.resize_to_input and info.HasField("input_resolution"):
            resolution = InputResolution.from_proto(info.input_resolution)
            local = local_implementation()
            if resolution.implementation == local:
                self.input_resolution = resolution
            else:
                # Another torch or torchvision may resize differently in the last bit: full size keeps scores exact.
                warnings.warn(
                    f"{self.application}: not resizing on the client: the server resizes with "
                    f"{resolution.implementation}, this process has {local}",
                    stacklevel=3,
                )

    def _count_retry(self, _retry_state) -> None:
        self.stats.retries += 1

    def _error(self, e: grpc.RpcError) -> RewardServiceError:
        return RewardServiceError(self.application, e.code(), e.details() or "")

    def _open_channel(self, api) -> Any:
        """A channel of `api` (grpc, or grpc.aio): TLS with `credentials`, else plaintext."""
        if self.credentials is not None:
            return api.secure_channel(self.target, self.credentials, options=self._options)
        return api.insecure_channel(self.target, options=self._options)

    @staticmethod
    def _methods(channel) -> dict[str, Any]:
        # Score takes pre-serialized request bytes (see `plan`); Describe is an ordinary call.
        return {
            "Score": channel.unary_unary(
                _SCORE_METHOD, request_serializer=None, response_deserializer=reward_pb2.ScoreResponse.FromString
            ),
            "Describe": channel.unary_unary(
                _DESCRIBE_METHOD,
                request_serializer=reward_pb2.DescribeRequest.SerializeToString,
                response_deserializer=reward_pb2.DescribeResponse.FromString,
            ),
        }

    # --- sync API -----------------------------------------------------------------------------------------------

    def _sync(self) -> tuple[dict[str, Any], ThreadPoolExecutor]:
        with self._lock:
            if self._stub is None:
                self._channel = self._open_channel(grpc)
                self._stub = self._methods(self._channel)
                self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="reward-client")
            return self._stub, self._pool

    def _call(self, method: str, request: Any) -> Any:
        stub, _ = self._sync()

        def attempt():
            self.stats.requests += method == "Score"
            return stub[method](request, timeout=self.timeout_s, metadata=self.metadata)

        try:
            return tenacity.Retrying(**self.retry_policy)(attempt)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def score_samples(self, samples: Sequence[reward_pb2.Sample | FramedSample]) -> list[SampleResult]:
        """Scores prepared samples; see `score`."""
        if self._needs_describe():
            self._set_server_limits(self.describe())
        samples = [_framed(s) for s in samples]
        shared = self._shared_memory_on
        results = self._score_framed(samples, shared)
        refused = self._unreadable(samples, results) if shared else []
        if refused:
            for i, result in zip(refused, self._score_framed([samples[i] for i in refused], False), strict=True):
                results[i] = result
        return results

    def _score_framed(self, samples: list[FramedSample], shared: bool) -> list[SampleResult]:
        segments: list | None = [] if shared else None
        try:
            requests, counts, slots = self.plan(samples, segments)
            _, pool = self._sync()
            responses = list(pool.map(lambda r: self._call("Score", r), requests))
        finally:
            if segments:
                self._segments.release(segments)
        return self._results_in_order(counts, responses, slots)

    def score(self, images: Any, prompts: str | Sequence[str], ids: Sequence[str] | None = None) -> list[SampleResult]:
        """Scores images against prompts; one result per image, in order."""
        if self._needs_describe():
            self._set_server_limits(self.describe())
        return self.score_samples(self.frame_samples(images, prompts, ids))

    def describe(self) -> reward_pb2.DescribeResponse:
        return self._call("Describe", reward_pb2.DescribeRequest())

    # --- asyncio API --------------------------------------------------------------------------------------------

    def _async_stub(self) -> dict[str, Any]:
        # An aio channel belongs to the event loop that made it.
        loop = asyncio.get_running_loop()
        entry = self._aio.get(id(loop))
        if entry is None or entry[0] is not loop:  # ids of dead loops get reused
            channel = self._open_channel(grpc.aio)
            entry = self._aio[id(loop)] = (loop, channel, self._methods(channel))
        return entry[2]

    async def _acall(self, method: str, request: Any) -> Any:
        stub = self._async_stub()

        async def attempt():
            self.stats.requests += method == "Score"
            return await stub[method](request, timeout=self.timeout_s, metadata=self.metadata)

        try:
            return await tenacity.AsyncRetrying(**self.retry_policy)(attempt)
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            raise self._error(e) from None

    async def ascore_samples(self, samples: Sequence[reward_pb2.Sample | FramedSample]) -> list[SampleResult]:
        """Scores prepared samples; see `ascore`."""
        if self._needs_describe():
            self._set_server_limits(await self.adescribe())
        samples = [_framed(s) for s in samples]
        shared = self._shared_memory_on
        results = await self._ascore_framed(samples, shared)
        refused = self._unreadable(samples, results) if shared else []
        if refused:
            again = await self._ascore_framed([samples[i] for i in refused], False)
            for i, result in zip(refused, again, strict=True):
                results[i] = result
        return results

    async def _ascore_framed(self, samples: list[FramedSample], shared: bool) -> list[SampleResult]:
        segments: list | None = [] if shared else None
        window = asyncio.Semaphore(self.max_in_flight)

        async def one(request):
            async with window:
                return await self._acall("Score", request)

        try:
            requests, counts, slots = self.plan(samples, segments)
            responses = await asyncio.gather(*(one(r) for r in requests))
        finally:
            if segments:
                self._segments.release(segments)
        return self._results_in_order(counts, responses, slots)

    async def ascore(
        self, images: Any, prompts: str | Sequence[str], ids: Sequence[str] | None = None
    ) -> list[SampleResult]:
        """Async `score`: the same results, without blocking the event loop."""
        if self._needs_describe():
            self._set_server_limits(await self.adescribe())
        # Framed samples reference the caller's pixels until `plan` copies them into requests: framing after the
        # limits are known leaves no await in between, so no other coroutine can change them meanwhile.
        return await self.ascore_samples(self.frame_samples(images, prompts, ids))

    async def adescribe(self) -> reward_pb2.DescribeResponse:
        return await self._acall("Describe", reward_pb2.DescribeRequest())

    # --- lifetime -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the sync channel and thread pool (aio channels close with their event loops)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._channel = self._stub = self._pool = None
        self._segments.close()

    async def aclose(self) -> None:
        """Closes the aio channel of the running event loop."""
        entry = self._aio.pop(id(asyncio.get_running_loop()), None)
        if entry is not None:
            await entry[1].close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

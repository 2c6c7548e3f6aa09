"""Fuzzing the wire: arbitrary bytes and random ScoreRequests through the real fleet's gRPC proxy.

hypothesis draws the requests and each one goes over gRPC to the `jpeg_limited` application (4 samples, 40,000
bytes and 128x128 pixels per request), so the limits are cheap to exceed. For every request:
- the status is OK or INVALID_ARGUMENT (RESOURCE_EXHAUSTED would be backpressure), never INTERNAL or UNKNOWN, and
  INVALID_ARGUMENT exactly when the request breaks a request-level rule;
- an OK response has one result per sample with its id, and each result is a score or an error with a code;
- samples built to be valid get their in-process score, samples built to break a rule get that rule's code.
Afterwards the replica is the same process (nothing crashed) and a valid request is still scored correctly.
"""

import math
import struct
import zlib

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from ray.serve.context import _get_global_client

from protos.reward.v1 import reward_pb2
from services.codec import decode_encoded, encode_image
from services.registry import build_reward
from tests.conftest import LIMITED, random_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "jpeg_limited"
MAX_SAMPLES = LIMITED["max_samples_per_request"]
MAX_BYTES = LIMITED["max_request_bytes"]
MAX_PIXELS = LIMITED["max_image_pixels"]
MAX_PROMPT_CHARS = 4096  # RewardAppArgs' default; jpeg_limited keeps it
SAMPLE_CODES = {"MISSING_IMAGE", "INVALID_IMAGE", "IMAGE_TOO_LARGE", "INVALID_PROMPT", "SCORING_FAILED"}
# Requests per test; together above the 2,000 the fleet must survive.
BYTES_CASES = 800
STRUCTURED_CASES = 1400

_JPEG = build_reward("jpeg_compressibility")
_JPEG.load("cpu")


def _reward(image: np.ndarray) -> float:
    return float(np.float32(_JPEG.score([image], ["p"])[0].reward))


# Valid images, raw and encoded, with their in-process rewards (lossy formats: the reward of what decodes).
POOL = random_images(np.random.default_rng(1), 3, size=24)
RAW_POOL = [(image, _reward(image)) for image in POOL]
ENCODED_POOL = []
for _image in POOL:
    for _fmt in ("PNG", "JPEG", "WEBP"):
        _data = encode_image(_image, _fmt)
        ENCODED_POOL.append((_data, _reward(decode_encoded(_data))))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with an empty data chunk: the size is all a decoder can read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- strategies: each sample comes with what the server must answer for it ---------------------------------------
# An expectation is ("score", reward), ("error", codes): one of these codes, or ("any", codes): a finite score or
# one of these codes (corrupted images that may still decode).


@st.composite
def prompts(draw):
    """(prompt, codes of its faults)."""
    kind = draw(st.sampled_from(["text", "text", "text", "blank", "long", "limit"]))
    if kind == "blank":
        return draw(st.sampled_from(["", " ", "\t\n", "\u3000"])), {"INVALID_PROMPT"}
    if kind == "long":  # over the limit; 2 UTF-8 bytes per character
        return "é" * draw(st.integers(MAX_PROMPT_CHARS + 1, MAX_PROMPT_CHARS + 500)), {"INVALID_PROMPT"}
    if kind == "limit":
        return "x" * MAX_PROMPT_CHARS, set()
    text = draw(st.text(max_size=40))  # any unicode, surrogates excluded (proto strings are UTF-8)
    return text, set() if text.strip() else {"INVALID_PROMPT"}


@st.composite
def images(draw):
    """(the image fields of a Sample, expectation of the image alone)."""
    kind = draw(
        st.sampled_from(
            [
                "none",
                "raw_pool",
                "raw_random",
                "raw_exact",
                "encoded_pool",
                "garbage",
                "truncated",
                "flipped",
                "header",
            ]
        )
    )
    if kind == "none":
        return {}, ("error", {"MISSING_IMAGE"})
    if kind == "raw_pool":
        image, reward = draw(st.sampled_from(RAW_POOL))
        return {"raw": _raw(image.shape[0], image.shape[1], image.tobytes())}, ("score", reward)
    if kind == "raw_random":  # any dims (up to 2^32 - 1) and data of any length
        dim = st.one_of(st.integers(0, 200), st.integers(0, 2**32 - 1))
        height, width, data = draw(dim), draw(dim), draw(st.binary(max_size=2000))
        if height == 0 or width == 0:
            return {"raw": _raw(height, width, data)}, ("error", {"INVALID_IMAGE"})
        if height * width > MAX_PIXELS:
            return {"raw": _raw(height, width, data)}, ("error", {"IMAGE_TOO_LARGE"})
        if len(data) != height * width * 3:
            return {"raw": _raw(height, width, data)}, ("error", {"INVALID_IMAGE"})
        return {"raw": _raw(height, width, data)}, ("score", _reward(_pixels(height, width, data)))
    if kind == "raw_exact":  # random pixels of a matching size
        height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
        data = draw(st.binary(min_size=height * width * 3, max_size=height * width * 3))
        return {"raw": _raw(height, width, data)}, ("score", _reward(_pixels(height, width, data)))
    if kind == "encoded_pool":
        data, reward = draw(st.sampled_from(ENCODED_POOL))
        return {"encoded": data}, ("score", reward)
    if kind == "garbage":  # empty or random bytes: not an image
        return {"encoded": draw(st.binary(max_size=2000))}, ("error", {"INVALID_IMAGE"})
    if kind == "truncated":
        data, _ = draw(st.sampled_from(ENCODED_POOL))
        return {"encoded": data[: draw(st.integers(0, len(data) - 1))]}, ("any", {"INVALID_IMAGE"})
    if kind == "flipped":
        data, _ = draw(st.sampled_from(ENCODED_POOL))
        i, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 7))
        flipped = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
        # A flipped bit in a JPEG or WebP size field (they have no header checksum) can make the image too large.
        return {"encoded": flipped}, ("any", {"INVALID_IMAGE", "IMAGE_TOO_LARGE"})
    # A header declaring any size up to 2^31 - 1 a side: over the pixel limit it is IMAGE_TOO_LARGE (decided from
    # the header, whatever the size), under it the missing pixel data makes it INVALID_IMAGE.
    width, height = draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1))
    code = "IMAGE_TOO_LARGE" if width * height > MAX_PIXELS else "INVALID_IMAGE"
    return {"encoded": _png_header(width, height)}, ("error", {code})


def _raw(height: int, width: int, data: bytes) -> reward_pb2.RawImage:
    return reward_pb2.RawImage(height=height, width=width, data=data)


def _pixels(height: int, width: int, data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


@st.composite
def samples(draw):
    """(Sample, expectation): the prompt's and the image's faults combine; no fault means the exact score."""
    prompt, prompt_faults = draw(prompts())
    image, (kind, value) = draw(images())
    sample = reward_pb2.Sample(id=draw(st.text(max_size=20)), prompt=prompt, **image)
    if not prompt_faults:
        return sample, (kind, value)
    if kind == "score":
        return sample, ("error", prompt_faults)
    return sample, ("error", prompt_faults | value)  # whichever check runs first


@st.composite
def score_requests(draw):
    """(ScoreRequest, expectation per sample): 0 to limit + 1 samples, sometimes options (none are accepted)."""
    drawn = draw(st.lists(samples(), max_size=MAX_SAMPLES + 1))
    options = draw(
        st.one_of(st.just({}), st.just({}), st.dictionaries(st.text(max_size=8), st.text(max_size=8), min_size=1))
    )
    request = reward_pb2.ScoreRequest(samples=[s for s, _ in drawn], options=options)
    return request, [e for _, e in drawn]


@st.composite
def request_bytes(draw):
    """Arbitrary bytes, or a valid request's bytes cut, bit-flipped or with bytes spliced in."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    request, _ = draw(score_requests())
    data = request.SerializeToString()
    i = draw(st.integers(0, len(data)))
    mutation = draw(st.sampled_from(["cut", "flip", "splice"]))
    if mutation == "cut":
        return data[:i]
    if mutation == "flip" and i < len(data):
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1 :]
    return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]


# --- checks ------------------------------------------------------------------------------------------------------


def request_rule_broken(request: reward_pb2.ScoreRequest) -> bool:
    """Whether the request as a whole must be rejected: sample count, bytes of samples, options (none accepted)."""
    n = len(request.samples)
    return n == 0 or n > MAX_SAMPLES or sum(s.ByteSize() for s in request.samples) > MAX_BYTES or bool(request.options)


def check_results(request: reward_pb2.ScoreRequest, response: reward_pb2.ScoreResponse, expected=None) -> None:
    assert [r.id for r in response.results] == [s.id for s in request.samples]
    for i, result in enumerate(response.results):
        if result.HasField("error"):
            code = reward_pb2.ErrorCode.Name(result.error.code)
            assert code in SAMPLE_CODES and result.error.message, (i, code)
            assert math.isnan(result.reward)
        else:
            assert math.isfinite(result.reward) and result.reward < 0, (i, result.reward)
            assert result.components["jpeg_kb"] == pytest.approx(-result.reward)
        if expected is None:
            continue
        kind, value = expected[i]
        if kind == "score":
            assert not result.HasField("error"), (i, result.error.message)
            assert result.reward == value, i
        elif kind == "error":
            assert result.HasField("error"), (i, "scored", result.reward)
            assert reward_pb2.ErrorCode.Name(result.error.code) in value, (i, result.error.message)
        else:
            assert not result.HasField("error") or reward_pb2.ErrorCode.Name(result.error.code) in value, i


@pytest.fixture(scope="module")
def score_bytes(fleet):
    """Sends bytes as they are (no serializer) and returns (status code, response bytes or details)."""
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        call = channel.unary_unary(
            "/reward.v1.RewardService/Score", request_serializer=None, response_deserializer=None
        )

        def send(data: bytes):
            try:
                return grpc.StatusCode.OK, call(data, metadata=(("application", APP),), timeout=60)
            except grpc.RpcError as e:
                return e.code(), e.details()

        yield send


@pytest.fixture(scope="module")
def survivor(fleet):
    """Asserts, after the module's tests, that the same replica processes still serve and score correctly."""
    before = _replica_pids()
    yield
    assert _replica_pids() == before, "a replica of the fuzzed application was replaced"
    assert serve.status().applications[APP].status == "RUNNING"


def _replica_pids() -> dict[str, int | None]:
    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"]["reward"]["replicas"]
    return {r["actor_name"]: r.get("pid") for r in replicas if r["state"] == "RUNNING"}


FUZZ_SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def test_arbitrary_bytes_are_ok_or_invalid_argument(score_bytes, survivor):
    statuses: dict[str, int] = {}

    @settings(max_examples=BYTES_CASES, **FUZZ_SETTINGS)
    @given(request_bytes())
    def one(data):
        code, body = score_bytes(data)
        statuses[code.name] = statuses.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return
        # The replica parses with the same protobuf runtime: the status follows from the bytes.
        try:
            request = reward_pb2.ScoreRequest.FromString(data)
        except Exception:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid reward.v1.ScoreRequest" in body
            return
        if request_rule_broken(request):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, body
            return
        assert code == grpc.StatusCode.OK, body
        check_results(request, reward_pb2.ScoreResponse.FromString(body))

    one()
    print(f"\n{sum(statuses.values())} byte requests: {statuses}")
    assert sum(statuses.values()) >= BYTES_CASES


def test_random_requests_get_the_status_and_per_sample_results_they_deserve(score_bytes, survivor):
    statuses: dict[str, int] = {}
    sample_outcomes: dict[str, int] = {}

    @settings(max_examples=STRUCTURED_CASES, **FUZZ_SETTINGS)
    @given(score_requests())
    def one(drawn):
        request, expected = drawn
        code, body = score_bytes(request.SerializeToString())
        statuses[code.name] = statuses.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return
        if request_rule_broken(request):
            assert code == grpc.StatusCode.INVALID_ARGUMENT, body
            return
        assert code == grpc.StatusCode.OK, body
        response = reward_pb2.ScoreResponse.FromString(body)
        check_results(request, response, expected)
        for r in response.results:
            outcome = reward_pb2.ErrorCode.Name(r.error.code) if r.HasField("error") else "scored"
            sample_outcomes[outcome] = sample_outcomes.get(outcome, 0) + 1

    one()
    print(f"\n{sum(statuses.values())} structured requests: {statuses}; samples: {sample_outcomes}")
    assert sum(statuses.values()) >= STRUCTURED_CASES
    # The generator reached every outcome, so the checks above were exercised on each.
    assert set(sample_outcomes) >= {"scored", *SAMPLE_CODES - {"SCORING_FAILED"}}


def test_valid_requests_are_still_scored_correctly_after_fuzzing(score_bytes, survivor):
    request = reward_pb2.ScoreRequest(
        samples=[
            reward_pb2.Sample(id=str(i), prompt="p", raw=_raw(24, 24, image.tobytes())) for i, image in enumerate(POOL)
        ]
    )
    code, body = score_bytes(request.SerializeToString())
    assert code == grpc.StatusCode.OK
    assert [r.reward for r in reward_pb2.ScoreResponse.FromString(body).results] == [r for _, r in RAW_POOL]

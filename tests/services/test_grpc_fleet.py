"""Through the wire: a real local Ray cluster, real Serve applications, the real gRPC proxy on 127.0.0.1."""

import grpc
import numpy as np
import pytest

from protos.reward.v1 import reward_pb2, reward_pb2_grpc
from services.codec import encode_image
from services.registry import build_reward
from tests.conftest import LIMITED, random_images

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stub(fleet):
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def _score(stub, samples, app="jpeg_compressibility", **kw):
    return stub.Score(reward_pb2.ScoreRequest(samples=samples, **kw), metadata=(("application", app),), timeout=60)


def _raw(image, prompt="a red cube", sample_id=""):
    h, w, _ = image.shape
    return reward_pb2.Sample(
        id=sample_id, prompt=prompt, raw=reward_pb2.RawImage(height=h, width=w, data=image.tobytes())
    )


def _in_process(images):
    reward = build_reward("jpeg_compressibility")
    reward.load("cpu")
    return [np.float32(o.reward) for o in reward.score(images, ["p"] * len(images))]


def test_scores_match_in_process_and_keep_order_and_ids(stub, rng):
    images = random_images(rng, 12)
    ids = [f"s{i}" for i in rng.permutation(12)]
    ids[3] = ids[4]  # duplicate ids are echoed too
    response = _score(stub, [_raw(img, sample_id=i) for img, i in zip(images, ids, strict=True)])
    assert response.reward_name == "jpeg_compressibility"
    assert [r.id for r in response.results] == ids
    assert [r.reward for r in response.results] == _in_process(images)
    assert all(not r.HasField("error") for r in response.results)
    assert set(response.results[0].components) == {"jpeg_kb"}


def test_a_request_over_the_batch_size_is_scored_in_chunks_in_order(stub, rng):
    """70 samples against max_batch_size 32: three chunks (32, 32, 6), with a bad sample and PNGs among them."""
    images = random_images(rng, 70, size=16)
    samples = [_raw(img, sample_id=str(i)) for i, img in enumerate(images)]
    for i in (5, 40):  # encoded samples decode on the decode threads, the rest stay views of the request
        samples[i] = reward_pb2.Sample(id=str(i), prompt="p", encoded=encode_image(images[i], "PNG"))
    samples[33] = reward_pb2.Sample(id="33", prompt="p", raw=reward_pb2.RawImage(height=16, width=16, data=b"x"))
    results = _score(stub, samples).results
    assert [r.id for r in results] == [str(i) for i in range(70)]
    assert results[33].error.code == reward_pb2.INVALID_IMAGE
    expected = _in_process(images)
    assert [r.reward for i, r in enumerate(results) if i != 33] == [v for i, v in enumerate(expected) if i != 33]


def test_encoded_transports_give_the_same_score_as_raw(stub, rng):
    (image,) = random_images(rng, 1)
    png = reward_pb2.Sample(id="png", prompt="p", encoded=encode_image(image, "PNG"))
    response = _score(stub, [_raw(image), png])
    assert response.results[0].reward == response.results[1].reward


def test_bad_samples_get_their_own_error_and_the_rest_are_scored(stub, rng):
    images = random_images(rng, 3)
    png = encode_image(images[0], "PNG")
    samples = [
        _raw(images[0], sample_id="good0"),
        reward_pb2.Sample(id="corrupt", prompt="p", encoded=png[: len(png) // 2]),
        reward_pb2.Sample(id="garbage", prompt="p", encoded=b"\x89PNG not really"),
        reward_pb2.Sample(id="short_raw", prompt="p", raw=reward_pb2.RawImage(height=4, width=4, data=b"\0" * 47)),
        reward_pb2.Sample(id="no_image", prompt="p"),
        _raw(images[1], prompt="   ", sample_id="blank_prompt"),
        _raw(images[2], sample_id="good2"),
    ]
    results = _score(stub, samples).results
    codes = {r.id: reward_pb2.ErrorCode.Name(r.error.code) for r in results if r.HasField("error")}
    assert codes == {
        "corrupt": "INVALID_IMAGE",
        "garbage": "INVALID_IMAGE",
        "short_raw": "INVALID_IMAGE",
        "no_image": "MISSING_IMAGE",
        "blank_prompt": "INVALID_PROMPT",
    }
    assert "expected height*width*3 = 48" in results[3].error.message
    assert all(np.isnan(r.reward) for r in results if r.HasField("error"))
    assert [results[0].reward, results[6].reward] == [_in_process(images)[0], _in_process(images)[2]]


def test_shared_memory_samples_are_read_in_place_and_bad_references_are_sample_errors(stub, rng):
    """Shared-memory images over the wire (a client on the fleet's host): valid ones are scored as their raw
    pixels would be; a name outside `rewardfleet_*`, a segment that does not exist, a range past its end and an
    oversized image each fail alone, and the replica keeps serving."""
    from services.shared_memory import SegmentPool, write_pixels

    images = random_images(rng, 2, size=32)
    pool = SegmentPool()
    segment = pool.lease(2 * images[0].nbytes)
    for k, img in enumerate(images):
        write_pixels(segment, k * img.nbytes, memoryview(img).cast("B"))

    def shm(name, offset=0, size=32):
        ref = reward_pb2.SharedMemoryImage(segment=name, offset=offset, height=size, width=size)
        return reward_pb2.Sample(prompt="p", shared_memory=ref)

    try:
        samples = [
            shm(segment.name),
            shm("../../etc/passwd"),
            shm("rewardfleet_no_such_segment"),
            shm(segment.name, offset=segment.size - 16),
            shm(segment.name, size=5000),
            shm(segment.name, offset=images[0].nbytes),
        ]
        results = _score(stub, samples).results
        codes = [reward_pb2.ErrorCode.Name(r.error.code) if r.HasField("error") else None for r in results]
        assert codes == [None, "INVALID_IMAGE", "SHARED_MEMORY_UNAVAILABLE", "INVALID_IMAGE", "IMAGE_TOO_LARGE", None]
        assert "not allowed" in results[1].error.message and "does not exist" in results[2].error.message
        assert [results[0].reward, results[5].reward] == _in_process(images)
        assert [r.reward for r in _score(stub, [_raw(img) for img in images]).results] == _in_process(images)
    finally:
        pool.release([segment])
        pool.close()


def test_image_over_the_pixel_limit_is_a_sample_error(stub, rng):
    # Limit is 128 * 128 pixels; as PNG the image is small in bytes, so only the pixel limit applies.
    big = reward_pb2.Sample(prompt="p", encoded=encode_image(np.zeros((129, 128, 3), np.uint8), "PNG"))
    results = _score(stub, [big, _raw(random_images(rng, 1)[0])], app="jpeg_limited").results
    assert reward_pb2.ErrorCode.Name(results[0].error.code) == "IMAGE_TOO_LARGE"
    assert not results[1].HasField("error")


@pytest.mark.parametrize(
    "make_request, message",
    [
        (lambda img: reward_pb2.ScoreRequest(), "no samples"),
        (lambda img: reward_pb2.ScoreRequest(samples=[_raw(img)] * 5), "5 samples, more than the limit of 4"),
        (
            lambda img: reward_pb2.ScoreRequest(samples=[_raw(np.zeros((100, 100, 3), np.uint8))] * 2),
            "bytes of samples, more than the limit of 40000",
        ),
        (lambda img: reward_pb2.ScoreRequest(samples=[_raw(img)], options={"beams": "4"}), "unknown option"),
    ],
)
def test_malformed_requests_are_invalid_argument_and_the_server_keeps_serving(stub, rng, make_request, message):
    (image,) = random_images(rng, 1)
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(make_request(image), metadata=(("application", "jpeg_limited"),), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    assert _score(stub, [_raw(image)], app="jpeg_limited").results[0].reward == _in_process([image])[0]


def test_bytes_that_are_not_a_score_request_are_invalid_argument(fleet, stub, rng):
    # Score requests pass the proxy unparsed (services.grpc_proxy); the replica must reject garbage cleanly.
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        raw_score = channel.unary_unary(
            "/reward.v1.RewardService/Score",
            request_serializer=None,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            raw_score(b"\x0a\xff\xff\xff\x0fnot a message", metadata=(("application", "jpeg_compressibility"),))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid reward.v1.ScoreRequest" in e.value.details()
    assert not _score(stub, [_raw(random_images(rng, 1)[0])]).results[0].HasField("error")


def test_unknown_application_is_not_found(stub, rng):
    with pytest.raises(grpc.RpcError) as e:
        _score(stub, [_raw(random_images(rng, 1)[0])], app="no_such_reward")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_reward" in e.value.details()


def test_describe_reports_meaning_range_and_limits(stub):
    info = stub.Describe(reward_pb2.DescribeRequest(), metadata=(("application", "jpeg_limited"),), timeout=60)
    assert info.name == "jpeg_compressibility" and info.max_reward == 0.0 and np.isneginf(info.min_reward)
    assert info.max_samples_per_request == LIMITED["max_samples_per_request"]
    assert info.max_request_bytes == LIMITED["max_request_bytes"]
    assert info.max_image_pixels == LIMITED["max_image_pixels"]
    assert '"quality": 95' in info.config_json


def test_serve_builtin_health_and_application_list_answer(fleet):
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(fleet.grpc_target) as channel:
        api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        assert api.Healthz(serve_pb2.HealthzRequest(), timeout=30).message == "success"
        apps = api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=30).application_names
    assert {"jpeg_compressibility", "jpeg_limited", "jpeg_backpressure"} <= set(apps)


BARRIER_MODULE = "two_at_once"
BARRIER_FILE = '''"""Scores 1.0 only while two batches are scored at the same time: each waits for the other, and a
batch that waits alone for `wait_s` raises. Range {1.0}."""

import threading

from pydantic import Field

from services.config import Config
from services.registry import register
from services.reward import Reward, RewardInfo, RewardOutput


class TwoAtOnceConfig(Config):
    wait_s: float = Field(default=3.0, gt=0.0, description="How long a batch waits for a second one.")


@register("two_at_once")
class TwoAtOnce(Reward):
    Config = TwoAtOnceConfig

    def load(self, device="cpu"):
        self.barrier = threading.Barrier(2, timeout=self.config.wait_s)

    def score(self, images, prompts):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            self.barrier.reset()  # ready for the next pair
            raise
        return [RewardOutput(1.0) for _ in images]

    def info(self):
        return RewardInfo("two batches at once", 1.0, 1.0)
'''


def test_max_concurrent_batches_scores_that_many_batches_at_once(fleet, tmp_path):
    """`max_concurrent_batches: 2`, batches of one sample, on a reward that succeeds only while two batches are
    scored at the same time: a request alone fails after its wait, two requests at once are both scored. (With
    Serve's default of one batch at a time, the second would wait for the first, which fails alone.)"""
    from concurrent.futures import ThreadPoolExecutor

    from services.registry import MODULES_ENV
    from tests.services.test_real_architectures import served

    (tmp_path / f"{BARRIER_MODULE}.py").write_text(BARRIER_FILE)
    runtime_env = {"working_dir": f"local://{tmp_path}", "env_vars": {MODULES_ENV: BARRIER_MODULE}}
    app = {
        "name": BARRIER_MODULE,
        "route_prefix": f"/{BARRIER_MODULE}",
        "import_path": "services.serving:build_app",
        "args": {
            "reward": BARRIER_MODULE,
            "device": "cpu",
            "reward_config": {"wait_s": 2.0},
            "max_batch_size": 1,
            "max_concurrent_batches": 2,
        },
        "deployments": [{"name": "reward", "ray_actor_options": {"num_cpus": 0.1, "runtime_env": runtime_env}}],
    }
    image = np.zeros((8, 8, 3), np.uint8)
    with served(app, fleet.grpc_target) as client:
        (alone,) = client.score([image], "p")
        with ThreadPoolExecutor(2) as pool:
            pair = [r for f in [pool.submit(client.score, [image], "p") for _ in range(2)] for r in f.result()]
    assert alone.error_code == "SCORING_FAILED" and "BrokenBarrierError" in alone.error_message
    assert [(r.reward, r.error_code) for r in pair] == [(1.0, None), (1.0, None)]

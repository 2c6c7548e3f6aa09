"""The fleet client against the real served reward: chunking, in-flight requests, retries, async, raw fast path."""

import asyncio

import grpc
import numpy as np
import pytest
import tenacity

from services.client import RewardClient, RewardServiceError
from services.registry import build_reward
from services.retries import retry_policy
from services.shared_memory import SegmentPool
from tests.conftest import LIMITED, free_port, random_images

pytestmark = pytest.mark.integration


def _in_process(images):
    reward = build_reward("jpeg_compressibility")
    reward.load("cpu")
    return [np.float32(o.reward) for o in reward.score(images, ["p"] * len(images))]


def test_chunks_by_sample_count_under_the_server_limit_and_keeps_order(fleet, rng):
    images = random_images(rng, 11, size=32)
    # The client asks for 16 per request; the server's limit of 4 (learnt from Describe) wins.
    client = RewardClient(fleet.grpc_target, "jpeg_limited", max_samples_per_request=16, max_in_flight=3)
    results = client.score(images, "a cat", ids=[f"id{i}" for i in range(11)])
    assert client.stats.requests == 3  # 4 + 4 + 3
    assert [r.id for r in results] == [f"id{i}" for i in range(11)]
    assert [r.reward for r in results] == _in_process(images)


def test_chunks_by_bytes_and_reports_oversized_samples_without_sending(fleet, rng):
    images = random_images(rng, 7)  # 64x64 raw = 12288 bytes each: 3 fit under 40000
    too_big = np.zeros((128, 128, 3), np.uint8)  # 49152 bytes alone
    client = RewardClient(fleet.grpc_target, "jpeg_limited")
    results = client.score([*images[:3], too_big, *images[3:]], "p")
    assert client.stats.requests == 3  # 3 + 3 + 1
    assert results[3].error_code == "NOT_SENT" and np.isnan(results[3].reward)
    assert str(LIMITED["max_request_bytes"]) in results[3].error_message
    assert [r.reward for r in results if r.ok] == _in_process(images)


def test_a_client_above_the_server_limit_fails_loudly_without_retrying(fleet, rng):
    client = RewardClient(fleet.grpc_target, "jpeg_limited", max_samples_per_request=8, discover_limits=False)
    with pytest.raises(RewardServiceError) as e:
        client.score(random_images(rng, 6), "p")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "more than the limit of 4" in e.value.details
    assert client.stats.retries == 0


def test_retries_resource_exhausted_until_every_sample_is_answered(fleet, rng):
    # The backpressure app takes one request at a time and queues one; the rest are RESOURCE_EXHAUSTED.
    images = random_images(rng, 12)
    retries = {"max_retries": 30, "backoff_s": 0.05, "max_backoff_s": 0.5}
    one_per_request = {"max_samples_per_request": 1, "max_in_flight": 12, "discover_limits": False}
    client = RewardClient(fleet.grpc_target, "jpeg_backpressure", **one_per_request, **retries)
    results = client.score(images, "p")
    assert client.stats.retries > 0
    assert [r.reward for r in results] == _in_process(images)


def test_unavailable_is_retried_then_raised():
    client = RewardClient(
        f"127.0.0.1:{free_port()}", "jpeg_compressibility", max_retries=2, backoff_s=0.01, discover_limits=False
    )
    with pytest.raises(RewardServiceError) as e:
        client.score([np.zeros((8, 8, 3), np.uint8)], "p")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert client.stats.requests == 3 and client.stats.retries == 2


def test_async_calls_retry_by_the_same_policy():
    client = RewardClient(
        f"127.0.0.1:{free_port()}", "jpeg_compressibility", max_retries=2, backoff_s=0.01, discover_limits=False
    )
    with pytest.raises(RewardServiceError) as e:
        asyncio.run(client.ascore([np.zeros((8, 8, 3), np.uint8)], "p"))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert client.stats.requests == 3 and client.stats.retries == 2


def test_backoff_doubles_up_to_its_cap_with_jitter():
    wait = retry_policy(max_retries=6, backoff_s=0.1, max_backoff_s=0.3)["wait"]
    for retry, full in enumerate([0.1, 0.2, 0.3, 0.3]):
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = retry + 1  # the attempt that just failed
        waits = [wait(state) for _ in range(200)]
        assert 0.5 * full <= min(waits) < max(waits) <= full


def test_async_client_and_torch_batches_match_the_sync_client(fleet, rng):
    import torch

    images = random_images(rng, 9)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
    client = RewardClient(fleet.grpc_target, "jpeg_compressibility", max_samples_per_request=4)

    async def run():
        try:
            return await client.ascore(batch, [f"prompt {i}" for i in range(9)])
        finally:
            await client.aclose()

    async_results = asyncio.run(run())
    sync_results = client.score(images, [f"prompt {i}" for i in range(9)])
    assert [r.reward for r in async_results] == [r.reward for r in sync_results] == _in_process(images)


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_encoded_transport_option(fleet, rng, image_format):
    images = random_images(rng, 3)
    client = RewardClient(fleet.grpc_target, "jpeg_compressibility", image_format=image_format)
    results = client.score(images, "p")
    assert all(r.ok for r in results)
    if image_format == "png":  # lossless: same pixels, same score
        assert [r.reward for r in results] == _in_process(images)


def test_describe_through_the_client(fleet):
    client = RewardClient(fleet.grpc_target, "jpeg_compressibility")
    assert client.describe().name == "jpeg_compressibility"


@pytest.mark.parametrize("app", ["clip_score", "caption"])
def test_resize_to_input_sends_fewer_bytes_for_the_same_scores(fleet, rng, app):
    """The local profile's CLIP and BLIP-2 read 32 px images: 96 x 128 go as 32 x 42 and 32 x 32, scored the same."""
    images = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(5)]
    images.append(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))  # smaller than the model's input: sent as is
    plain = RewardClient(fleet.grpc_target, app)
    resizing = RewardClient(fleet.grpc_target, app, resize_to_input=True, discover_limits=False)
    want, got = plain.score(images, "a red cube"), resizing.score(images, "a red cube")
    assert resizing.input_resolution is not None and resizing.stats.resized == 5 and plain.stats.resized == 0
    assert all(r.ok for r in got)
    assert [r.reward for r in got] == [r.reward for r in want]
    assert [r.caption for r in got] == [r.caption for r in want]
    sent = [sum(s.size for s in c.frame_samples(images, "a red cube")) for c in (plain, resizing)]
    assert sent[1] * 4 < sent[0]


def test_resize_to_input_keeps_full_size_for_a_reward_that_reads_every_pixel(fleet, rng):
    images = random_images(rng, 3, size=128)
    client = RewardClient(fleet.grpc_target, "jpeg_compressibility", resize_to_input=True)
    assert not client.describe().HasField("input_resolution")
    assert [r.reward for r in client.score(images, "p")] == _in_process(images)
    assert client.input_resolution is None and client.stats.resized == 0


def test_resize_to_input_sends_full_size_to_a_server_with_another_torch(rng):
    from protos.reward.v1 import reward_pb2
    from services.resolution import InputResolution

    other = InputResolution(shortest_edge=8, implementation="torch==0.0 torchvision==0.0")
    client = RewardClient("127.0.0.1:1", "clip_score", resize_to_input=True)
    with pytest.warns(UserWarning, match="not resizing on the client: the server resizes with torch==0.0"):
        client._set_server_limits(reward_pb2.DescribeResponse(input_resolution=other.to_proto()))
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert client.input_resolution is None
    assert client.make_samples([image], "p")[0].raw.height == 64 and client.stats.resized == 0


def test_mismatched_inputs_are_rejected_before_sending():
    client = RewardClient("127.0.0.1:1", "jpeg_compressibility")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        client.make_samples([np.zeros((4, 4, 3), np.uint8)] * 2, ["a", "b", "c"])


def test_framed_requests_are_byte_identical_to_protobuf_serialization(rng):
    from protos.reward.v1 import reward_pb2

    client = RewardClient("127.0.0.1:1", "jpeg_compressibility", max_samples_per_request=3, discover_limits=False)
    # Sizes whose varint length prefixes take 1, 2 and 3 bytes.
    images = [np.zeros((1, 1, 3), np.uint8), *random_images(rng, 2, 16), *random_images(rng, 2, 100)]
    samples = client.make_samples(images, [f"prompt {i}" for i in range(5)])
    requests, counts, _ = client.plan(samples)
    assert counts == [3, 2]
    assert requests[0] == reward_pb2.ScoreRequest(samples=samples[:3]).SerializeToString()
    assert requests[1] == reward_pb2.ScoreRequest(samples=samples[3:]).SerializeToString()


def test_shared_memory_sends_where_the_pixels_are_and_scores_exactly_as_raw(fleet, rng):
    """`shared_memory=True` on the fleet's host: requests carry segment references, not pixels, and every score is
    the raw transport's, sync and async; a corrupt encoded sample among them still gets its own error."""
    from services.shared_memory import SHM_DIR

    images = random_images(rng, 10, size=64)
    expected = _in_process(images)
    client = RewardClient(fleet.grpc_target, "jpeg_compressibility", shared_memory=True, max_samples_per_request=4)
    assert [r.reward for r in client.score(images, "p")] == expected
    assert client.stats.shared_memory == 10 and client.stats.shared_memory_resent == 0

    segments: list = []
    requests, counts, _ = client.plan(client.frame_samples(images, "p"), segments)
    client._segments.release(segments)
    assert counts == [4, 4, 2] and len(segments) == 3
    assert sum(map(len, requests)) < 100 * len(images) < sum(img.nbytes for img in images)

    async def run():
        try:
            return await client.ascore([*images[:3], b"not an image", *images[3:]], "p")
        finally:
            await client.aclose()

    mixed = asyncio.run(run())
    assert mixed[3].error_code == "INVALID_IMAGE"
    assert [r.reward for r in mixed[:3] + mixed[4:]] == expected
    names = {s.name for s in segments}
    assert all((SHM_DIR / n).exists() for n in names)
    client.close()  # the client's segments go with it
    assert not any((SHM_DIR / n).exists() for n in names)


def test_shared_memory_falls_back_to_the_request_where_a_replica_cannot_read_it(fleet, rng):
    images = random_images(rng, 4, size=32)
    # jpeg_limited serves with `shared_memory: false`: its Describe reports no host, so the client sends pixels.
    limited = RewardClient(fleet.grpc_target, "jpeg_limited", shared_memory=True)
    with pytest.warns(UserWarning, match="does not accept shared memory"):
        assert [r.reward for r in limited.score(images, "p")] == _in_process(images)
    assert limited.stats.shared_memory == 0
    # assemble_ranks accepts it and forwards the request; its component jpeg_limited cannot read it, so every
    # sample comes back SHARED_MEMORY_UNAVAILABLE and the client resends them with their pixels: the same results.
    shared = RewardClient(fleet.grpc_target, "assemble_ranks", shared_memory=True)
    with pytest.warns(UserWarning, match="cannot read this client's shared memory"):
        got = shared.score(images, "p")
    want = RewardClient(fleet.grpc_target, "assemble_ranks").score(images, "p")
    assert all(r.ok for r in got) and [r.reward for r in got] == [r.reward for r in want]
    assert [r.components for r in got] == [r.components for r in want]
    assert (shared.stats.shared_memory, shared.stats.shared_memory_resent, shared.stats.samples) == (4, 4, 4)
    shared.score(images, "p")  # from then on, in the request
    assert shared.stats.shared_memory == 4 and shared.stats.samples == 8
    limited.close()
    shared.close()


def test_shared_memory_full_sends_the_pixels_in_the_request(fleet, rng):
    """/dev/shm full (ENOSPC from the pool, as `posix_fallocate` raises it): the request carries its pixels."""
    import errno

    class FullPool(SegmentPool):
        def lease(self, nbytes):
            raise OSError(errno.ENOSPC, "No space left on device")

    images = random_images(rng, 3)
    client = RewardClient(fleet.grpc_target, "jpeg_compressibility", shared_memory=True)
    client._segments = FullPool()
    with pytest.warns(UserWarning, match="no shared memory for a request"):
        assert [r.reward for r in client.score(images, "p")] == _in_process(images)
    assert client.stats.shared_memory == 0 and not client._shared_memory_on
    client.close()


def test_shared_memory_needs_the_raw_transport():
    with pytest.raises(ValueError, match="needs image_format='raw'"):
        RewardClient("127.0.0.1:1", "jpeg_compressibility", shared_memory=True, image_format="png")

"""The five standard rewards (clip_score, aesthetic, pickscore, hpsv2, image_reward) served by the local profile on
tiny models in their releases' formats: through gRPC each equals its in-process score, is deterministic, and a
sample's score does not depend on the batch it arrives in (nor on samples of other requests batched with it)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deploy.fleet import LOCAL_PROFILE, load_serve_config
from services.client import RewardClient
from services.registry import build_reward

pytestmark = pytest.mark.integration

STANDARD = ["clip_score", "aesthetic", "pickscore", "hpsv2", "image_reward"]
PROMPTS = ["two green balls in the city", "a red cube on the beach", "three blue dogs"]
# float32 everywhere; the replica batches other samples (from this request and concurrent ones) into one forward
# pass, and other batch shapes take other kernels and reduction orders: last-bit differences on scores of order 1-100.
RTOL, ATOL = 1e-5, 1e-5


def reward_config(name: str) -> dict:
    (app,) = [a for a in load_serve_config(LOCAL_PROFILE)["applications"] if a["name"] == name]
    return app["args"]["reward_config"]


def images(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32 + 8 * (i % 3), 40, 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def started(fleet):
    """The fleet with the five replicas started: the profile scales them from zero, and each application's first
    request starts its replica. All five at once, so their start-ups overlap."""

    def first_request(name):
        (result,) = RewardClient(fleet.grpc_target, name, timeout_s=240).score(images(1, 1), PROMPTS[:1])
        return result.ok

    with ThreadPoolExecutor(len(STANDARD)) as pool:
        assert all(pool.map(first_request, STANDARD))
    return fleet


@pytest.mark.parametrize("name", STANDARD)
def test_served_equals_in_process_and_does_not_depend_on_the_batch(started, name):
    local = build_reward(name, reward_config(name))
    local.load("cpu")
    batch, prompts = images(0, 6), [PROMPTS[i % 3] for i in range(6)]
    expected = [o.reward for o in local.score(batch, prompts)]
    assert len(set(np.round(expected, 6))) > 2, expected  # scores depend on the image and prompt

    client = RewardClient(started.grpc_target, name)
    served = client.score(batch, prompts)
    assert all(r.ok for r in served), [r.error_message for r in served]
    np.testing.assert_allclose([r.reward for r in served], expected, rtol=RTOL, atol=ATOL)
    assert set(served[0].components) == set(local.score(batch[:1], prompts[:1])[0].components)

    again = [r.reward for r in client.score(batch, prompts)]
    np.testing.assert_allclose(again, [r.reward for r in served], rtol=RTOL, atol=ATOL)
    reordered = [r.reward for r in client.score(batch[::-1], prompts[::-1])][::-1]
    np.testing.assert_allclose(reordered, expected, rtol=RTOL, atol=ATOL)
    # One sample per request, all in flight at once: the replica batches them with each other.
    with ThreadPoolExecutor(6) as pool:
        alone = list(pool.map(lambda i: client.score([batch[i]], [prompts[i]])[0].reward, range(6)))
    np.testing.assert_allclose(alone, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", STANDARD)
def test_describe_names_the_models_and_range(started, name):
    info = RewardClient(started.grpc_target, name).describe()
    assert info.name == name and info.description
    assert info.min_reward < info.max_reward
    # Every reward names the models it loaded, from the profile's paths (the provenance fingerprint covers them).
    sources = [m.source for m in info.models]
    assert sources and all("~/.cache/rewardfleet/tiny/" in s for s in sources), sources

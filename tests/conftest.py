"""Shared fixtures: one real local Ray cluster and one Serve fleet per test session (starting them costs ~15 s)."""

import contextlib
import copy
import os
import socket

# Before any Hugging Face import: an accidental download must fail loudly, never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve's controller loops every 0.1 s by default. The session's fleet idles through most of the suite, and at that
# rate its controller alone takes a tenth of a core of the 2; at 0.25 s it takes half that (measured on the test
# fleet, 30 s idle: 12.6 CPU-seconds in all processes at 0.1 s, 9.8 at 0.25 s). The Ray clusters the tests start
# (the session's, the CLI's subprocesses, the loopback clusters) inherit it.
os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.25")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from deploy.fleet import LOCAL_PROFILE, load_serve_config  # noqa: E402

# Limits of the `jpeg_limited` test application (small, so tests can exceed them cheaply).
LIMITED = {"max_samples_per_request": 4, "max_request_bytes": 40_000, "max_image_pixels": 128 * 128}


def pytest_addoption(parser):
    parser.addoption(
        "--cluster-full",
        action="store_true",
        help="multi-node tests at full length: every ramp, kill and hold (`make test-cluster`); default: one of each",
    )


def pytest_collection_modifyitems(config, items):
    """Multi-node tests run last: each connects this process to a cluster of its own, which ends the session's
    single-node one that the other tests share."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assemble_app(name: str, **args) -> dict:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "services.assemble:build_app",
        "args": args,
        "deployments": [{"name": "assemble", "ray_actor_options": {"num_cpus": 0.1}}],
    }


# Assemble applications over the test fleet's rewards. The caption reward waits 0.1 s for a batch to fill, so a
# 1 ms timeout always expires.
ASSEMBLE_MIXED = {
    "components": [
        {"application": "jpeg_compressibility", "weight": 2.0, "center": -1.0, "scale": 0.5},
        {"application": "jpeg_limited", "weight": 1.0, "center": -2.0, "scale": 1.0},
        {"application": "caption", "required": False, "timeout_s": 0.001},
    ]
}
ASSEMBLE_TEST_APPS = [
    _assemble_app("assemble_mixed", **ASSEMBLE_MIXED),
    _assemble_app(
        "assemble_required_timeout",
        components=[
            {"application": "jpeg_compressibility", "center": -1.0, "scale": 0.5},
            {"application": "caption", "timeout_s": 0.001},
        ],
    ),
    _assemble_app(
        "assemble_ranks",
        combine="rank_fusion",
        fusion="borda",
        components=[{"application": "jpeg_compressibility", "weight": 2.0}, {"application": "jpeg_limited"}],
    ),
]


def test_serve_config(alignment_dir: str | None = None) -> dict:
    """The local profile plus two test applications of the same reward: tight limits, and backpressure.

    `alignment_dir` replaces the `alignment` app's reward directory (the profile's full testbed reward takes minutes
    to train on first use; the tests serve one trained on a tiny testbed instead).
    """
    config = load_serve_config(LOCAL_PROFILE, grpc_port=free_port(), http_port=free_port())
    if alignment_dir is not None:
        alignment = next(a for a in config["applications"] if a["name"] == "alignment")
        alignment["args"]["reward_config"]["model_dir"] = alignment_dir
    base = next(a for a in config["applications"] if a["name"] == "jpeg_compressibility")
    for app in config["applications"]:
        for dep in app.get("deployments", []):
            options = dep.setdefault("ray_actor_options", {})
            if options.get("num_cpus", 1.0) >= 0.1:  # the standard rewards' tiny replicas keep their 0.02
                options["num_cpus"] = 0.5

    limited = copy.deepcopy(base)
    limited.update(name="jpeg_limited", route_prefix="/jpeg_limited")
    limited["args"].update(LIMITED, shared_memory=False)  # and clients on this host send it pixels all the same

    # One request at a time and a queue of one: concurrent requests are rejected with RESOURCE_EXHAUSTED.
    backpressure = copy.deepcopy(base)
    backpressure.update(name="jpeg_backpressure", route_prefix="/jpeg_backpressure")
    backpressure["args"].update(max_batch_size=1, batch_wait_timeout_s=0.05, max_concurrent_batches=1)
    backpressure["deployments"] = [
        {"name": "reward", "max_ongoing_requests": 1, "max_queued_requests": 1, "ray_actor_options": {"num_cpus": 0.5}}
    ]
    config["applications"] += [limited, backpressure, *ASSEMBLE_TEST_APPS]
    for app in config["applications"]:
        if app["import_path"] == "services.assemble:build_app":  # it only waits on the others
            for dep in app["deployments"]:
                dep["ray_actor_options"]["num_cpus"] = 0.1
    return config


@contextlib.contextmanager
def loopback_cluster(*nodes: dict):
    """A multi-node cluster on this machine (deploy/local_cluster.py), one node per `add_node` kwargs (the first is
    the head), with this process connected as its driver; torn down by process id whatever happens. The session's
    single-node cluster is shut down first: multi-node tests run last (`pytest_collection_modifyitems`)."""
    import ray

    from deploy.local_cluster import CLUSTER_ENV, LoopbackCluster

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)
    try:
        with LoopbackCluster() as cluster:
            for node in nodes:
                cluster.add_node(**node)
            ray.init(address=cluster.address, log_to_driver=False)
            try:
                yield cluster
            finally:
                ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with logical CPUs for the fleet's replicas and Train workers."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory) -> dict:
    """A tiny seeded feedback testbed (stand-in CLIP, train and held-out feedback), built once per session."""
    from services.config import replace
    from tests.trainer.local_models.test_testbed import TINY
    from trainer.local_models.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("testbed"), replace(TINY, images_per_prompt=2))


def tiny_training_config(paths: dict, out_dir, **overrides):
    """A RewardTrainingConfig that trains a small head on a tiny testbed's feedback in a few seconds."""
    from trainer.reward_training import RewardTrainingConfig

    fields = dict(
        out_dir=str(out_dir),
        testbed=None,
        feedback=str(paths["train"]),
        heldout_feedback=str(paths["heldout"]),
        clip=str(paths["clip"]),
        hidden_sizes=(16,),
        epochs=4,
        patience=2,
        num_prompts=3,
    )
    return RewardTrainingConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def tiny_alignment_reward(tiny_testbed, tmp_path_factory) -> str:
    """A learned alignment reward directory, trained by `train_reward` on the tiny testbed."""
    from trainer.reward_training import train_reward

    config = tiny_training_config(tiny_testbed, tmp_path_factory.mktemp("alignment") / "reward")
    train_reward(config, progress=False)
    return config.out_dir


@pytest.fixture(scope="session")
def local_artifacts() -> dict:
    """The local profile's models under ~/.cache/rewardfleet, as `rewardfleet build-local` builds them (once, then
    cached). Not its testbed alignment reward, which takes minutes: the test fleet serves one trained on a tiny
    testbed instead (`tiny_alignment_reward`)."""
    from trainer.local_models.artifacts import build_local_artifacts

    return build_local_artifacts(alignment=False)


@pytest.fixture(scope="session")
def fleet(ray_cluster, local_artifacts, tiny_alignment_reward):
    """The local profile served for real: Serve gRPC proxy on 127.0.0.1:<free port>."""
    from deploy.fleet import start_fleet, stop_fleet

    running = start_fleet(test_serve_config(tiny_alignment_reward))
    yield running
    stop_fleet(shutdown_ray=False)


@pytest.fixture(scope="session")
def real_width_models(tmp_path_factory) -> dict:
    """The cluster profile's models at their released widths and file layouts, 1-2 layers, random weights
    (`trainer.local_models.real_width.save_real_width_models`), built once per session in about 20 s. They take 2.3
    GB of disk, so they are removed at the end rather than kept with pytest's last three sessions' temporary files."""
    import shutil

    from trainer.local_models.real_width import save_real_width_models

    root = tmp_path_factory.mktemp("real_width")
    yield save_real_width_models(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): exact results do
    not depend on the thread count, and on a busy 2-core machine two threads made a UNet forward 4x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_images(rng, n: int, size: int = 64) -> list[np.ndarray]:
    """Images with structure (smooth gradient + noise patch), so their JPEG sizes differ."""
    images = []
    for _ in range(n):
        y, x = np.mgrid[0:size, 0:size]
        base = (x * rng.uniform(0, 4) + y * rng.uniform(0, 4)).astype(np.uint8)
        img = np.stack([base, base[::-1], base.T], axis=-1)
        k = int(rng.integers(1, size // 2))
        img[:k, :k] = rng.integers(0, 255, (k, k, 3), dtype=np.uint8)
        images.append(np.ascontiguousarray(img))
    return images

"""The placement check: what a profile asks of a cluster, packed onto its nodes before anything deploys."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.fleet import DEPLOY_DIR, LOCAL_PROFILE, load_serve_config
from deploy.placement import Demand, PlacementError, check_placement, pack, serve_demands
from trainer.config import load_finetune_config

GIB = 1024**3
LAPTOP = [{"CPU": 2.0, "memory": 8 * GIB}]  # what `ray.init()` gives on a 2-core laptop


def _local_train_workers() -> Demand:
    run = load_finetune_config(None, []).run
    return Demand("fine-tuning workers", run.num_workers, {"CPU": run.cpus_per_worker})


def test_local_profile_and_the_local_fine_tuning_job_fit_a_2_core_laptop():
    config = load_serve_config(LOCAL_PROFILE)
    demands = serve_demands(config)
    # The standard rewards scale from zero: no replica at start.
    assert {d.owner for d in demands} == {
        "jpeg_compressibility/reward",
        "caption/reward",
        "semantic/reward",
        "alignment/reward",
        "assemble/assemble",
    }
    check_placement(demands, LAPTOP, "the local profile")
    check_placement([*demands, _local_train_workers()], LAPTOP, "the local profile and job")
    # With each of them scaled up to its one replica, the profile and the job still fit.
    for app in config["applications"]:
        for deployment in app["deployments"]:
            if deployment.get("autoscaling_config", {}).get("min_replicas") == 0:
                deployment["autoscaling_config"]["initial_replicas"] = deployment["autoscaling_config"]["max_replicas"]
    scaled_up = serve_demands(config)
    assert len(scaled_up) == len(demands) + 5
    check_placement([*scaled_up, _local_train_workers()], LAPTOP, "the local profile, scaled up, and job")
    # One worker more and it no longer fits: the check is tight, not vacuous.
    extra = Demand("one more worker", 1, {"CPU": _local_train_workers().resources["CPU"]})
    assert pack([*demands, _local_train_workers(), extra], LAPTOP)


def test_cluster_profile_on_a_cpu_node_names_each_gpu_deployment_and_what_is_missing():
    demands = serve_demands(load_serve_config(DEPLOY_DIR / "cluster.yaml"))
    gpu_owners = [d.owner for d in demands if d.resources.get("GPU")]
    assert gpu_owners
    with pytest.raises(PlacementError) as e:
        check_placement(demands, LAPTOP, "deploy/cluster.yaml")
    message = str(e.value)
    for owner in gpu_owners:
        assert owner in message
    assert "no node has GPU enough for one" in message and "GPU:" in message and "--wait-for-resources" in message


def test_fractional_gpus_pack_per_node_and_never_onto_a_gpu_less_node():
    half = Demand("app/reward", 4, {"CPU": 1.0, "GPU": 0.5})
    nodes = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert pack([half], nodes) == {}  # two 0.5-GPU replicas per GPU
    assert pack([Demand("app/reward", 5, {"CPU": 1.0, "GPU": 0.5})], nodes) == {"app/reward": 1}
    # Enough GPUs in sum, but no single node has 2: the replica cannot be split across nodes.
    whole = Demand("big/reward", 1, {"GPU": 2.0})
    with pytest.raises(PlacementError, match=r"big/reward: 1 of 1 cannot be placed.*no node has GPU enough"):
        check_placement([whole], nodes, "x")
    # Fragmentation: each replica fits some node, but not all of them together.
    cpus = Demand("cpu/reward", 3, {"CPU": 5.0})
    with pytest.raises(PlacementError, match="no node has room left for them once the rest is placed"):
        check_placement([cpus], [{"CPU": 8.0}, {"CPU": 8.0}], "x")


def test_demands_follow_serve_defaults_autoscaling_memory_and_custom_resources():
    config = {
        "applications": [
            {
                "name": "a",
                "deployments": [
                    {"name": "default"},  # Serve's defaults: 1 replica, 1 CPU
                    {"name": "auto", "autoscaling_config": {"min_replicas": 2, "max_replicas": 8}},
                    {"name": "initial", "num_replicas": "auto", "autoscaling_config": {"initial_replicas": 3}},
                    {"name": "idle", "autoscaling_config": {"min_replicas": 0, "max_replicas": 2}},
                    {
                        "name": "big",
                        "num_replicas": 2,
                        "ray_actor_options": {"num_cpus": 0, "memory": 4 * GIB, "resources": {"tpu_slice": 1}},
                    },
                    {"name": "pg", "placement_group_bundles": [{"CPU": 1, "GPU": 1}, {"CPU": 2}]},
                ],
            }
        ]
    }
    demands = {d.owner: (d.count, d.resources) for d in serve_demands(config)}
    assert demands == {
        "a/default": (1, {"CPU": 1.0}),
        "a/auto": (2, {"CPU": 1.0}),
        "a/initial": (3, {"CPU": 1.0}),
        "a/big": (2, {"memory": 4.0 * GIB, "tpu_slice": 1.0}),
        "a/pg": (1, {"CPU": 3.0, "GPU": 1.0}),
    }
    with pytest.raises(PlacementError, match=r"a/big: 2 of 2 .*tpu_slice 1.*no node has tpu_slice"):
        check_placement(serve_demands(config), [{"CPU": 16.0, "GPU": 1.0, "memory": 64.0 * GIB}], "x")


@pytest.mark.integration
def test_serve_with_an_unplaceable_profile_fails_fast_naming_what_is_missing():
    """`rewardfleet serve --config deploy/cluster.yaml` on a CPU-only machine: out in seconds, not a timeout."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", "--config", str(DEPLOY_DIR / "cluster.yaml"), "--num-cpus", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert elapsed < 30, elapsed
    assert "cannot place the Serve config" in proc.stderr
    assert "caption/reward" in proc.stderr and "GPU" in proc.stderr
    assert "Traceback" not in proc.stderr

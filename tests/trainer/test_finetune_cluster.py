"""The fine-tuning job on a Ray cluster of several nodes (deploy/local_cluster.py): its two Ray Train workers on
two nodes of their own, the fleet on the head, and the node of one worker lost in the middle of a round."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from deploy.fleet import LOCAL_PROFILE, load_serve_config, start_fleet
from services.client import RewardClient, RewardServiceError
from tests.conftest import free_port, loopback_cluster
from tests.trainer.test_finetune import check_rows, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster, pytest.mark.cluster_full]

# One worker per trainer node: each asks for the node's one `trainer_node`.
TRAINER_NODE = {"num_cpus": 2, "resources": {"trainer_node": 1}}


@pytest.fixture
def cluster():
    """The head (the fleet, `fleet_node`) and two trainer nodes, this process their driver."""
    with loopback_cluster({"num_cpus": 2, "resources": {"fleet_node": 1}}, TRAINER_NODE, TRAINER_NODE) as running:
        yield running


def _fleet_on_the_head():
    """The JPEG reward of the local profile, pinned to the head by its `fleet_node` resource."""
    config = load_serve_config(LOCAL_PROFILE, grpc_port=free_port(), http_port=free_port())
    jpeg = next(a for a in config["applications"] if a["name"] == "jpeg_compressibility")
    jpeg["deployments"][0]["ray_actor_options"] = {"num_cpus": 0.5, "resources": {"fleet_node": 0.5}}
    config["applications"] = [jpeg]
    return start_fleet(config)


def _worker_nodes(output_dir, cluster) -> dict[int, object]:
    """Rank -> the loopback node its worker runs on, from the node ids the workers log (trainer/worker.py)."""
    by_id = {n.node_id: n for n in cluster.nodes}
    found = {}
    for line in (output_dir / "workers.log").read_text().splitlines():
        rank, node_id = line.split()[:2]
        found[int(rank)] = by_id[node_id]
    return found


def test_losing_a_workers_node_mid_round_resumes_from_the_last_checkpoint(cluster, tmp_path):
    """The RayJob's entry point (`rewardfleet train --address`, deploy/k8s/rayjob.yaml) as a driver process of its
    own; the weighted strategy with the pre-training term. Round 0 checkpointed, the node of the last worker is lost
    in round 1, a replacement node joins, and the job resumes from round 0's checkpoint."""
    from trainer.metrics import read_metrics
    from trainer.pretrain_data import write_rendered_pairs

    fleet = _fleet_on_the_head()
    # One application only: Serve's proxy would route any name to it; the deployment must refuse.
    with pytest.raises(RewardServiceError) as e:
        RewardClient(fleet.grpc_target, "caption").score([np.zeros((8, 8, 3), np.uint8)], "p")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "'caption' not found" in e.value.details
    pairs = write_rendered_pairs(tmp_path / "pretrain", 6, 16)
    overrides = tiny_overrides(
        fleet,
        tmp_path,
        "multinode",
        "run.max_failures=1",
        "run.worker_resources={trainer_node: 1}",
        "selection.strategy=weighted",
        "selection.weighting=minmax",
        "optim.beta=0.5",
        f"optim.pretrain_data={pairs}",
    )
    command = [sys.executable, "-m", "deploy.cli", "train", "--address", cluster.address]
    command += [arg for o in overrides for arg in ("--set", o)]
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115
    job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
    output_dir = tmp_path / "multinode"
    try:
        # 1. Round 0 done (its row and its checkpoint written), round 1 under way: lose the last worker's node.
        deadline = time.monotonic() + 300
        while not ((output_dir / "metrics.jsonl").exists() and list((output_dir / "ray").glob("*/checkpoint_*"))):
            assert job.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 0 never finished"
            time.sleep(0.5)
        nodes = _worker_nodes(output_dir, cluster)
        assert len({n.node_id for n in nodes.values()}) == 2 and cluster.nodes[0] not in nodes.values()
        time.sleep(2.0)
        victim = nodes[max(nodes)]
        cluster.kill_node(victim)
        # 2. A replacement machine joins, as a cluster's autoscaler or KubeRay would bring one.
        cluster.add_node(**TRAINER_NODE)
        assert job.wait(600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    # 3. Every round exactly once, the final evaluation last; the rounds after the loss were run by attempt 2.
    rows = read_metrics(output_dir)
    check_rows(rows, 2, ["jpeg_compressibility"])
    attempts = [r["attempt"] for r in rows]
    assert attempts[0] == 1 and attempts[-1] == 2 and attempts == sorted(attempts), attempts
    after = _worker_nodes(output_dir, cluster)
    assert victim.node_id not in {n.node_id for n in after.values()}

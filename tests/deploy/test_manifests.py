"""Kubernetes manifests: the RayJob runs the `rewardfleet train` CLI on a preset that loads."""

import shlex
from pathlib import Path

from typer.testing import CliRunner

from deploy.cli import app
from services.config import load_yaml
from trainer.config import load_finetune_config

ROOT = Path(__file__).parents[2]


def test_rayjob_runs_the_train_cli_on_the_cluster_preset():
    job = load_yaml(ROOT / "deploy/k8s/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["rewardfleet", "train"]
    preset = argv[argv.index("--config") + 1]
    config = load_finetune_config(ROOT / preset)
    # The cluster has the GPUs the preset asks for.
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert config.run.use_gpu and gpus >= config.run.num_workers
    # Checkpoints go to the volume every pod mounts.
    mounts = {
        m["mountPath"]
        for m in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert any(config.run.output_dir.startswith(m) for m in mounts)


def test_train_cli_rejects_a_bad_override_with_the_valid_keys():
    result = CliRunner().invoke(app, ["train", "--set", "optim.lrr=1"])
    assert result.exit_code == 2
    assert "unknown key(s) ['lrr']" in result.output and "'lr'" in result.output

"""Kubernetes manifests: the RayJob runs the `rewardfleet train` CLI on a preset that loads; the RayService serves
deploy/cluster.yaml verbatim, exposes gRPC where the trainer connects, and has the GPUs its replicas ask for."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tests.deploy.test_profiles as profiles
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


# --- RayService (deploy/k8s/rayservice.yaml) ---------------------------------------------------------------------

MANIFESTS = sorted((ROOT / "deploy/k8s").glob("*.yaml"))


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _rayservice() -> dict:
    (service,) = [d for d in _documents(ROOT / "deploy/k8s/rayservice.yaml") if d["kind"] == "RayService"]
    return service


def _serve_configs() -> list[tuple[str, str]]:
    """(manifest name, serveConfigV2 text) of every manifest that embeds a Serve config."""
    return [
        (path.name, doc["spec"]["serveConfigV2"])
        for path in MANIFESTS
        for doc in _documents(path)
        if "serveConfigV2" in doc.get("spec", {})
    ]


def _containers(spec: dict) -> list[dict]:
    """Every container of a RayCluster spec (head and worker groups)."""
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def test_manifests_exist_and_one_embeds_a_serve_config():
    assert {p.name for p in MANIFESTS} >= {"rayjob.yaml", "rayservice.yaml"}
    assert [name for name, _ in _serve_configs()] == ["rayservice.yaml"]


@pytest.mark.parametrize("text", [pytest.param(text, id=name) for name, text in _serve_configs()])
def test_embedded_serve_config_validates_and_every_reference_resolves(text, tmp_path):
    # The same checks as the shipped profiles: ServeDeploySchema, servicer functions, import paths, RewardAppArgs,
    # reward names and configs.
    path = tmp_path / "serve_config.yaml"
    path.write_text(text)
    profiles.test_profile_validates_and_every_reference_resolves(path)


def test_rayservice_serves_the_cluster_profile_verbatim():
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    assert service["spec"]["serveConfigV2"] == (ROOT / "deploy/cluster.yaml").read_text(), (
        "deploy/k8s/rayservice.yaml's serveConfigV2 differs from deploy/cluster.yaml; paste the file back in, "
        "indented by four spaces: sed '/./s/^/    /' deploy/cluster.yaml"
    )


def test_rayservice_exposes_grpc_where_the_trainer_connects():
    spec = _rayservice()["spec"]
    grpc_port = yaml.safe_load(spec["serveConfigV2"])["grpc_options"]["port"]
    # KubeRay's Serve Service carries only the port named "serve": it must be gRPC's.
    service = spec["serveService"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "serve"]
    assert port["port"] == grpc_port and port.get("targetPort", grpc_port) == grpc_port
    trainer = load_finetune_config(ROOT / "trainer/configs/cluster.yaml")
    assert trainer.rewards.target == f"{service['metadata']['name']}:{grpc_port}"
    # A container port named "serve" would replace it, and KubeRay would send its HTTP health checks to gRPC.
    containers = _containers(spec["rayClusterConfig"])
    assert all(p["name"] != "serve" for c in containers for p in c.get("ports", []))
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["ports"], "without declared head ports, older KubeRay versions expose the default serve port 8000"
    assert grpc_port in {p["containerPort"] for p in head["ports"]}


def _gpus_and_cpus(resources: dict) -> tuple[float, float]:
    limits = resources["limits"]
    return float(limits.get("nvidia.com/gpu", 0)), float(limits["cpu"])


def test_rayservice_gpu_workers_fit_every_replica_from_min_to_max():
    spec = _rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas go to the workers
    groups = [
        (g, _gpus_and_cpus(g["template"]["spec"]["containers"][0]["resources"])) for g in cluster["workerGroupSpecs"]
    ]
    capacity = {
        bound: (sum(g[bound] * gpus for g, (gpus, _) in groups), sum(g[bound] * cpus for g, (_, cpus) in groups))
        for bound in ("minReplicas", "maxReplicas")
    }
    need = {"minReplicas": [0.0, 0.0], "maxReplicas": [0.0, 0.0]}
    autoscaled = False
    for application in yaml.safe_load(spec["serveConfigV2"])["applications"]:
        (deployment,) = application["deployments"]
        options = deployment["ray_actor_options"]
        gpus, cpus = options.get("num_gpus", 0), options.get("num_cpus", 1)
        # One replica fits in one worker pod.
        assert any(gpus <= g and cpus <= c for _, (g, c) in groups), application["name"]
        scaling = deployment.get("autoscaling_config")
        autoscaled |= scaling is not None
        replicas = (
            {"minReplicas": scaling["min_replicas"], "maxReplicas": scaling["max_replicas"]}
            if scaling
            else dict.fromkeys(need, deployment.get("num_replicas", 1))
        )
        for bound, n in replicas.items():
            need[bound][0] += n * gpus
            need[bound][1] += n * cpus
    for bound in need:
        assert need[bound][0] <= capacity[bound][0] and need[bound][1] <= capacity[bound][1], (bound, need, capacity)
    # Autoscaling replicas need the Ray autoscaler to add worker pods.
    assert cluster.get("enableInTreeAutoscaling", False) == autoscaled


def test_every_local_path_of_the_serve_config_is_on_a_mounted_volume():
    spec = _rayservice()["spec"]
    paths = re.findall(r"(?<![\w~.])/[\w./-]+", json.dumps(_reward_configs(spec["serveConfigV2"])))
    assert paths  # the SAM checkpoint and the alignment reward
    for container in _containers(spec["rayClusterConfig"]):
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert all(any(p.startswith(m + "/") for m in mounts) for p in paths), (container["name"], paths)


def _reward_configs(serve_config: str) -> list[dict]:
    return [app["args"].get("reward_config", {}) for app in yaml.safe_load(serve_config)["applications"]]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_the_image_of_the_dockerfile(path):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    for doc in _documents(path):
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == base
        assert {c["image"] for c in _containers(cluster)} == {f"rewardfleet:{version}"}

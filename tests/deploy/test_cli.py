import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from deploy.cli import app
from deploy.demo import make_example_images
from deploy.fleet import LOCAL_PROFILE, load_serve_config, scaled_to_zero
from deploy.scoring import read_pairs
from services.client import RewardClient
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture(scope="module")
def example_images(tmp_path_factory):
    return make_example_images(tmp_path_factory.mktemp("images"))


@pytest.mark.integration
def test_score_a_folder_prints_a_row_per_image(fleet, example_images):
    folder = example_images[0].parent
    result = runner.invoke(
        app, ["score", str(folder), "--prompt", "a red disc", "--target", fleet.grpc_target, "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    for path in example_images:
        assert path.name in result.stdout
    assert "INVALID_IMAGE" in result.stdout  # the corrupt example
    assert "jpeg_kb=" in result.stdout


@pytest.mark.integration
def test_score_a_jsonl_as_json_lines(fleet, example_images, tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"image": str(p), "prompt": f"prompt {i}"}) for i, p in enumerate(example_images[:3]))
    )
    result = runner.invoke(
        app, ["score", str(jsonl), "--output", "json", "--target", fleet.grpc_target, "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["prompt 0", "prompt 1", "prompt 2"]
    assert all(r["reward"] < 0 and r["error"] is None for r in rows)


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "prompt": "x"}\n{"prompt": "no image"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2"):
        read_pairs(bad, None)
    result = runner.invoke(app, ["score", str(tmp_path), "--target", "127.0.0.1:1"])
    assert result.exit_code != 0 and "needs --prompt" in result.output


@pytest.mark.parametrize(
    ("config", "flag", "builds"), [(None, None, True), ("other", None, False), ("other", True, True)]
)
def test_serve_builds_the_local_artifacts_for_the_local_profile_only(monkeypatch, tmp_path, config, flag, builds):
    import deploy.cli
    import deploy.fleet
    from deploy.placement import PlacementError

    built = []
    monkeypatch.setattr(deploy.cli, "build_local_cmd", lambda progress: built.append(progress))

    def no_room(*args, **kwargs):  # stops `serve` before it starts anything
        raise PlacementError("no room")

    monkeypatch.setattr(deploy.fleet, "start_fleet", no_room)
    monkeypatch.setattr(deploy.fleet, "stop_fleet", lambda shutdown_ray: None)
    args = ["serve"]
    if config == "other":
        other = tmp_path / "other.yaml"
        other.write_text(LOCAL_PROFILE.read_text())
        args += ["--config", str(other)]
    if flag:
        args.append("--build-local")
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "no room" in result.output
    assert built == ([True] if builds else [])


def _serve_in_subprocess(serve_config: dict, tmp_path: Path, timeout_s: float) -> subprocess.Popen:
    """`rewardfleet serve --config <serve_config> --num-cpus 2` in its own process and Ray cluster, as a user runs
    it on a 2-core machine; returns once it says it serves (asserting that it does)."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "serve", "--config", str(config), "--num-cpus", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=Path(__file__).parents[2],
        # Ctrl-C as in a terminal: a suite started in the background by a shell inherits SIGINT ignored, and so
        # would the server, which would then never see the test's Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + timeout_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Ctrl-C to stop" in line or proc.poll() is not None:
            break
    if not any(f"serving on 127.0.0.1:{serve_config['grpc_options']['port']}" in x for x in lines):
        proc.kill()
        raise AssertionError("".join(lines))
    return proc


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.slow
def test_serve_starts_the_whole_local_profile_on_2_cpus(
    tmp_path, example_images, local_artifacts, tiny_alignment_reward
):
    """`rewardfleet serve` as on a 2-core laptop (Ray's default is one logical CPU per core): every application of
    the local profile reaches ready, those with replicas score, and Ctrl-C shuts it down. The profile is the
    embedded one, except for the alignment reward's directory (the profile's own is trained for minutes on first
    use; the tests serve a tiny one)."""
    port = free_port()
    serve_config = load_serve_config(LOCAL_PROFILE, grpc_port=port, http_port=free_port())
    alignment = next(a for a in serve_config["applications"] if a["name"] == "alignment")
    alignment["args"]["reward_config"]["model_dir"] = tiny_alignment_reward
    proc = _serve_in_subprocess(serve_config, tmp_path, timeout_s=240)
    try:
        image = example_images[2].read_bytes()

        def score(name: str):
            (result,) = RewardClient(f"127.0.0.1:{port}", name).score([image], "a red disc")
            return name, result

        # The applications with replicas from the start. The five standard rewards scale from zero: they fit on
        # the 2 CPUs by the placement check at deploy, and tests/services/test_standard_rewards.py serves them.
        names = [a["name"] for a in serve_config["applications"] if a["name"] not in scaled_to_zero(serve_config)]
        assert len(names) == len(serve_config["applications"]) - 5
        with ThreadPoolExecutor(len(names)) as pool:
            for name, result in pool.map(score, names):
                assert result.ok, (name, result.error_code, result.error_message)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def tiny_sd_directory(tmp_path_factory) -> Path:
    """The tiny Stable Diffusion pipeline in SD 1.5's directory layout, written by diffusers' save_pretrained."""
    from trainer.local_models.tiny import tiny_stable_diffusion

    path = tmp_path_factory.mktemp("tiny_sd15")
    tiny_stable_diffusion(0, 16).save_pretrained(path)
    return path


@pytest.mark.integration
@pytest.mark.slow
def test_train_with_fleet_in_half_precision_on_2_cpus(tmp_path, tiny_sd_directory):
    """The README's fine-tuning command with LoRA in float16 (the cluster preset's dtype) on a 2-CPU Ray cluster it
    starts itself: the fleet and the 2 workers fit, and a round trains (before mixed precision: "mat1 and mat2 must
    have the same dtype"). bfloat16 runs the same step in-process (tests/trainer/test_mixed_precision.py)."""
    dtype = "float16"
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "train",
            "--with-fleet",
            str(LOCAL_PROFILE),
            "--num-cpus",
            "2",
            "--set",
            "optim.method=lora",
            "--set",
            f"model.dtype={dtype}",
            "--set",
            "run.rounds=1",
            "--set",
            f"model.pretrained={tiny_sd_directory}",
            "--set",
            "model.resolution=16",
            "--set",
            f"rewards.target=127.0.0.1:{port}",
            "--set",
            f"run.output_dir={tmp_path / 'run'}",
            "--set",
            "prompts.generate=4",
            "--set",
            "prompts.eval_count=2",
            "--set",
            "prompts.eval_seeds=2",
            "--set",
            "sampling.steps=2",
            # The tiny pipeline's images are noise: generated prompts, no testbed metrics, one cheap reward.
            "--set",
            "prompts.train_file=null",
            "--set",
            "prompts.eval_file=null",
            "--set",
            "testbed.oracle=false",
            "--set",
            "testbed.fidelity_clip=null",
            "--set",
            "rewards.weights={jpeg_compressibility: 1.0}",
            "--set",
            "rewards.monitor=[]",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=400,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert np.isfinite(rows[0]["loss"]) and rows[0]["selected"] > 0
    assert "held-out mean" in proc.stdout and "latest checkpoint" in proc.stdout


@pytest.mark.integration
def test_status_lists_every_application_with_replicas_and_a_describe_round_trip(fleet):
    result = runner.invoke(app, ["status", "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = {r["application"]: r for r in json.loads(result.stdout)}
    assert set(fleet.applications) <= set(rows)
    jpeg = rows["jpeg_limited"]
    assert jpeg["status"] == "RUNNING" and jpeg["health"] == "ok"
    (node_ip,) = jpeg["deployments"][0].pop("nodes")  # one node: its running replica is there
    assert jpeg["deployments"] == [{"name": "reward", "status": "HEALTHY", "running": 1, "target": 1}]
    assert rows["jpeg_compressibility"]["deployments"][0]["nodes"] == {node_ip: 1}
    assert jpeg["provenance"]["application"] == "jpeg_limited"
    assert jpeg["provenance"]["reward_name"] == "jpeg_compressibility"

    table = runner.invoke(app, ["status"])
    assert table.exit_code == 0, table.output
    line = next(x for x in table.stdout.splitlines() if x.startswith("jpeg_limited "))
    assert line.split()[:5] == ["jpeg_limited", "RUNNING", "reward", "1/1", "ok"]
    assert jpeg["provenance"]["fingerprint"][:12] in line
    # The standard rewards scale from zero: with no replica, no round trip (it would start one), and healthy.
    for name in ("clip_score", "aesthetic", "pickscore", "hpsv2", "image_reward"):
        (deployment,) = rows[name]["deployments"]
        if deployment["target"] == 0:
            assert rows[name]["health"] == "scaled to zero" and "provenance" not in rows[name], rows[name]
        else:  # an earlier test scored it (its replica stays for 10 idle minutes)
            assert rows[name]["health"] == "ok", rows[name]


@pytest.mark.integration
def test_status_fails_when_the_grpc_proxy_does_not_answer(fleet):
    # Serve reports the applications RUNNING, but nothing listens on this port: the round trip is what fails.
    result = runner.invoke(app, ["status", "--target", f"127.0.0.1:{free_port()}", "--timeout-s", "5"])
    assert result.exit_code == 1
    line = next(x for x in result.stdout.splitlines() if x.startswith("jpeg_compressibility "))
    assert "UNAVAILABLE" in line
    assert "not healthy: " in result.stderr


@pytest.mark.parametrize(("command", "key"), [("train", "optim.lr = "), ("train-reward", "lambda_cls = ")])
def test_list_options_shows_every_config_field_with_its_description(command, key):
    result = runner.invoke(app, [command, "--list-options"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    line = next(i for i, x in enumerate(lines) if x.startswith(key))
    assert lines[line + 1].startswith("    ") and lines[line + 1].strip()  # its description, indented

"""A weight-free reward written in a new file outside the package: it registers, it is listed, and it serves.

The reward lives in a temporary directory, as a user's own module would; `REWARDFLEET_REWARD_MODULES` names it, so
the registry imports it after the built-in rewards (services/registry.py). Served, it is an entry of a Serve config
like the profiles' (`services.serving:build_app`), whose `runtime_env` ships the directory and the variable to the
replica.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.registry import MODULES_ENV, build_reward
from tests.conftest import random_images

MODULE = "mean_brightness"

REWARD_FILE = '''"""Mean brightness: the mean pixel over 255, to the power `gamma`. Range [0, 1], higher = brighter."""

import numpy as np
from pydantic import Field

from services.config import Config
from services.registry import register
from services.reward import Reward, RewardInfo, RewardOutput


class MeanBrightnessConfig(Config):
    gamma: float = Field(default=1.0, gt=0.0, description="Exponent applied to the mean brightness in [0, 1].")


@register("mean_brightness")
class MeanBrightness(Reward):
    Config = MeanBrightnessConfig

    def load(self, device="cpu"):
        pass  # weight-free

    def score(self, images, prompts):
        means = [float(np.asarray(image, dtype=np.float64).mean()) for image in images]
        return [RewardOutput((m / 255.0) ** self.config.gamma, components={"mean_pixel": m}) for m in means]

    def info(self):
        return RewardInfo(f"Mean brightness ** {self.config.gamma:g}, in [0, 1].", 0.0, 1.0)
'''


@pytest.fixture
def reward_dir(tmp_path) -> Path:
    (tmp_path / f"{MODULE}.py").write_text(REWARD_FILE)
    return tmp_path


def test_a_reward_module_named_by_the_environment_is_listed_by_the_cli(reward_dir):
    env = {**os.environ, "PYTHONPATH": str(reward_dir), MODULES_ENV: MODULE}
    repo = Path(__file__).resolve().parents[2]
    listed = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "rewards"], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert MODULE in names and "jpeg_compressibility" in names


@pytest.mark.integration
def test_a_reward_from_a_new_file_serves_its_in_process_scores(fleet, reward_dir, monkeypatch):
    # served() is the real-architecture tier's: deploy one Serve config entry next to the fleet, imperatively.
    from tests.services.test_real_architectures import served

    config = {"gamma": 2.0}
    runtime_env = {"working_dir": f"local://{reward_dir}", "env_vars": {MODULES_ENV: MODULE}}
    app = {
        "name": MODULE,
        "route_prefix": f"/{MODULE}",
        "import_path": "services.serving:build_app",
        "runtime_env": runtime_env,
        "args": {"reward": MODULE, "device": "cpu", "reward_config": config},
        # An application's runtime_env is each deployment's default (as Serve applies it to a declarative config).
        "deployments": [{"name": "reward", "ray_actor_options": {"num_cpus": 0.25, "runtime_env": runtime_env}}],
    }
    images = random_images(np.random.default_rng(0), 3)
    with served(app, fleet.grpc_target) as client:
        results = client.score(images, "a bright room")
        info = client.describe()

    monkeypatch.syspath_prepend(str(reward_dir))
    monkeypatch.setenv(MODULES_ENV, MODULE)
    reward = build_reward(MODULE, config)
    reward.load("cpu")
    expected = reward.score(images, ["a bright room"] * 3)
    assert info.name == MODULE and (info.min_reward, info.max_reward) == (0.0, 1.0)
    # Rewards cross the wire as float32.
    assert [r.reward for r in results] == [np.float32(e.reward) for e in expected]
    assert [r.components for r in results] == [{k: np.float32(v) for k, v in e.components.items()} for e in expected]

"""The local profile's alignment reward: the learned reward trained on the synthetic testbed, once, and cached.

`ensure_testbed_reward` trains it when missing or stale (seeded, a few minutes on 2 cores) and finds it cached after
that; `build_testbed_once` builds the testbed itself (stand-in CLIP, feedback) under a config stamp. Both cache
through `cache.build_once`.
"""

from __future__ import annotations

from pathlib import Path

from services.config import to_dict
from trainer.local_models.cache import build_once

# The local profile's alignment reward (deploy/local.yaml's `alignment` model_dir is TESTBED_REWARD_SPEC/reward).
TESTBED_REWARD_SPEC = "~/.cache/rewardfleet/alignment_testbed"
# Bump when the testbed or the training changes, so a cached reward is rebuilt.
TESTBED_REWARD_VERSION = 3


def ensure_testbed_reward(root: str | Path = TESTBED_REWARD_SPEC, progress: bool = False) -> Path:
    """The alignment reward trained on the synthetic testbed under `root`/reward, trained if missing or stale.

    `progress` shows one bar, for the stand-in CLIP's pretraining (most of the few minutes it takes)."""
    root = Path(root).expanduser()
    reward_dir = root / "reward"

    def build() -> None:
        from trainer.reward_config import RewardTrainingConfig
        from trainer.reward_training import train_reward

        config = RewardTrainingConfig(out_dir=str(reward_dir), testbed=str(root / "testbed"))
        build_testbed_once(config.testbed, config.seed, progress)  # train_reward finds it built
        train_reward(config, progress=False)

    stamp = {"version": TESTBED_REWARD_VERSION}
    build_once(root, stamp, build, expect=["reward/alignment_reward.json"], clean=True)
    return reward_dir


def build_testbed_once(root: str | Path, seed: int, progress: bool = True) -> dict[str, Path]:
    """The testbed under `root`, built on first use and rebuilt when its config (seed, defaults) or vocabulary changed.

    The marker file (`testbed.json`) records the config and attribute values of the finished build, and its paths.
    """
    from trainer.local_models import testbed
    from trainer.local_models.scenes import VALUES

    root = Path(root).expanduser()
    config = testbed.TestbedConfig(seed=seed)
    stamp = {"config": {**to_dict(config), "values": {k: list(v) for k, v in VALUES.items()}}}
    return build_once(
        root, stamp, lambda: testbed.build_testbed(root, config, progress=progress), marker="testbed.json"
    )

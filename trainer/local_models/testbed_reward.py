"""The local profile's alignment reward: the learned reward trained on the synthetic testbed, once, and cached.

`ensure_testbed_reward` trains it on first use (seeded, a few minutes on 2 cores) and finds it cached after that;
`build_testbed_once` builds the testbed itself (stand-in CLIP, feedback) under a config stamp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from services.config import to_dict

# The local profile's alignment reward: trained on the testbed on first use (seeded), like the tiny models.
TESTBED_REWARD_SPEC = "~/.cache/rewardfleet/alignment_testbed"
# Bump when the testbed or the training changes, so a cached reward is rebuilt.
TESTBED_REWARD_VERSION = 3


def ensure_testbed_reward(root: str | Path = TESTBED_REWARD_SPEC, progress: bool = False) -> Path:
    """The alignment reward trained on the synthetic testbed under `root`/reward, trained if missing or stale.

    `progress` shows one bar, for the stand-in CLIP's pretraining (most of the few minutes it takes)."""
    root = Path(root).expanduser()
    reward_dir = root / "reward"
    marker = root / "version.json"
    stamp = {"version": TESTBED_REWARD_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == stamp and (reward_dir / "alignment_reward.json").exists():
        return reward_dir
    if root.exists():
        shutil.rmtree(root)
    from trainer.reward_training import RewardTrainingConfig, train_reward

    config = RewardTrainingConfig(out_dir=str(reward_dir), testbed=str(root / "testbed"))
    build_testbed_once(config.testbed, config.seed, progress)  # train_reward finds it built
    train_reward(config, progress=False)
    marker.write_text(json.dumps(stamp))
    return reward_dir


def build_testbed_once(root: str | Path, seed: int, progress: bool = True) -> dict[str, Path]:
    """The testbed under `root`, built on first use and rebuilt when its config (seed, defaults) or vocabulary changed.

    The marker file records the config and attribute values of the finished build, and its paths.
    """
    from trainer.local_models.testbed import VALUES, TestbedConfig, build_testbed

    root = Path(root).expanduser()
    marker = root / "testbed.json"
    config = {**to_dict(TestbedConfig(seed=seed)), "values": {k: list(v) for k, v in VALUES.items()}}
    if marker.exists():
        built = json.loads(marker.read_text())
        if built.get("config") == config:
            return {k: root / v for k, v in built["paths"].items()}
    paths = build_testbed(root, TestbedConfig(seed=seed), progress=progress)
    relative = {k: str(Path(v).relative_to(root)) for k, v in paths.items()}
    marker.write_text(json.dumps({"config": config, "paths": relative}))
    return {k: Path(v) for k, v in paths.items()}

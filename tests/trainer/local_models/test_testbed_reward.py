"""The local profile's testbed and its alignment reward are built once and rebuilt when their config changes."""

import json
from pathlib import Path

from trainer.local_models.testbed_reward import build_testbed_once


def test_build_testbed_once_rebuilds_when_the_config_changes(tmp_path, monkeypatch):
    import trainer.local_models.testbed

    built = []

    def fake_build(root, config, progress=True):  # records the call, writes the files build_testbed would
        built.append(config.seed)
        for name in ("clip/config.json", "train/feedback.jsonl", "heldout/feedback.jsonl"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(str(config.seed))
        return {name.split("/")[0]: root / name for name in ("clip", "train/feedback.jsonl", "heldout/feedback.jsonl")}

    monkeypatch.setattr(trainer.local_models.testbed, "build_testbed", fake_build)
    paths = build_testbed_once(tmp_path, seed=0)
    assert paths["train"] == tmp_path / "train" / "feedback.jsonl" and built == [0]
    assert build_testbed_once(tmp_path, seed=0) == paths and built == [0]  # cached
    build_testbed_once(tmp_path, seed=1)  # another seed: rebuilt
    assert built == [0, 1] and paths["train"].read_text() == "1"
    # A marker from an older testbed (the paths only, no config) is stale.
    (tmp_path / "testbed.json").write_text(json.dumps({"train": "train/feedback.jsonl"}))
    build_testbed_once(tmp_path, seed=1)
    assert built == [0, 1, 1]


def test_ensure_testbed_reward_trains_once_per_version(tmp_path, monkeypatch):
    import trainer.local_models.testbed_reward as testbed_reward
    import trainer.reward_training

    trained = []

    def fake_train(config, progress=True):  # writes what a finished training leaves
        trained.append(config.out_dir)
        Path(config.out_dir).mkdir(parents=True)
        (Path(config.out_dir) / "alignment_reward.json").write_text("{}")

    monkeypatch.setattr(trainer.reward_training, "train_reward", fake_train)
    monkeypatch.setattr(testbed_reward, "build_testbed_once", lambda root, seed, progress: None)
    reward = testbed_reward.ensure_testbed_reward(tmp_path / "cache")
    assert reward == tmp_path / "cache" / "reward" and trained == [str(reward)]
    assert testbed_reward.ensure_testbed_reward(tmp_path / "cache") == reward and len(trained) == 1  # cached
    (reward / "stale.txt").write_text("")
    monkeypatch.setattr(testbed_reward, "TESTBED_REWARD_VERSION", testbed_reward.TESTBED_REWARD_VERSION + 1)
    testbed_reward.ensure_testbed_reward(tmp_path / "cache")  # another version: the directory is rebuilt afresh
    assert len(trained) == 2 and not (reward / "stale.txt").exists()

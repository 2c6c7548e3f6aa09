"""The local profile's testbed and its alignment reward are built once and rebuilt when their config changes."""

import json

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

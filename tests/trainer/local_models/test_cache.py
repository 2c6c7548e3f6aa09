"""`build_once`: a build runs once per stamp, and only a finished build is kept."""

import json

import pytest

from trainer.local_models.cache import build_once


def test_build_once_runs_once_per_stamp_and_records_paths(tmp_path):
    calls = []

    def build():
        calls.append(1)
        (tmp_path / "out.txt").write_text("built")
        return {"out": tmp_path / "out.txt"}

    assert build_once(tmp_path, {"version": 1}, build) == {"out": tmp_path / "out.txt"}
    assert json.loads((tmp_path / "version.json").read_text()) == {"version": 1, "paths": {"out": "out.txt"}}
    assert build_once(tmp_path, {"version": 1}, build) == {"out": tmp_path / "out.txt"} and len(calls) == 1
    build_once(tmp_path, {"version": 2}, build)  # another stamp: rebuilt
    build_once(tmp_path, {"version": 2}, build, force=True)
    assert len(calls) == 3
    (tmp_path / "out.txt").unlink()  # a recorded path that is gone: rebuilt
    build_once(tmp_path, {"version": 2}, build)
    assert len(calls) == 4


def test_a_failed_build_leaves_no_marker_and_clean_starts_afresh(tmp_path):
    root = tmp_path / "cache"

    def fail():
        (root / "partial").mkdir(parents=True)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        build_once(root, {"version": 1}, fail)
    assert not (root / "version.json").exists()
    build_once(root, {"version": 1}, lambda: None, clean=True, expect=["partial"])  # built: `partial` was removed
    assert not (root / "partial").exists()
    # Its `expect` file is missing, so the marker is stale: rebuilt.
    built = []
    build_once(root, {"version": 1}, lambda: built.append(1), expect=["partial"])
    assert built == [1]

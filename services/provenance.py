"""Provenance: which reward, config and weights produced a score, stamped on every response of a replica.

A replica computes its `reward.v1.Provenance` once at start (stat-ing weight files on every request would cost more
than the JPEG reward itself). Its fingerprint is SHA-256 over the reward's name, its config and the identities of its
weights, so two replicas with the same fingerprint score alike; serving limits (batch size, request limits) are not
part of it, since they do not change a score.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protos.reward.v1 import reward_pb2
from services.reward import ModelSource


def server_version() -> str:
    """The installed rewardfleet version ("unknown" when running from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("rewardfleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _local_files(root: Path) -> list[tuple[str, int, int]]:
    """(path relative to root, size, mtime in ns) of each file: identifies weights without reading gigabytes."""
    if root.is_file():
        st = root.stat()
        return [(root.name, st.st_size, st.st_mtime_ns)]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Download tools keep lock and metadata files under dot-directories; they change without the weights changing.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            st = path.stat()
            files.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return files


def _hub_commit(repo_id: str, revision: str) -> str:
    """The commit a hub revision resolves to in the local Hugging Face cache; "" when it is not cached."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    return ref.read_text().strip() if ref.is_file() else ""


def _package_version(name: str) -> str:
    """Version of an installed Python distribution of that name (models shipped on PyPI), or ""."""
    if "/" in name:
        return ""
    try:
        return importlib.metadata.version(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ""


def model_identity(model: ModelSource) -> tuple[str, dict[str, Any]]:
    """("id@revision" or "id", the identity of its weights) of a model a reward loads.

    A local file or directory is identified by each file's relative path, size and modification time; a model
    shipped in a Python package by the package version; a hub id by its revision, resolved to a commit through the
    local cache where possible.
    """
    source, revision = model.source, model.revision
    identity: dict[str, Any] = {"role": model.role, "source": source, "revision": revision}
    local = Path(source).expanduser()
    if local.exists():
        identity["files"] = _local_files(local)
    elif version := _package_version(source):
        identity["package_version"] = revision = version
    else:
        identity["commit"] = commit = _hub_commit(source, revision)
        revision = commit or revision
    return (f"{source}@{revision}" if revision else source), identity


def build_provenance(
    reward_name: str, application: str, config: dict[str, Any], models: Sequence[ModelSource]
) -> reward_pb2.Provenance:
    """The `Provenance` of a reward: its fingerprint is SHA-256 over its config and the identities of its weights."""
    model_ids, identities = [], []
    for model in models:
        if model.source:  # "" = weight-free
            model_id, identity = model_identity(model)
            model_ids.append(model_id)
            identities.append(identity)
    payload = json.dumps({"reward": reward_name, "config": config, "models": identities}, sort_keys=True, default=str)
    return reward_pb2.Provenance(
        reward_name=reward_name,
        application=application,
        model_ids=model_ids,
        fingerprint=hashlib.sha256(payload.encode()).hexdigest(),
        server_version=server_version(),
    )

"""Frozen config dataclasses built from plain dicts / YAML, rejecting unknown keys.

Every config in rewardfleet (reward configs, serving limits, trainer configs) is a frozen dataclass. `from_dict`
builds one from a dict (nested dataclasses included) and names any unknown key together with the valid ones, so a
typo in a YAML preset fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _dataclass_type(tp: Any) -> type | None:
    """The dataclass inside `tp` (plain, or `X | None`), or None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
    """Builds `cls` from `data`; nested dataclass fields are built recursively from nested dicts.

    Raises:
        ValueError: a key of `data` is not a field of `cls` (the message lists the valid keys), or `data` is not a
            mapping.
    """
    name = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{name}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        sub = _dataclass_type(hints[key])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where=f"{name}.{key}")
        elif isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (for JSON/YAML and provenance)."""
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML file that must hold a mapping."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def resolve_model_source(source: str, owner: str) -> str:
    """A model source as `from_pretrained` wants it: an existing local path (`~` expanded), else a hub id.

    A path-like source ("/", "./", "../", "~") that does not exist raises FileNotFoundError naming it and `owner`
    (the reward or component), instead of a confusing hub-id validation error.
    """
    expanded = Path(source).expanduser()
    if expanded.exists():
        return str(expanded)
    if source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{owner}: local model path {source!r} does not exist")
    return source


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies dotted `key.sub=value` overrides (values parsed as YAML: 3, 0.5, true, [1, 2], text) to a copy."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value or section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; on a command line it means the number.
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        node[leaf] = value
    return data

"""The one config system: frozen pydantic models, validated in full when they load, with a description per field.

Every config in rewardfleet (reward configs, Serve application args, trainer and testbed configs) subclasses
`Config`: unknown keys are rejected, every field is typed (enums as `Literal`, bounds as `Field(ge=...)`) and
described (`Field(description=...)`), and the whole config is checked when it loads, so a typo in a YAML preset or a
bad enum fails before any work starts. Errors name the dotted path of the field:

    FinetuneConfig.optim: unknown key(s) ['lrr']; valid keys: ['batch_size', ..., 'lr', ...]
    FinetuneConfig.selection.fusion must be one of ['borda', 'rrf'], got 'mean'

A field validator raises `ValueError("must ...")` and the path is put in front of its message; a model validator
raises a complete message. `describe_fields` lists every field with its description, for `--help` and docs.

This module also reads the files configs come from: YAML mappings, dotted `key=value` overrides, JSONL records.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="Config")


class ConfigError(ValueError):
    """A config that does not validate; the message names each offending field by its dotted path."""


class Config(BaseModel):
    """Base of every config: frozen, unknown keys rejected, validated in full at construction."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(format_errors(type(self), e, type(self).__name__)) from None

    # This __init__ only validates (as BaseModel's does): nested configs are then validated by pydantic itself, so
    # their errors keep their dotted path ("FinetuneConfig.optim.lr") instead of arriving pre-formatted.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: build a new one (services.config.replace)")


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The nested model class found by following `loc` (field names) from `cls`, or None."""
    for part in loc:
        if not isinstance(part, str) or part not in cls.model_fields:
            return None
        nested = _nested_model(cls.model_fields[part].annotation)
        if nested is None:
            return None
        cls = nested
    return cls


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def format_errors(cls: type[BaseModel], error: ValidationError, where: str) -> str:
    """One line per problem, each naming the field's dotted path (`where` first)."""
    lines: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for e in error.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith(("function-", "literal[")))
        # Union members appear in the loc (e.g. "Inner" for `Inner | None`); drop the ones that are not fields.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper() and p not in _field_names(cls)))
        if e["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        path = ".".join([where, *map(str, loc)])
        ctx = e.get("ctx") or {}
        if e["type"] == "literal_error":
            expected = [a.strip().strip("'") for a in ctx.get("expected", "").replace(" or ", ", ").split(", ")]
            lines.append(f"{path} must be one of {expected}, got {e['input']!r}")
        elif e["type"] in _BOUNDS:
            bound = next(iter(ctx.values()))
            lines.append(f"{path} must be {_BOUNDS[e['type']]} {bound}, got {e['input']!r}")
        elif e["type"] in ("value_error", "assertion_error"):
            message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"{path} {message}" if loc else message)
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            lines.append(f"{path}: expected a mapping, got {type(e['input']).__name__}")
        else:
            lines.append(f"{path}: {e['msg'].lower()}, got {e['input']!r}")
    for parent, keys in unknown.items():
        model = _model_at(cls, parent)
        valid = sorted(model.model_fields) if model is not None else []
        path = ".".join([where, *map(str, parent)])
        lines.insert(0, f"{path}: unknown key(s) {sorted(keys)}; valid keys: {valid}")
    return "\n".join(lines)


def _field_names(cls: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    stack = [cls]
    while stack:
        model = stack.pop()
        for name, info in model.model_fields.items():
            if name not in names:
                names.add(name)
                nested = _nested_model(info.annotation)
                if nested is not None:
                    stack.append(nested)
    return names


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
    """Builds and validates `cls` from a plain dict (nested dicts become nested configs).

    Raises:
        ConfigError (a ValueError): `data` is not a mapping, holds an unknown key (the message lists the valid keys),
            or a value does not validate; every problem is named by its dotted path.
    """
    name = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(cls, e, name)) from None
    except ConfigError as e:  # a nested config's own __init__ (an instance passed in) already formatted it
        raise ConfigError(f"{name}: {e}") from None


def to_dict(config: BaseModel) -> dict[str, Any]:
    """The plain-dict form of a config (for JSON/YAML, provenance and `from_dict` round trips)."""
    return config.model_dump()


def replace(config: T, **changes: Any) -> T:
    """A copy of `config` with `changes`, validated like a new one (pydantic's model_copy would not validate)."""
    return from_dict(type(config), {**to_dict(config), **changes})


def describe_fields(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, default, description) of every leaf field of `cls`, nested sections included."""
    for name, info in cls.model_fields.items():
        nested = _nested_model(info.annotation)
        if nested is not None and info.default_factory is not None:
            yield from describe_fields(nested, f"{prefix}{name}.")
            continue
        if info.is_required():
            shown = "(required)"
        else:
            default = info.get_default(call_default_factory=True)
            shown = json.dumps(default.model_dump() if isinstance(default, BaseModel) else default, default=str)
        yield f"{prefix}{name}", shown, info.description or ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML file that must hold a mapping."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def read_jsonl(
    path: str | Path, on_error: Callable[[str], None] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line of a JSONL file; a line that is not a JSON object raises
    ValueError naming the file and line.

    With `on_error`, such a line is passed to it as that message and skipped instead, so a reader can report every
    bad line of a file at once."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"{path}:{number}: not valid JSON ({e.msg})"
            else:
                if isinstance(record, dict):
                    yield number, record
                    continue
                problem = f"{path}:{number}: expected a JSON object, got {type(record).__name__}"
            if on_error is None:
                raise ValueError(problem)
            on_error(problem)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies dotted `key.sub=value` overrides (values parsed as YAML: 3, 0.5, true, [1, 2], text) to a copy."""
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

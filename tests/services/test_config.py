from dataclasses import dataclass, field

import pytest

from services.config import from_dict


@dataclass(frozen=True)
class Inner:
    # A value.
    a: int = 1


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    names: tuple[str, ...] = ()
    maybe: Inner | None = None


def test_nested_dicts_become_frozen_dataclasses():
    cfg = from_dict(Outer, {"inner": {"a": 3}, "names": ["x", "y"], "maybe": {"a": 5}})
    assert cfg == Outer(Inner(3), ("x", "y"), Inner(5))
    with pytest.raises(AttributeError):
        cfg.inner = Inner()  # frozen


def test_unknown_nested_key_names_its_path():
    with pytest.raises(ValueError, match=r"Outer\.inner: unknown key\(s\) \['b'\]; valid keys: \['a'\]"):
        from_dict(Outer, {"inner": {"b": 1}})


def test_non_mapping_is_rejected():
    with pytest.raises(ValueError, match="expected a mapping"):
        from_dict(Outer, ["inner"])

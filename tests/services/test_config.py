import pytest
from pydantic import Field

from services.config import Config, from_dict


class Inner(Config):
    a: int = Field(default=1, description="A value.")


class Outer(Config):
    inner: Inner = Field(default_factory=Inner, description="A nested section.")
    names: tuple[str, ...] = Field(default=(), description="Some names.")
    maybe: Inner | None = Field(default=None, description="An optional section.")


def test_nested_dicts_become_frozen_configs():
    cfg = from_dict(Outer, {"inner": {"a": 3}, "names": ["x", "y"], "maybe": {"a": 5}})
    assert cfg == Outer(inner=Inner(a=3), names=("x", "y"), maybe=Inner(a=5))
    with pytest.raises(AttributeError):
        cfg.inner = Inner()  # frozen


def test_unknown_nested_key_names_its_path():
    with pytest.raises(ValueError, match=r"Outer\.inner: unknown key\(s\) \['b'\]; valid keys: \['a'\]"):
        from_dict(Outer, {"inner": {"b": 1}})


def test_non_mapping_is_rejected():
    with pytest.raises(ValueError, match="expected a mapping"):
        from_dict(Outer, ["inner"])

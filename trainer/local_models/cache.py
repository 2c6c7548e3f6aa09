"""Build once, stamp a version: the one cache of the local profile's seeded models (tiny models, testbed, reward).

Every builder here is a deterministic function of its config and seed, so a finished build can be kept and reused
until what it was built from changes. `build_once` runs a build unless a marker file under its root records the same
stamp (a version number, a seed, a config), and writes the marker only after the build finished: an interrupted build
leaves no marker and is redone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def build_once(
    root: str | Path,
    stamp: dict,
    build: Callable[[], dict[str, Path] | None],
    *,
    marker: str = "version.json",
    expect: Iterable[str] = (),
    clean: bool = False,
    force: bool = False,
) -> dict[str, Path]:
    """Runs `build()` unless `root/marker` records `stamp`; returns the paths the build made (empty if it names none).

    The marker holds `stamp`, plus the paths `build()` returned, relative to `root`, under "paths"; a cached build
    returns those. A marker that records another stamp, cannot be read, or whose `expect` files (relative to `root`)
    are missing is stale.

    Args:
        clean: remove `root` before rebuilding (a build that owns its whole directory).
        force: rebuild even when the marker is current.
    """
    root = Path(root).expanduser()
    path = root / marker
    if not force and path.exists():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError:
            recorded = None
        if isinstance(recorded, dict):
            paths = {k: root / v for k, v in recorded.get("paths", {}).items()}
            current = {k: v for k, v in recorded.items() if k != "paths"} == stamp
            if current and all((root / e).exists() for e in expect) and all(p.exists() for p in paths.values()):
                return paths
    if clean and root.exists():
        shutil.rmtree(root)
    paths = {k: Path(v) for k, v in (build() or {}).items()}
    record = dict(stamp)
    if paths:
        record["paths"] = {k: str(v.relative_to(root)) for k, v in paths.items()}
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return paths

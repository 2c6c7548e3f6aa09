"""The local profile's artifacts, built in one named step: `rewardfleet build-local`.

The local profile (deploy/local.yaml) points at models under ~/.cache/rewardfleet, all seeded, so every machine
builds the same weights:

- ~/.cache/rewardfleet/tiny: the tiny models the caption and semantic rewards serve (`tiny.save_tiny_models`,
  seconds);
- ~/.cache/rewardfleet/alignment_testbed/reward: the alignment reward trained on the synthetic testbed
  (`testbed_reward.ensure_testbed_reward`, a few minutes on 2 cores);
- ~/.cache/rewardfleet/world: the testbed world's trained text-to-image model and captioner, copied from the
  weights shipped in the package, and the fine-tuning job's prompt files and pre-training pairs
  (`world.install_world`, seconds).

`rewardfleet build-local` builds them; `rewardfleet serve` (with the local profile), `make demo` and `make test` call
it first. Each part is cached with a version stamp, so later calls return at once.
"""

from __future__ import annotations

from pathlib import Path

from trainer.local_models.testbed_reward import TESTBED_REWARD_SPEC, ensure_testbed_reward
from trainer.local_models.tiny import TINY_ROOT, save_tiny_models
from trainer.local_models.world import WORLD_ROOT, install_world


def build_local_artifacts(progress: bool = False, *, alignment: bool = True) -> dict[str, Path]:
    """Builds (or finds cached) every model the local profile serves; returns {name: path}.

    `progress`: one progress bar for the testbed reward's first build. `alignment=False` skips the testbed reward,
    for a fleet that serves another alignment reward directory (the tests serve one trained on a tiny testbed).
    """
    paths = {f"tiny/{name}": path for name, path in save_tiny_models(TINY_ROOT).items()}
    paths.update({f"world/{name}": path for name, path in install_world(WORLD_ROOT).items()})
    if alignment:
        paths["alignment"] = ensure_testbed_reward(TESTBED_REWARD_SPEC, progress=progress)
    return paths

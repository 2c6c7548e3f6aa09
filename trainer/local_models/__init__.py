"""The local profile's models: tiny seeded builders of the real architectures, and the synthetic testbed.

The local profile (`deploy/local.yaml`, `trainer/configs/local.yaml`) serves and fine-tunes small models built here
offline: seeded, so every node builds the same weights. Its model paths point at ~/.cache/rewardfleet, built by
`rewardfleet build-local` (`artifacts.build_local_artifacts`, the one named step; `rewardfleet serve` with the local
profile, `make demo` and `make test` call it). Tests build their tiny models here too. No reward imports this
package: a reward only sees the paths its config names.

- `tiny`: tiny seeded models (BLIP-2, CLIP, Llama, SAM, Stable Diffusion) and `save_tiny_models`;
- `real_width`, `tokenizers`: the cluster profile's models at their released widths, for the real-architecture tests;
- `scenes`, `testbed`, `testbed_reward`: the synthetic feedback testbed and the alignment reward trained on it;
- `cache`: `build_once`, the version-stamped cache every builder here writes through;
- `artifacts`: `build_local_artifacts`.
"""

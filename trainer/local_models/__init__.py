"""The local profile's models: tiny seeded builders of the real architectures, and the synthetic testbed.

The local profile (`deploy/local.yaml`, `trainer/configs/local.yaml`) serves and fine-tunes small models built here
offline: seeded, so every node builds the same weights. `artifacts.build_local_artifacts` is the one named step that
builds and caches them (`rewardfleet build-local`; `rewardfleet serve` with the local profile, `make demo` and
`make test` call it). Tests build their tiny models here too. No reward imports this package: a reward only sees the
paths its config names.
"""

# rewardfleet: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-cluster lint protos bench clean

venv: $(STAMP)

# Reinstalled whenever pyproject.toml changes. Bytecode is compiled after the install, on every core (pip compiles on
# one: 116 + 45 s here instead of 193 s); without it the suite's first Ray workers each compiled torch and
# transformers on their own. A file written in newer Python than the venv's (torch ships one) does not compile, as
# under pip, hence `|| true`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

# Build the local profile's models (once), start the local fleet (embedded CPU profile), score example images over
# gRPC, print the scores, fine-tune for 3 rounds, shut down.
demo: venv
	$(BIN)/python -m deploy.demo

# Lint, then the whole suite (real local Ray cluster, Serve and gRPC on 127.0.0.1; no network, no GPU). The suite
# builds the local models it serves (~/.cache/rewardfleet, once) but not the profile's testbed alignment reward, which
# takes minutes: the test fleet serves one trained on a tiny testbed (tests/conftest.py).
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not cluster_full"

# The multi-node tests at full length (`--cluster-full`): every ramp, kill and hold, the CUDA-less replica and the
# fine-tuning job on 2 nodes. `make test` runs the others shorter (one ramp, one node kill, 10 s of overload).
test-cluster: venv
	$(BIN)/python -m pytest -q -m cluster --cluster-full

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerate the committed gRPC stubs from protos/reward/v1/reward.proto (package-absolute imports).
protos: venv
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/reward/v1/reward.proto

# Serving benchmark: served vs in-process, batched vs unbatched, raw vs PNG (see benchmarks/README.md).
bench: venv
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) demo_out runs .pytest_cache .hypothesis

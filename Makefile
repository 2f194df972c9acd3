# `make example` / `make test` work on a fresh machine: each sets up ./.venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_INTERPRET := 1

.PHONY: setup setup-bench example test bench bench-quick bench-speed

setup:
	EXTRAS=test bash tools/setup_env.sh

setup-bench:
	EXTRAS=test,bench bash tools/setup_env.sh

example: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q

bench: setup-bench
	$(PY) -m vlm_compress.bench

bench-quick: setup-bench
	$(PY) -m vlm_compress.bench --quick

bench-speed: setup-bench
	$(PY) eval/speed_bench.py

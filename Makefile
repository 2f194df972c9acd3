# `make bench` / `make test` work on a fresh machine: each sets up ./.venv first (tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,bench,lmms
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_INTERPRET := 1

.PHONY: setup example test bench bench-quick bench-speed train-tiny

setup:
	EXTRAS=$(EXTRAS) bash tools/setup_env.sh

example: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m vlm_compress.bench

bench-quick: setup
	$(PY) -m vlm_compress.bench --quick

bench-speed: setup
	$(PY) eval/speed_bench.py

# Reproduce the shipped tiny-llava from scratch (see its train_log.json for the recorded runs).
train-tiny: setup
	$(PY) -m vlm_compress.bench.train --out vlm_compress/assets/tiny-llava --minutes 30
	$(PY) -m vlm_compress.bench.train --out vlm_compress/assets/tiny-llava --minutes 60 --resume --freeze-vision --lr 5e-4 --warmup 50

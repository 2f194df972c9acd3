#!/usr/bin/env bash
# Create ./.venv and install vlm-compress with the extras in $EXTRAS (default: test).
# torch comes first: an existing torch (e.g. a CUDA build on a GPU box) is kept and pinned; where none is
# installed, torch==2.13.0 (the CPU build on these machines). The pin stops pip from replacing torch with the
# newest CUDA wheel when a dependency asks for torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > constraints.txt
"$PY" -m pip install --quiet -c constraints.txt -e ".[${EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip check
"$PY" tools/torchvision_cpu_shim.py
"$PY" -c "import torch, transformers, vlm_compress; print('torch', torch.__version__, '| transformers', transformers.__version__, '| vlm_compress', vlm_compress.__version__)"

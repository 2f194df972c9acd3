"""Make ``import torchvision`` work on a CPU-only torch when pip brought a CUDA torchvision wheel.

PyPI has no CPU torchvision for torch 2.13; the CUDA wheel's ``_C.so`` cannot load there and torchvision's
import then dies on ``register_fake("torchvision::nms")``. The fix (environment reference §1) declares the
``nms``/``qnms`` op schemas before torchvision is first imported, via a ``.pth`` import hook.

``python tools/torchvision_cpu_shim.py`` installs the hook into this interpreter's site-packages only when
torchvision is installed *and* fails to import; on GPU installs (matching CUDA torch) it does nothing.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

SHIM = '''\
"""Installed by vlm-compress tools/torchvision_cpu_shim.py: declares torchvision C++ op schemas on CPU-only torch."""
import importlib.abc, importlib.util, os, sys
_lib = None
class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            _fix()
        except Exception:
            pass
        return None
def _fix():
    global _lib
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch
    so = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(so)
        return
    except (OSError, ImportError, RuntimeError):
        pass
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            _lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            pass
if not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
'''


def _imports(module: str) -> bool | None:
    """True if importable, False if installed but broken, None if not installed."""
    probe = f"import importlib.util,sys; sys.exit(3 if importlib.util.find_spec('{module}') is None else 0); "
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 3:
        return None
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def main() -> int:
    state = _imports("torchvision")
    if state is None:
        print("torchvision not installed: no shim needed")
        return 0
    if state:
        print("torchvision imports fine: no shim needed")
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    (site / "_tv_cpu_shim.py").write_text(SHIM)
    (site / "_tv_cpu_shim.pth").write_text("import _tv_cpu_shim\n")
    if not _imports("torchvision"):
        print("torchvision still fails to import after installing the shim", file=sys.stderr)
        return 1
    print(f"installed the torchvision CPU shim into {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

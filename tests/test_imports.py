"""Every module of the package imports (training and benchmark scripts included, which no other test runs whole)."""

import importlib
import pkgutil

import pytest

import vlm_compress

# the vLLM plugin's model classes import vLLM, which lives in its own venv: tests_vllm/ imports them (make test-vllm)
VLLM_ONLY = {"vlm_compress.integrations.vllm_models"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(vlm_compress.__path__, "vlm_compress.")
                 if not m.name.endswith(".__main__") and m.name not in VLLM_ONLY)  # __main__: runs its program


def test_the_walk_finds_the_package():
    assert {"vlm_compress.compat", "vlm_compress.bench.train", "vlm_compress.stages.prefill"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)

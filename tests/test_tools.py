"""The maintenance tools: the drift alarm's report (tools/check_latest.py) and the lock's format."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="0" tests="3">
<testcase classname="tests.test_lmms_eval" name="test_run"><error message="failed on setup with &quot;ModuleNotFoundError: No module named 'filelock._api'&quot;">
  File "/x/.venv-latest/lib/python3.11/site-packages/lmms_eval/evaluator.py", line 5, in simple_evaluate
    from filelock._api import FileLock
ModuleNotFoundError: No module named 'filelock._api'</error></testcase>
<testcase classname="tests.test_prefill" name="test_decode"><failure message="RuntimeError: The size of tensor a (49) must match">
  File "/x/vlm_compress/stages/prefill.py", line 9, in forward
  File "/x/.venv-latest/lib/python3.11/site-packages/transformers/models/llama/modeling_llama.py", line 7, in forward
  File "/x/.venv-latest/lib/python3.11/site-packages/torch/nn/functional.py", line 3, in sdpa
RuntimeError: The size of tensor a (49) must match</failure></testcase>
<testcase classname="tests.test_api" name="test_ok"/>
</testsuite></testsuites>
"""


def test_failures_are_read_and_blamed_on_the_changed_package(tmp_path):
    tool = load_tool("check_latest")
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    counts, failed = tool.failures(junit)
    assert counts == {"tests": 3, "failures": 1, "errors": 1, "skipped": 0}
    assert [f["test"] for f in failed] == ["tests/test_lmms_eval.py::test_run", "tests/test_prefill.py::test_decode"]
    changed = {"filelock", "transformers"}
    modules = {"lmms_eval": ["lmms-eval"], "filelock": ["filelock"], "transformers": ["transformers"], "torch": ["torch"]}
    assert tool.blame(failed[0]["text"], changed, modules) == "filelock"  # the module the ImportError names
    assert tool.blame(failed[1]["text"], changed, modules) == "transformers"  # the changed package in the traceback
    assert tool.blame(failed[1]["text"], set(), modules) == "torch (unchanged)"
    assert tool.blame("AssertionError", changed, modules) == "vlm-compress (no third-party frame)"


def test_the_summary_names_changed_packages_and_failures_by_package(tmp_path):
    tool = load_tool("check_latest")
    result = {
        "date": "today", "python": "3.11", "torch": "2.13.0", "summary": "1 passed, 1 failed", "counts": {},
        "install_seconds": 60, "test_seconds": 120, "install_error": "",
        "changed": [{"package": "filelock", "lock": "3.32.7", "latest": "4.3.1"}],
        "failed": [{"test": "tests/test_lmms_eval.py::test_run", "message": "No module named 'filelock._api'",
                    "package": "filelock"}],
    }
    text = tool.summarise(result)
    assert "| filelock | 3.32.7 | 4.3.1 |" in text
    assert "- **filelock**: 1 test(s)" in text and "`tests/test_lmms_eval.py::test_run`" in text


def test_requirement_names_cover_the_extras_without_versions():
    tool = load_tool("check_latest")
    names = tool.requirement_names()
    assert {"transformers", "lmms-eval", "filelock", "gradio", "pytest", "peft"} <= set(names)
    assert "torch" not in names and not any("<" in n or ">" in n or "=" in n for n in names)


def test_the_lock_pins_every_line_exactly():
    lines = [line for line in (ROOT / "requirements" / "lock-cpu.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) > 50 and all("==" in line and ";" not in line for line in lines)
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert len(names) == len(set(names))
    assert "filelock==4" not in "\n".join(lines)  # lmms-eval 0.7.3 cannot import filelock 4

"""The drift alarm (``make check-latest``): the newest release of every dependency, the whole suite, what broke.

Builds a throwaway venv (``.venv-latest``) with the newest releases of every package vlm-compress and its test,
bench, lmms and demo extras name, ignoring pyproject.toml's ceilings and the lock; installs vlm-compress there
without dependencies; runs the test suite; and prints a one-screen summary: the packages whose version differs
from the lock, and every failing test grouped by the changed package its traceback runs through (or the module
an ImportError names). The summary is also written to ``eval/results/check_latest.{md,json}``.

torch stays at the lock's version: newer torch wheels on the package index are CUDA builds (gigabytes), which
these CPU machines cannot use; everything else, triton included, is the newest release.

Standard library only: run it with any Python 3.11+ (``python3 tools/check_latest.py [--keep]``).
Exit status: 0 when the suite passes on the newest releases, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"
EXTRAS = ("test", "bench", "lmms", "demo")
RESULTS = ROOT / "eval" / "results"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """``{canonical name: version}`` of ``name==version`` lines."""
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def requirement_names() -> list[str]:
    """The names (with extras, without versions) of vlm-compress's dependencies and the extras ``make test`` uses."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in EXTRAS:
        specs += project["optional-dependencies"][extra]
    names = []
    for spec in specs:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+(\[[^\]]*\])?)", spec)
        if match and canonical(match.group(1).split("[")[0]) != "torch":
            names.append(match.group(1))
    return list(dict.fromkeys(names))


def sh(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: int | None = None) -> int:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            return 124


def failures(junit: Path) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Counts and failed test cases (id, first error line, full text) of a pytest JUnit XML report."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            text = (bad.text or "") + "\n" + (bad.get("message") or "")
            message = (bad.get("message") or "").strip() or (text.strip().splitlines() or [""])[-1]
            module = case.get("classname", "")
            path = module.replace(".", "/") + ".py" if module else "?"
            failed.append({"test": f"{path}::{case.get('name', '')}", "kind": bad.tag,
                           "message": message.splitlines()[0][:200], "text": text})
    return counts, failed


def blame(text: str, changed: set[str], module_to_dist: dict[str, list[str]]) -> str:
    """The changed package a failure runs through: a module an ImportError names, else the last changed package
    in the traceback, else the last third-party package in it, else vlm_compress itself."""
    named = re.findall(r"No module named '([\w.]+)'|cannot import name '\w+' from '([\w.]+)'", text)
    frames = re.findall(r"site-packages/([A-Za-z_][\w]*)", text)
    candidates = [m or n for m, n in named] + frames[::-1]
    dists = [canonical(d) for module in candidates for d in module_to_dist.get(module.split(".")[0], [module.split(".")[0]])]
    for dist in dists:
        if dist in changed:
            return dist
    for dist in dists:
        if dist not in ("pytest", "pluggy", "-pytest"):
            return f"{dist} (unchanged)"
    return "vlm-compress (no third-party frame)"


def summarise(result: dict) -> str:
    lines = [
        f"# `make check-latest`: the suite on the newest releases ({result['date']})",
        "",
        f"Python {result['python']}; torch held at {result['torch']} (CPU). Suite: **{result['summary']}** "
        f"in {result['test_seconds']:.0f} s (install {result['install_seconds']:.0f} s).",
        "",
    ]
    if result["install_error"]:
        lines += ["**The newest releases do not install together:**", "", "```", result["install_error"], "```", ""]
    changed = result["changed"]
    lines += [f"Packages newer (or older) than the lock: {len(changed)}", ""]
    if changed:
        lines += ["| package | lock | latest |", "|---|---|---|"]
        lines += [f"| {c['package']} | {c['lock'] or '—'} | {c['latest'] or '—'} |" for c in changed]
        lines.append("")
    if result["failed"]:
        lines += ["Failures by package:", ""]
        by_package: dict[str, list[dict]] = {}
        for f in result["failed"]:
            by_package.setdefault(f["package"], []).append(f)
        for package, items in sorted(by_package.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- **{package}**: {len(items)} test(s)")
            for f in items[:6]:
                lines.append(f"  - `{f['test']}`: {f['message']}")
            if len(items) > 6:
                lines.append(f"  - … and {len(items) - 6} more")
        lines.append("")
    else:
        lines += ["No test failed.", ""]
    lines += ["To move forward: fix `vlm_compress/compat.py` (or the range in `pyproject.toml`), `make lock`, then "
              "`make test` and `make test-oldest` (README, \"Dependencies\")."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv-latest"))
    parser.add_argument("--keep", action="store_true", help="keep the venv afterwards (default: delete it)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the test suite")
    parser.add_argument("--out", default=str(RESULTS / "check_latest"), help="output stem (.md and .json)")
    args = parser.parse_args(argv)

    venv, log = Path(args.venv), Path(args.out).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    shutil.rmtree(venv, ignore_errors=True)
    py = str(venv / "bin" / "python")
    locked = pins(LOCK.read_text().splitlines())
    started = time.time()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    sh([py, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"], log)
    names = requirement_names()
    print(f"installing the newest releases of {len(names)} requirements into {venv} (log: {log}) ...", flush=True)
    code = sh([py, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", f"torch=={locked['torch']}", *names], log)
    install_error = ""
    if code != 0:
        install_error = "\n".join(line for line in log.read_text().splitlines()[-15:] if "WARNING: Location" not in line)
    sh([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."], log)
    sh([py, "tools/torchvision_cpu_shim.py"], log)
    freeze = subprocess.run([py, "-m", "pip", "freeze", "--all", "--exclude-editable"], capture_output=True, text=True).stdout
    latest = pins(freeze.splitlines())
    latest = {k: v.split("+")[0] if k == "torch" else v for k, v in latest.items() if k not in ("pip", "vlm-compress")}
    changed = [{"package": name, "lock": locked.get(name), "latest": latest.get(name)}
               for name in sorted({*locked, *latest}) if locked.get(name) != latest.get(name)]
    mapping = subprocess.run(
        [py, "-c", "import json, importlib.metadata as m; print(json.dumps(m.packages_distributions()))"],
        capture_output=True, text=True,
    ).stdout
    module_to_dist = json.loads(mapping) if mapping.strip() else {}
    install_seconds = time.time() - started

    junit = venv / "junit.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    started = time.time()
    print("running the test suite on them ...", flush=True)
    sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"], log, env=env, timeout=args.timeout)
    test_seconds = time.time() - started
    if junit.exists():
        counts, failed = failures(junit)
        summary = (f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} passed, "
                   f"{counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped")
    else:
        counts, failed, summary = {}, [], "the suite did not run (see the log)"
    changed_names = {c["package"] for c in changed}
    for f in failed:
        f["package"] = blame(f.pop("text"), changed_names, module_to_dist)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0], "torch": latest.get("torch"), "summary": summary, "counts": counts,
        "install_seconds": install_seconds, "test_seconds": test_seconds, "install_error": install_error,
        "changed": changed, "failed": failed,
    }
    text = summarise(result)
    Path(args.out).with_suffix(".md").write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    if not args.keep:
        shutil.rmtree(venv, ignore_errors=True)
    return 0 if junit.exists() and not failed and not install_error else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's partial results: one JSON line per finished (method, budget), written as soon as it finishes.

The first line holds the run's settings; every later line is a measured row (its raw answers and costs) or an
error row (``{"method", "budget", "error"}``). A crashed or interrupted run loses nothing it had finished, and
``--resume`` re-uses every measured row of a file written with the same settings (error rows are run again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class SettingsMismatch(ValueError):
    """``--resume`` on a partial file written with other settings."""


class RowLog:
    """Append-only JSON-lines record of one benchmark run on one model.

    path: the ``.rows.jsonl`` file. settings: what makes rows comparable (model, samples, dataset, dtype, ...).
    resume: keep the measured rows already in ``path`` (settings must match); otherwise start the file anew.
    """

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool):
        self.path = Path(path)
        self.settings = settings
        self.records: dict[tuple[str, float], dict[str, Any]] = {}
        if resume and self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n")

    def _load(self) -> None:
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if not lines or "settings" not in lines[0]:
            raise SettingsMismatch(f"{self.path} is not a benchmark rows file: delete it or drop --resume")
        written = lines[0]["settings"]
        if written != self.settings:
            changed = sorted(k for k in {*written, *self.settings} if written.get(k) != self.settings.get(k))
            raise SettingsMismatch(
                f"{self.path} was written with other settings ({', '.join(changed)} differ): "
                "delete it, or drop --resume to start over"
            )
        for record in lines[1:]:
            if "error" not in record:
                self.records[self.key(record["method"], record["budget"])] = record
        # rewrite without the error rows, which are run again
        self.path.write_text("".join(json.dumps(line) + "\n" for line in [lines[0], *self.records.values()]))

    @staticmethod
    def key(method: str, budget: float | str) -> tuple[str, float | str]:
        return method, budget if isinstance(budget, str) else float(budget)  # "auto": a budget of its own

    def done(self, method: str, budget: float) -> dict[str, Any] | None:
        """The measured record of (method, budget), if this file has one."""
        return self.records.get(self.key(method, budget))

    def add(self, record: dict[str, Any]) -> None:
        """Append a measured row (``method``, ``budget`` and its raw measurements)."""
        self.records[self.key(record["method"], record["budget"])] = record
        self._append(record)

    def add_error(self, method: str, budget: float, error: BaseException) -> dict[str, Any]:
        """Append an error row: the (method, budget) raised ``error``; the run goes on."""
        record = {"method": method, "budget": budget, "error": f"{type(error).__name__}: {error}"}
        self._append(record)
        return record

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

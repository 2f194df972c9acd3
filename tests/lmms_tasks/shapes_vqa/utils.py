"""Hooks of the ``shapes_vqa`` lmms-eval task, and the writer of their local data file.

The data file ``shapes_vqa.parquet`` (held-out ShapesVQA items) lives next to the YAML. lmms-eval imports this
module when it reads the task, before it loads the data: a missing file is written then (8 items), so
``lmms-eval --include_path tests/lmms_tasks --tasks shapes_vqa ...`` runs offline from a fresh clone.
``python tests/lmms_tasks/shapes_vqa/utils.py [N]`` rewrites it with N items. The tests use a temporary copy.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

DATA_FILE = "shapes_vqa.parquet"


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["question"]


def write_dataset(folder: str | Path, count: int = 8) -> Path:
    """Write ``count`` held-out ShapesVQA items (96×96 images) to ``folder/shapes_vqa.parquet``; return its path."""
    import datasets

    from vlm_compress.bench.data import shapes_items

    items = shapes_items(count)
    features = datasets.Features(
        image=datasets.Image(), question=datasets.Value("string"), answer=datasets.Value("string"),
        qtype=datasets.Value("string"),
    )
    table = datasets.Dataset.from_dict(
        dict(image=[i.image for i in items], question=[i.question for i in items],
             answer=[i.answer for i in items], qtype=[i.qtype for i in items]),
        features=features,
    )
    path = Path(folder) / DATA_FILE
    table.to_parquet(str(path))
    return path


def ensure_dataset(folder: str | Path, count: int = 8) -> Path:
    """``folder/shapes_vqa.parquet``, written first if it is missing (with its absolute path in the message)."""
    path = Path(folder).resolve() / DATA_FILE
    if not path.exists():
        print(f"shapes_vqa: writing {count} held-out items to {path}", file=sys.stderr)
        write_dataset(path.parent, count)
    return path


if __name__ == "__main__":
    print(write_dataset(Path(__file__).parent, int(sys.argv[1]) if len(sys.argv) > 1 else 8))
else:  # imported by lmms-eval while it reads the task: the data must exist before it loads it
    ensure_dataset(Path(__file__).parent)

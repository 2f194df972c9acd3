"""Hooks of the ``shapes_vqa`` lmms-eval task, and the writer of their local data file.

``python tests/lmms_tasks/shapes_vqa/utils.py [N]`` writes ``shapes_vqa.parquet`` (N held-out ShapesVQA items,
default 8) next to the YAMLs; then ``lmms-eval --include_path tests/lmms_tasks --tasks shapes_vqa ...`` runs
offline. The tests write a copy of this folder to a temporary directory instead.
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


if __name__ == "__main__":
    print(write_dataset(Path(__file__).parent, int(sys.argv[1]) if len(sys.argv) > 1 else 8))

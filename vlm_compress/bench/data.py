"""Benchmark items: the held-out ShapesVQA split (clips of the ShapesVideo split for a video model), or a local JSONL
of (image, question, answer)."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .task import ShapesTask
from .video_task import ShapesVideoTask

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclasses.dataclass
class Item:
    image: Image.Image | None
    question: str
    answer: str
    qtype: str = "all"
    video: np.ndarray | None = None  # [F, H, W, 3] uint8, instead of an image
    objects: list | None = None  # the scene's SceneObjects (ShapesVQA), for the bench's oracle row
    grid: tuple[int, int] | None = None  # the scene's (rows, cols) cell grid


EMBEDDED_MODELS = ("tiny-llava", "tiny-llava-next", "tiny-onevision", "tiny-qwen2-vl")
# built on the user's machine from two installed packages and a shipped part (vlm_compress.pretrained)
BUILT_MODELS = ("tiny-real-llava",)


def built_model_available(name: str) -> bool:
    """Whether a built model's source packages are installed (so :func:`resolve_model` can build it)."""
    from ..pretrained import sources

    return name in BUILT_MODELS and all(p.installed() for p in sources.PACKAGES)


def resolve_model(name_or_path: str | Path, progress=print) -> Path:
    """A checkpoint directory from a path, an embedded model's name (``tiny-llava``) or a built model's name
    (``tiny-real-llava``: built and cached once, :func:`vlm_compress.pretrained.tiny_real_llava.model_path`)."""
    text = str(name_or_path)
    if text in BUILT_MODELS and not Path(text).exists():
        from ..pretrained import tiny_real_llava

        return tiny_real_llava.model_path(progress)
    if text in EMBEDDED_MODELS and not Path(text).exists():
        return ASSETS / text
    return Path(text).expanduser()


def prompt_for(model_path: str | Path | None) -> str | None:
    """The prompt (with ``{question}``) a model was trained with, from its ``task.json``'s ``prompt``; ``None`` when
    it names none (the embedded models use LLaVA's ``USER: <image>\n{question} ASSISTANT:``)."""
    spec = Path(model_path) / "task.json" if model_path else None
    if spec is None or not spec.is_file():
        return None
    return json.loads(spec.read_text()).get("prompt")


def shapes_items(count: int, split: str = "test", task: ShapesTask | None = None, images: bool = True) -> list[Item]:
    """``count`` items of a ShapesVQA split; ``images=False`` leaves ``image`` as ``None`` (for answer statistics)."""
    task = task or ShapesTask()
    return [Item(Image.fromarray(s.image) if images else None, s.question, s.answer, s.qtype, objects=s.objects,
                 grid=(task.rows, task.cols)) for s in task.iterate(split, count, render=images)]


def video_items(count: int, split: str, task: ShapesVideoTask) -> list[Item]:
    """``count`` clips of a ShapesVideo split."""
    return [Item(None, s.question, s.answer, s.qtype, video=s.frames) for s in task.iterate(split, count)]


def task_for(model_path: str | Path, config) -> ShapesTask | ShapesVideoTask:
    """The task a model was trained on: its ``task.json`` if present (a clip task when it names ``frames``), else
    ShapesVQA with one grid cell per patch."""
    spec = Path(model_path) / "task.json"
    if spec.exists():
        description = json.loads(spec.read_text())
        if "frames" in description:
            return ShapesVideoTask.from_description(description)
        return ShapesTask.from_description(description)
    return ShapesTask(canvas=config.vision_config.image_size, cell=config.vision_config.patch_size)


def jsonl_items(path: str | Path, count: int | None = None) -> list[Item]:
    """Lines of ``{"image": path, "question": str, "answer": str[, "type": str]}``; image paths are relative to the file."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image = Image.open(path.parent / row["image"]).convert("RGB")
            items.append(Item(image, row["question"], str(row["answer"]), row.get("type", "all")))
        except (KeyError, json.JSONDecodeError, OSError) as err:
            raise ValueError(f"{path}:{n + 1}: expected a JSON line with image, question, answer ({err})") from err
        if count is not None and len(items) >= count:
            break
    return items


def answer_prior(train: list[Item], test: list[Item]) -> float:
    """Accuracy of answering each question type with its most frequent training answer."""
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    overall = collections.Counter()
    for item in train:
        by_type[item.qtype][item.answer] += 1
        overall[item.answer] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    fallback = overall.most_common(1)[0][0]
    return sum(guess.get(i.qtype, fallback) == i.answer for i in test) / max(len(test), 1)

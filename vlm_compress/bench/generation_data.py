"""Class-conditional scenes for the image generators of :mod:`vlm_compress.speculative` (the ImageNet of this toolkit).

A class is a (shape, colour) pair, 3 × 6 = 18 classes; a scene of class ``c`` holds 2–4 objects, every one of them
of that shape and colour, on the textured-noise canvas of the ShapesVQA scenes at 64×64 (8-pixel cells, the same
renderer as :mod:`.tokenizer_data`). The class is drawn uniformly; every sample is a pure function of
``(split, index)``, with train/val/test on disjoint seed streams (and disjoint from the VQA task's).
"""

from __future__ import annotations

import numpy as np

from .task import COLORS, SHAPES, SPLIT_SEEDS, ShapesTask

CLASSES: tuple[tuple[str, str], ...] = tuple((shape, color) for shape in SHAPES for color in COLORS)
CLASS_NAMES: tuple[str, ...] = tuple(f"{color} {shape}" for shape, color in CLASSES)
NUM_CLASSES = len(CLASSES)
OBJECTS = (2, 4)
SCENES = ShapesTask(canvas=64, cell=8, objects=OBJECTS)
STREAM = 17  # the seed stream of these scenes, apart from the VQA task's


def class_scene(split: str, index: int, label: int | None = None) -> tuple[np.ndarray, int]:
    """The ``index``-th scene of ``split``: ``(image [64, 64, 3] uint8, class)``; ``label`` forces the class."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], STREAM, index])
    label = int(rng.integers(NUM_CLASSES)) if label is None else int(label)
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"class must lie in [0, {NUM_CLASSES}), got {label}")
    count = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    scene = SCENES.render_scene([CLASSES[label]] * count, rng)
    if scene is None:  # pragma: no cover - 4 objects always fit an 8×8 grid
        raise RuntimeError("could not place the objects")
    return scene[0], label


def class_scenes(split: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``start .. start+count-1`` of ``split``: ``(images [count, 64, 64, 3] uint8, classes [count] int64)``."""
    pairs = [class_scene(split, i) for i in range(start, start + count)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)

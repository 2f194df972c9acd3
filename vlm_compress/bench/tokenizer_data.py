"""The images the embedded image tokenizers train and are measured on: 64×64 ShapesVQA scenes.

The same procedural scenes as the VQA task (textured noise, 2–5 small coloured shapes), rendered at 64×64 with an
8-pixel grid; train/val/test draw from disjoint seed streams (:meth:`ShapesTask.sample_at`).
"""

from __future__ import annotations

import numpy as np

from .task import ShapesTask

SCENES = ShapesTask(canvas=64, cell=8, objects=(2, 5))


def scene_images(split: str, start: int, count: int) -> np.ndarray:
    """``[count, 64, 64, 3]`` uint8: scenes ``start .. start+count-1`` of ``split``."""
    return np.stack([SCENES.sample_at(split, i).image for i in range(start, start + count)])

"""The bench's oracle row: keep the visual tokens that show the objects a question names, fill the rest of the
budget by CLS attention. Not a user method (not registered): it reads the scene, which no model input carries.

On ShapesVQA every answer lives in the cells of one or a few objects (``bench/task.py``), so the oracle is the
ceiling a method that only chooses tokens can reach at a budget: the gap between a method and the oracle is what
its scores miss. The objects a question names are those whose shape or colour it mentions, or that lie in the
quadrant it names ("what color is the object at the top left ?"); for a "no" answer these are the distractors that
must be ruled out, and a question naming nothing (none on ShapesVQA) falls back to CLS attention alone.

A token shows an object when its cell of its grid (the base grid, the thumbnail, or the unpadded high-resolution
grid under AnyRes; Qwen's merged grid) overlaps the object's cell of the scene grid, both in relative image
coordinates (the unpadded AnyRes grid and the thumbnail both cover the whole image). The filler score is
:meth:`EncoderContext.cls_attention` at ViT layer −2, heads summed (the substitute without CLS on Qwen towers).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..adapters.base import TokenLayout
from ..pruners.base import EncoderContext, EncoderPruner, EncoderSelection
from .task import COLORS, QUADRANTS, SHAPES, SceneObject

Box = tuple[float, float, float, float]  # (top, bottom, left, right), relative to the image, half-open


def asked_objects(question: str, objects: Sequence[SceneObject], grid: tuple[int, int]) -> list[SceneObject]:
    """The objects of the scene (on a ``grid`` of ``(rows, cols)`` cells) that ``question`` names."""
    words = f" {question.lower()} "
    quadrant = next((q for q in QUADRANTS if f" {q} " in words), None)
    if quadrant is not None:
        rows, cols = grid
        return [o for o in objects if _quadrant(o, rows, cols) == quadrant]
    shapes = {s for s in SHAPES if f" {s} " in words}
    colors = {c for c in COLORS if f" {c} " in words}
    return [o for o in objects if o.shape in shapes or o.color in colors]


def _quadrant(obj: SceneObject, rows: int, cols: int) -> str:
    return f"{'top' if obj.row < rows / 2 else 'bottom'} {'left' if obj.col < cols / 2 else 'right'}"


def object_boxes(objects: Sequence[SceneObject], grid: tuple[int, int]) -> list[Box]:
    rows, cols = grid
    return [(o.row / rows, (o.row + 1) / rows, o.col / cols, (o.col + 1) / cols) for o in objects]


def tokens_showing(layout: TokenLayout, boxes: Sequence[Box]) -> torch.Tensor:
    """``[N]`` bool: the tokens whose grid cell overlaps any of ``boxes`` (newlines and CLS never)."""
    out = torch.zeros(layout.num_tokens, dtype=torch.bool)
    for partition, (rows, cols) in layout.grids.items():
        members = (layout.partition == partition).nonzero().squeeze(1)
        r, c = layout.cell[members, 0].double(), layout.cell[members, 1].double()
        for top, bottom, left, right in boxes:
            hit = (r / rows < bottom) & ((r + 1) / rows > top) & (c / cols < right) & ((c + 1) / cols > left)
            out[members[hit]] = True
    return out


@dataclasses.dataclass
class OraclePruner(EncoderPruner):
    """Set :attr:`boxes` (one list of :data:`Box` per image of the next call, in placeholder order) before each call."""

    name = "oracle"

    layer: int = dataclasses.field(default=-2, metadata={"help": "ViT layer of the filler CLS attention."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.boxes: list[list[Box]] = []

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        if len(self.boxes) != ctx.features.shape[0]:
            raise RuntimeError(f"the oracle has boxes for {len(self.boxes)} images, the call has "
                               f"{ctx.features.shape[0]}: set OraclePruner.boxes per call (bench at batch 1)")
        scores = ctx.cls_attention(self.layer, "sum", "probs")
        shown = torch.stack([tokens_showing(ctx.layout, b) for b in self.boxes]).to(scores.device)
        priority = torch.where(shown & torch.isfinite(scores), scores + 1e6, scores)
        return EncoderSelection.top_k(ctx.features, priority, ctx.uniform_keep())

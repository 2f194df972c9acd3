"""``pool``: 2-D average pooling of the projected token grid (the training-free Matryoshka/M3 operation).

Budget → grid: the largest grid with the image grid's aspect ratio and at most ``keep`` cells, each side
``floor(side·sqrt(keep/cells))`` (:func:`vlm_compress.ops.pooled_grid_shape`). On LLaVA-1.5's 24×24 grid:
budget 0.5 → 16×16 = 256, 0.2 → 10×10 = 100, 0.1 → 7×7 = 49 tokens. Prefix tokens (CLS under the "full"
feature strategy) are kept and count against the budget.
"""

from __future__ import annotations

import dataclasses

import torch

from ..adapters.base import ImageBatch
from ..ops import pool_grid, pooled_grid_shape
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("pool")
@dataclasses.dataclass
class PoolPruner(EncoderPruner):
    def _shape(self, keep: int, images: ImageBatch) -> tuple[int, int]:
        return pooled_grid_shape(max(keep - images.prefix, 1), images.grid)

    def output_count(self, keep: int, images: ImageBatch) -> int:
        h, w = self._shape(keep, images)
        return images.prefix + h * w

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        images, keep = ctx.images, ctx.uniform_keep()
        prefix, grid = images.prefix, images.grid
        out_grid = self._shape(keep, images)
        pooled = pool_grid(ctx.features[:, prefix:], grid, out_grid)
        features = torch.cat([ctx.features[:, :prefix], pooled], dim=1)
        # each output cell's representative: the source token at the window's top-left corner
        rows = torch.div(torch.arange(out_grid[0]) * grid[0], out_grid[0], rounding_mode="floor")
        cols = torch.div(torch.arange(out_grid[1]) * grid[1], out_grid[1], rounding_mode="floor")
        corner = (rows[:, None] * grid[1] + cols[None, :]).flatten() + prefix
        kept = torch.cat([torch.arange(prefix), corner]).to(features.device)
        # source token → output slot (adaptive pooling windows: cell r of h' covers floor(r·h/h')..ceil((r+1)·h/h'))
        src_r = torch.arange(grid[0]) * out_grid[0] // grid[0]
        src_c = torch.arange(grid[1]) * out_grid[1] // grid[1]
        slot = (src_r[:, None] * out_grid[1] + src_c[None, :]).flatten() + prefix
        merged_into = torch.cat([torch.arange(prefix), slot]).to(features.device)
        n = features.shape[0]
        return EncoderSelection(
            features=list(features.unbind(0)), kept_index=[kept] * n, merged_into=[merged_into] * n
        )

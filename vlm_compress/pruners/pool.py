"""``pool``: 2-D average pooling of the projected token grid (the training-free Matryoshka/M3 operation).

Budget → grid: the largest grid with the image grid's aspect ratio and at most ``keep`` cells, each side
``floor(side·sqrt(keep/cells))`` (:func:`vlm_compress.ops.pooled_grid_shape`). On LLaVA-1.5's 24×24 grid:
budget 0.5 → 16×16 = 256, 0.2 → 10×10 = 100, 0.1 → 7×7 = 49 tokens. Prefix tokens (CLS under the "full"
feature strategy) are kept and count against the budget.

LLaVA-NeXT (AnyRes): the thumbnail grid and the unpadded high-resolution grid are pooled separately, the budget
split between them in proportion to their token counts; newline tokens are dropped (pooled rows no longer line up
with them). At a budget covering every token the image passes through unchanged, newlines included.
"""

from __future__ import annotations

import dataclasses

import torch

from ..adapters.base import OUTSIDE, TokenLayout
from ..ops import pool_grid, pooled_grid_shape
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("pool")
@dataclasses.dataclass
class PoolPruner(EncoderPruner):
    def plan(self, keep: int, layout: TokenLayout) -> list[tuple[int, tuple[int, int]]]:
        """``[(partition, pooled grid)]`` for a budget of ``keep`` tokens (prefix tokens paid first)."""
        prefix = int(((layout.partition == OUTSIDE) & ~layout.newline).sum())
        sizes = {p: g[0] * g[1] for p, g in sorted(layout.grids.items())}
        content, total = max(keep - prefix, len(sizes)), sum(sizes.values())
        return [(p, pooled_grid_shape(max(content * n // total, 1), layout.grids[p])) for p, n in sizes.items()]

    def output_count(self, keep: int, layout) -> int:
        if keep >= layout.num_tokens:
            return layout.num_tokens
        prefix = int(((layout.partition == OUTSIDE) & ~layout.newline).sum())
        return prefix + sum(h * w for _, (h, w) in self.plan(keep, layout))

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        features, layout = ctx.features, ctx.layout
        device, n = features.device, layout.num_tokens
        keep = (ctx.requested or ctx.keep)[0]  # the plan's input; ctx.keep holds its output count
        if keep >= n:
            index = torch.arange(n, device=device).expand(features.shape[0], n)
            return EncoderSelection.from_indices(features, index)
        prefix = ((layout.partition == OUTSIDE) & ~layout.newline).nonzero().squeeze(1)
        parts, kept = [features[:, prefix.to(device)]], [prefix]
        merged_into = torch.full((n,), -1, dtype=torch.long)
        merged_into[prefix] = torch.arange(len(prefix))
        slot0 = len(prefix)
        for partition, out_grid in self.plan(keep, layout):
            grid, index = layout.grids[partition], layout.tokens_of(partition)
            parts.append(pool_grid(features[:, index.to(device)], grid, out_grid))
            # each output cell's representative: the source token at the window's top-left corner
            rows = torch.div(torch.arange(out_grid[0]) * grid[0], out_grid[0], rounding_mode="floor")
            cols = torch.div(torch.arange(out_grid[1]) * grid[1], out_grid[1], rounding_mode="floor")
            kept.append(index[(rows[:, None] * grid[1] + cols[None, :]).flatten()])
            # source token → output slot (adaptive windows: cell r of h' covers floor(r·h/h')..ceil((r+1)·h/h'))
            src_r = torch.arange(grid[0]) * out_grid[0] // grid[0]
            src_c = torch.arange(grid[1]) * out_grid[1] // grid[1]
            merged_into[index] = (src_r[:, None] * out_grid[1] + src_c[None, :]).flatten() + slot0
            slot0 += out_grid[0] * out_grid[1]
        out = torch.cat(parts, dim=1)
        kept_index, merged_into = torch.cat(kept).to(device), merged_into.to(device)
        count = out.shape[0]
        return EncoderSelection(features=list(out.unbind(0)), kept_index=[kept_index] * count,
                                merged_into=[merged_into] * count)

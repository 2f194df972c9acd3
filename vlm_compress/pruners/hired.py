"""``hired``: High-Resolution Early Dropping (Arif et al., arXiv 2408.10945, AAAI 2025; reference §2).

LLaVA-NeXT (AnyRes). The budget ``k`` of an image is split between the thumbnail and the crops: the thumbnail gets
``floor(α·k)`` (α = 0.5, the official scripts' default), the crops the rest. The crops' share is divided in
proportion to how much of the thumbnail's early attention falls on the part of the image each crop covers: the
top ``(1 − α)`` share of thumbnail tokens by CLS attention at ViT layer 0 ("initial" layer) is counted per crop.
Within the thumbnail and within each crop, the tokens with the highest CLS attention at ViT layer −2 (layer 22
of 24, the feature layer; "final" layer) are kept, each crop scored by its own CLS. Heads are summed, post-softmax,
as in the official code. Kept tokens stay in packed order (thumbnail, then the high-resolution grid row by row)
and newline tokens are dropped, as officially: the whole budget goes to content tokens.

Differences from the official code, each deliberate:

* Thumbnail regions map to crops in 2-D (a thumbnail cell belongs to the crop whose part of the image it shows).
  The official code reshapes the flattened thumbnail raster into ``rows × cols`` consecutive chunks, i.e.
  horizontal bands; ``official_bands=True`` reproduces that for comparison with published numbers.
* Per-crop budgets use largest-remainder rounding with caps (:func:`vlm_compress.budget.apportion`), so the kept
  count equals the budget; the official floors keep up to one token per crop fewer.
* On a model without AnyRes structure (LLaVA-1.5) this is the official single-partition variant: top-``k`` by
  the feature layer's CLS attention, heads summed. Qwen2-VL/Qwen2.5-VL see each image as one native-resolution grid
  (no thumbnail to allocate from): the same single-partition variant, scored by the received-attention substitute
  of :mod:`vlm_compress.scoring` (no CLS), heads summed, each visual token the mean of its four merged patches.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..adapters.base import TokenLayout
from ..budget import apportion
from ..ops import HEAD_REDUCTIONS, topk_indices
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("hired")
@dataclasses.dataclass
class HiREDPruner(EncoderPruner):
    alpha: float = dataclasses.field(
        default=0.5, metadata={"help": "Share of the budget for the thumbnail (official scripts: 0.5).", "range": (0, 1)}
    )
    allocation_layer: int = dataclasses.field(
        default=0, metadata={"help": "ViT layer whose thumbnail CLS attention splits the crops' budget (official: 0)."}
    )
    selection_layer: int = dataclasses.field(
        default=-2, metadata={"help": "ViT layer whose CLS attention picks tokens (official: 22 of 24, i.e. -2)."}
    )
    head_reduce: str = dataclasses.field(default="sum", metadata={"help": "Head reduction (official: sum).", "choices": HEAD_REDUCTIONS})
    official_bands: bool = dataclasses.field(
        default=False,
        metadata={"help": "Map thumbnail to crops by raster bands, as the official code does, instead of in 2-D."},
    )

    def attention_layers(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.allocation_layer, self.selection_layer)))

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor:
        """``[I, N]`` the selection layer's CLS attention (newlines -inf)."""
        return ctx.cls_attention(self.selection_layer, self.head_reduce, "probs")

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        layout, keep, n = ctx.layout, ctx.uniform_keep(), ctx.num_tokens
        final = self.token_scores(ctx)  # [I, N], newlines -inf
        content = int((~layout.newline).sum())
        if not layout.is_anyres or keep >= content:
            return EncoderSelection.top_k(ctx.features, final, keep)
        initial = ctx.cls_attention(self.allocation_layer, self.head_reduce, "probs")
        index = torch.stack([self._select_one(layout, keep, final[i], initial[i]) for i in range(final.shape[0])])
        return EncoderSelection.from_indices(ctx.features, index.to(ctx.features.device))

    def crop_budgets(self, layout: TokenLayout, total: int, initial_thumbnail: torch.Tensor) -> list[int]:
        """Tokens per crop for ``total`` crop tokens, from the thumbnail's initial-layer CLS attention ``[h·w]``."""
        rows, cols = layout.crop_layout
        top = topk_indices(initial_thumbnail, int(initial_thumbnail.numel() * (1 - self.alpha)))
        if self.official_bands:  # flattened raster split into rows·cols consecutive chunks
            region = top * (rows * cols) // initial_thumbnail.numel()
        else:  # the crop showing the part of the image under each thumbnail cell (unpadding accounted for)
            region = _crop_under_thumbnail(layout)[top]
        counts = torch.bincount(region, minlength=rows * cols).tolist()
        caps = [int((layout.crop == j).sum()) for j in range(rows * cols)]
        return apportion(total, counts, caps)

    def _select_one(self, layout: TokenLayout, keep: int, final: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        final = final.cpu()
        thumbnail, hires = layout.tokens_of(0), layout.tokens_of(1)
        crops = min(keep - min(math.floor(keep * self.alpha), thumbnail.numel()), hires.numel())
        budgets = self.crop_budgets(layout, crops, initial.cpu()[thumbnail])
        chosen = [thumbnail[topk_indices(final[thumbnail], keep - sum(budgets))]]
        for crop, budget in enumerate(budgets):
            members = (layout.crop == crop).nonzero().squeeze(1)
            chosen.append(members[topk_indices(final[members], budget)])
        return torch.cat(chosen).sort().values


def _crop_under_thumbnail(layout: TokenLayout) -> torch.Tensor:
    """``[h·w]`` crop index for each thumbnail cell: the thumbnail shows the whole image, the unpadded
    high-resolution grid shows it too, so cell centres map through relative image position."""
    side_r, side_c = layout.grids[0]
    rows, cols = layout.grids[1]
    hires = layout.partition == 1
    crop_map = torch.full((rows, cols), -1, dtype=torch.long)
    crop_map[layout.cell[hires, 0], layout.cell[hires, 1]] = layout.crop[hires]
    r = ((torch.arange(side_r) + 0.5) * rows / side_r).long().clamp(max=rows - 1)
    c = ((torch.arange(side_c) + 0.5) * cols / side_c).long().clamp(max=cols - 1)
    return crop_map[r[:, None], c[None, :]].flatten()

"""``globalcom2``: Global Compression Commander (Liu et al., arXiv 2501.05179, AAAI 2026; reference §6).

LLaVA-NeXT (AnyRes) only: the thumbnail "commands" how much of each crop survives. Scores are the CLS row of the
last ViT layer as head-mean pre-softmax logits (the official code; the paper says "[CLS] attention"). On the
embedded tiny-llava-next the official logits lose to ``random`` at budget 0.5 (0.483 vs 0.575) while
``kind="probs"`` is the second-best method there (0.858 @0.5, 0.833 @0.11): one head with twice the logit spread
of the others dominates a head-mean of logits (``eval/results/investigate_encoder_scores.md``). The default stays
the official one, for reproduction; pass ``kind="probs"`` on towers like ours.

With a budget of ``k`` content tokens out of ``n`` (``R = k/n``):

* the thumbnail keeps its ``round(R·n_thumbnail)`` best tokens;
* crop ``j`` gets the retention ``r_j = R·(1 + σ_j − 1/m)``, clipped at 1, where ``σ = softmax(S/τ)`` over the
  ``m`` crops, ``S_j`` the sum of the thumbnail scores over the part of the image crop ``j`` shows, τ = 10; the
  crops' tokens are split in proportion to ``r_j · n_j`` (``n_j`` its unpadded tokens) with exact rounding;
* within a crop, tokens rank by ``ŝ_local + ŝ_global``: its own CLS scores and the thumbnail scores bilinearly
  interpolated onto the unpadded high-resolution grid, each L2-normalised over the crop (α = 0.5).

Budget semantics follow ours: newline tokens count as visual tokens. The official code keeps every newline on top
of its ratio; by default we drop them and give the whole budget to content tokens, and ``keep_newlines=True``
keeps them inside the budget instead (the content budget is what is left). Kept tokens are in packed (raster)
order; the official code puts the thumbnail's in descending-score order. The thumbnail→crop regions account for
unpadding (the official code splits the thumbnail grid into equal blocks, the same for unpadded images).

A grid without crops to command (a video frame, an image of a multi-image OneVision prompt, every image of
Qwen2-VL/Qwen2.5-VL, which see one native-resolution grid and no thumbnail) keeps its ``k`` best tokens by the same
scores: the thumbnail's rule. On Qwen towers (no CLS) the scores are the substitute of :mod:`vlm_compress.scoring`,
the attention each token receives, here as head-mean logits (``kind``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..adapters.base import TokenLayout
from ..budget import apportion
from ..ops import SCORE_KINDS, topk_indices
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection
from .hired import _crop_under_thumbnail


@register_method("globalcom2")
@dataclasses.dataclass
class GlobalCom2Pruner(EncoderPruner):
    requires_anyres: ClassVar[bool] = True

    temperature: float = dataclasses.field(default=10.0, metadata={"help": "τ of the crop allocation softmax (paper: 10).", "above": 0})
    layer: int = dataclasses.field(default=-1, metadata={"help": "ViT layer of the CLS scores (official: last, -1)."})
    kind: str = dataclasses.field(default="logits", metadata={"help": "'logits' (official) or 'probs'.", "choices": SCORE_KINDS})
    keep_newlines: bool = dataclasses.field(
        default=False, metadata={"help": "Keep every newline token (inside the budget), as the official code does."}
    )

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def retention(self, ratio: float, thumbnail_scores: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """``[m]`` per-crop retention ``R·(1 + σ_j − 1/m)`` clipped at 1, from thumbnail scores ``[h·w]``."""
        crops = layout.crop_layout[0] * layout.crop_layout[1]
        region_sum = torch.zeros(crops).index_add_(0, _crop_under_thumbnail(layout), thumbnail_scores.float())
        sigma = ((region_sum - region_sum.max()) / self.temperature).softmax(0)
        return (ratio * (1 + sigma - 1 / crops)).clamp(max=1.0)

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor:
        """``[I, N]`` the last layer's CLS scores (``kind``; newlines -inf)."""
        return ctx.cls_attention(self.layer, "mean", self.kind)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        layout, keep = ctx.layout, ctx.uniform_keep()
        scores = self.token_scores(ctx)
        if keep >= ctx.num_tokens or not layout.is_anyres:
            return EncoderSelection.top_k(ctx.features, scores, keep)
        index = torch.stack([self._select_one(layout, keep, s) for s in scores.cpu()])
        return EncoderSelection.from_indices(ctx.features, index.to(ctx.features.device))

    def _select_one(self, layout: TokenLayout, keep: int, scores: torch.Tensor) -> torch.Tensor:
        thumbnail, hires = layout.tokens_of(0), layout.tokens_of(1)
        newlines = layout.newline.nonzero().squeeze(1)
        kept_newlines = newlines[: keep] if self.keep_newlines else newlines[:0]
        budget = keep - kept_newlines.numel()
        ratio = budget / (thumbnail.numel() + hires.numel())
        on_thumbnail = min(round(ratio * thumbnail.numel()), thumbnail.numel(), budget)
        on_crops = min(budget - on_thumbnail, hires.numel())
        on_thumbnail = budget - on_crops
        chosen = [kept_newlines, thumbnail[topk_indices(scores[thumbnail], on_thumbnail)]]

        crops = layout.crop_layout[0] * layout.crop_layout[1]
        sizes = [int((layout.crop == j).sum()) for j in range(crops)]
        retention = self.retention(ratio, scores[thumbnail], layout)
        budgets = apportion(on_crops, [float(r) * n for r, n in zip(retention, sizes)], sizes)
        grid = layout.grids[1]
        side = layout.grids[0]
        global_map = F.interpolate(scores[thumbnail].float().view(1, 1, *side), size=grid, mode="bilinear",
                                   align_corners=False)[0, 0]
        for crop, count in enumerate(budgets):
            members = (layout.crop == crop).nonzero().squeeze(1)
            if count == 0 or members.numel() == 0:
                continue
            cells = layout.cell[members]
            local = F.normalize(scores[members].float(), dim=0)
            interpolated = F.normalize(global_map[cells[:, 0], cells[:, 1]], dim=0)
            chosen.append(members[topk_indices(local + interpolated, count)])
        return torch.cat(chosen).sort().values

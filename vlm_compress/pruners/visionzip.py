"""``visionzip``: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

VisionZip (Yang et al., CVPR 2025; reference §8.3): the ``d`` patches with the highest CLS attention (heads
summed, post-softmax, ViT layer -2) are kept in raster order; of the remaining ``M`` tokens, ``c`` targets are
taken uniformly by index (``step = M // c``), every other remaining token joins its most cosine-similar target
(head-mean keys of the same layer), and each contextual token is ``h_target + mean(h_assigned)`` in the vision
tower's feature space, then projected. Output: ``[dominant…] ++ [contextual…]``.

The official README default is 54 dominant + 10 contextual = 64, so by default ``c = round(k·10/64)``.
Differences from the official code: HF LLaVA drops CLS from the features under the "default" strategy, so no
CLS token is prepended (it would be out of distribution for the LLM); at full budget nothing is merged.

On Qwen2-VL/Qwen2.5-VL (no CLS): dominant tokens by the received-attention substitute (:mod:`vlm_compress.scoring`,
the mean over each token's four merged patches); contextual merging by the patches' head-mean keys averaged over
the group, in the merger's input space (the four patches concatenated), then through the merger.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops import HEAD_REDUCTIONS, gather_tokens, merge_into_targets, topk_indices
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("visionzip")
@dataclasses.dataclass
class VisionZipPruner(EncoderPruner):
    contextual_ratio: float = dataclasses.field(
        default=10 / 64, metadata={"help": "Share of the budget given to contextual tokens (README: 10 of 64).", "range": (0, 1)}
    )
    layer: int = dataclasses.field(default=-2, metadata={"help": "Vision layer for CLS attention and keys (official: -2)."})
    head_reduce: str = dataclasses.field(default="sum", metadata={"help": "Head reduction of CLS attention (official: sum).",
                                                                     "choices": HEAD_REDUCTIONS})

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def split(self, keep: int) -> tuple[int, int]:
        """(dominant, contextual) counts for ``keep`` tokens; at least one dominant token."""
        contextual = min(round(keep * self.contextual_ratio), keep - 1)
        return keep - contextual, contextual

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        keep, n = ctx.uniform_keep(), ctx.num_tokens
        features = ctx.features
        if keep >= n:
            index = torch.arange(n, device=features.device).expand(features.shape[0], n)
            return EncoderSelection.from_indices(features, index)
        dominant, contextual = self.split(keep)
        scores = ctx.cls_attention(self.layer, self.head_reduce, "probs")
        dom_index = topk_indices(scores, dominant)  # [I, d]
        out = gather_tokens(features, dom_index)
        kept_index = dom_index
        merged_into = torch.full(features.shape[:2], -1, dtype=torch.long, device=features.device)
        merged_into.scatter_(1, dom_index, torch.arange(dominant, device=features.device).expand_as(dom_index))
        if contextual > 0:
            is_dom = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
            is_dom.scatter_(1, dom_index, True)
            rest = (~is_dom).nonzero()[:, 1].view(features.shape[0], n - dominant)  # [I, M], raster order
            step = max(1, rest.shape[1] // contextual)
            target_pos = torch.arange(0, rest.shape[1], step, device=features.device)[:contextual]
            target_pos = target_pos.expand(features.shape[0], -1)
            merged, assignment = merge_into_targets(
                gather_tokens(ctx.images.vision_features, rest),
                gather_tokens(ctx.keys(self.layer), rest),
                target_pos,
            )
            out = torch.cat([out, ctx.images.project(merged).to(out.dtype)], dim=1)
            kept_index = torch.cat([dom_index, rest.gather(1, target_pos)], dim=1)
            merged_into.scatter_(1, rest, assignment + dominant)
        return EncoderSelection(
            features=list(out.unbind(0)), kept_index=list(kept_index.unbind(0)), merged_into=list(merged_into.unbind(0))
        )

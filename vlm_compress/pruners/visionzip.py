"""``visionzip``: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467; ``dvlab-research/VisionZip`` @3151f6d; reference §8.3): the
``d`` patches with the highest CLS attention (heads summed, post-softmax, ViT layer -2) are kept in raster order; of
the remaining ``M`` tokens, ``c`` targets are taken uniformly by index (``step = M // c``), every other remaining
token joins its most cosine-similar target (head-mean keys of the same layer), and each contextual token is
``h_target + mean(h_assigned)`` in the vision tower's feature space, then projected. Output: ``[dominant…] ++
[contextual…]``.

The official README default is 54 dominant + 10 contextual = 64, so by default ``c = round(k·10/64)``.
Differences from the official code: HF LLaVA drops CLS from the features under the "default" strategy, so no
CLS token is prepended (it would be out of distribution for the LLM); at full budget nothing is merged.

LLaVA-NeXT (AnyRes): the official code (``llava_arch.py::restore_image_features_sorted``) runs VisionZip on every
sub-image — the thumbnail and each crop — with its own dominant and contextual counts, each crop scored by its own
CLS. So by default (``per_crop=True``) the image's budget is split over its sub-images in proportion to their
tokens (:func:`vlm_compress.budget.apportion`; the official code gives each the same fixed count, so its total grows
with the number of crops, issue #17), and each sub-image gets its own dominant/contextual split, uniform targets and
merge among its own remaining tokens. Output: every sub-image's dominant tokens in packed order, then the
contextual tokens, sub-image by sub-image. ``per_crop=False`` is the global variant: one top-``d`` and one merge
over the whole packed image. Either way ``image_newline`` tokens (no tower token: zero features and keys) are never
dominant, never merged and never a target — the whole budget goes to content tokens; the official code drops them
too (no unpad, no newline). HF keeps the unpadded grid, so edge crops have fewer tokens than the official ones.

On Qwen2-VL/Qwen2.5-VL (no CLS): dominant tokens by the received-attention substitute (:mod:`vlm_compress.scoring`,
the mean over each token's four merged patches); contextual merging by the patches' head-mean keys averaged over
the group, in the merger's input space (the four patches concatenated), then through the merger.
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import apportion
from ..ops import HEAD_REDUCTIONS, merge_into_targets, topk_indices
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
    per_crop: bool = dataclasses.field(
        default=True,
        metadata={"help": "AnyRes: dominant and contextual counts per sub-image (thumbnail, each crop), as the official "
                          "code; False: one selection over the whole packed image."},
    )

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def split(self, keep: int) -> tuple[int, int]:
        """(dominant, contextual) counts for ``keep`` tokens; at least one dominant token."""
        contextual = min(round(keep * self.contextual_ratio), keep - 1)
        return keep - contextual, contextual

    def parts(self, ctx: EncoderContext) -> list[torch.Tensor]:
        """Token indices ``[n_p]`` of each part selected on its own, newlines excluded: the sub-images (thumbnail,
        then each crop) under AnyRes with ``per_crop`` (:meth:`TokenLayout.sub_images`), else all content tokens."""
        if self.per_crop:
            return ctx.layout.sub_images()
        return [(~ctx.layout.newline).nonzero().squeeze(1)]

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor:
        """``[I, N]`` the CLS attention that picks dominant tokens (newlines -inf)."""
        return ctx.cls_attention(self.layer, self.head_reduce, "probs")

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        keep, n = ctx.uniform_keep(), ctx.num_tokens
        features = ctx.features
        if keep >= n:
            index = torch.arange(n, device=features.device).expand(features.shape[0], n)
            return EncoderSelection.from_indices(features, index)
        parts = [p.to(features.device) for p in self.parts(ctx)]
        sizes = [int(p.numel()) for p in parts]
        if keep >= sum(sizes):  # every content token and some newlines: nothing left to merge
            scores = self.token_scores(ctx)
            return EncoderSelection.top_k(features, scores, keep)
        counts = apportion(keep, [float(s) for s in sizes], sizes)
        scores = self.token_scores(ctx)
        keys = ctx.keys(self.layer)
        out, kept, merged = [], [], []
        for i in range(features.shape[0]):
            zipped = [self._zip_part(ctx, i, p, count, scores[i], keys[i]) for p, count in zip(parts, counts) if count]
            dom_index = torch.cat([dom for dom, _ in zipped])
            slot = torch.full((n,), -1, dtype=torch.long, device=features.device)
            slot[dom_index] = torch.arange(dom_index.numel(), device=features.device)
            tokens, index = [features[i, dom_index]], [dom_index]
            for targets, values, groups in (c for _, c in zipped if c is not None):
                slot = torch.where(groups >= 0, groups + len(torch.cat(index)), slot)
                tokens.append(ctx.images.project(values).to(features.dtype))
                index.append(targets)
            out.append(torch.cat(tokens))
            kept.append(torch.cat(index))
            merged.append(slot)
        return EncoderSelection(features=out, kept_index=kept, merged_into=merged)

    def _zip_part(self, ctx: EncoderContext, i: int, members: torch.Tensor, count: int, scores: torch.Tensor,
                  keys: torch.Tensor):
        """VisionZip within one part of image ``i``: ``members`` [n_p] token indices, ``count`` tokens out.
        Returns (dominant token indices [d] ascending, ``None`` or (target token indices [c], merged tower
        features [c, Dv], per-token group [N] with -1 outside the part's contextual tokens))."""
        if count >= members.numel():
            return members.sort().values, None
        d, c = self.split(count)
        dom = members[topk_indices(scores[members], d)].sort().values
        if c == 0:
            return dom, None
        is_dom = torch.zeros(ctx.num_tokens, dtype=torch.bool, device=members.device)
        is_dom[dom] = True
        rest = members[~is_dom[members]].sort().values  # [M], raster order within the part
        step = max(1, rest.numel() // c)
        target_pos = torch.arange(0, rest.numel(), step, device=members.device)[:c]
        values, groups_of_rest = merge_into_targets(
            ctx.images.vision_features[i, rest][None], keys[rest][None], target_pos[None]
        )
        groups = torch.full((ctx.num_tokens,), -1, dtype=torch.long, device=members.device)
        groups[rest] = groups_of_rest[0]
        return dom, (rest[target_pos], values[0], groups)

"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494): drop visual tokens that duplicate a few pivot tokens, once,
inside the LLM, at layer K.

Official code: ``ZichenWen1/DART`` as read in the fork ``xqy1111111/DART`` @5a19452 (the algorithm last changed in
9fee9fa), ``llava/model/language_model/modeling_llama_self.py::DART.forward, ::get_retained_image_token``; see
``reference/sota-methods.md`` §3. Layers ``0..K-1`` see every token; from the signals of layer ``K-1``:

- keys ``k``: that layer's post-RoPE keys, all heads concatenated;
- hidden states ``h``: that layer's output passed through the LLM's *final* norm (its weight changes cosines).

The ``pivots_image`` visual tokens with the largest ``||k||_1`` and the ``pivots_text`` text tokens (after the image)
with the largest ``||k||_1`` are the pivots. In ascending position order (the official ``set`` order), each pivot
claims the ``T`` remaining non-pivot visual tokens *least* cosine-similar to it (the others are its duplicates);
earlier pivots claim first. The image pivots and every claimed token are kept; the text pivots are text and stay.
Layers ``K..L-1`` process only the kept visual tokens, at their original positions (gaps kept, as the official
code does), each layer with its own KV cache. Defaults (official scripts ``scripts/v1_5|v1_6/eval/*.sh``):
``K=2``, 4 image pivots, 4 text pivots.

Deliberate differences from the official code:

- **Budget.** The official count is fixed: ``4 + 8·T`` visual tokens (``T = max_num_trunction // 8``; LLaVA-NeXT
  always 320 + 4). Here the budget follows the layer-averaged convention (docs/architecture.md, "The budget
  convention", as FastV): ``n = round(N·(β·L − K)/(L − K))`` visual tokens after layer K
  (:func:`~vlm_compress.budget.ratio_budget_count`), so float budgets below ``K/L`` are unreachable and raise. ``n`` is
  split by :func:`pivot_quota` so exactly ``n`` are kept: ``min(pivots_image, n)`` image pivots, ``P`` pivots in all,
  ``T = (n − image pivots) // P`` per pivot, and the remainder ``r`` goes one each to the first ``r`` pivots in claim
  order (image pivots first). ``per_pivot=T`` restores the official fixed count ``pivots_image + P·T`` (capped at N).
- **Batch > 1**, per sample with its own spans and padding (the official code asserts batch 1). Post-RoPE key norms
  depend on absolute positions, so a left-padded batch selects as its prompts alone when its position ids skip the
  padding (``generate`` does; a bare forward without ``position_ids`` shifts each sample by its padding, and the
  stock model's logits hide that only because attention is shift-invariant).
- **Spans.** The image span is every visual token of the sample: LLaVA-NeXT's whole packed AnyRes sequence
  (thumbnail, unpadded crops, newlines) ranked globally, as the official code does; several images (or video frames)
  in one prompt are ranked together as one span (the official LLaVA code hard-codes one span ``[s, s+L)``, its
  Qwen2-VL code prunes the first image only). The text span is the valid tokens after the sample's last visual token
  (the official ``[s+L, seq_end)``, the same for one image); text between two images is in neither span.
- **Qwen2-VL / Qwen2.5-VL** run through the same engine: every token keeps its own M-RoPE (t, h, w) position (the
  official code slices the 3-D ``position_ids``). Keys are the KV heads as cached (``H_kv`` of them under GQA);
  repeating each KV head ``n`` times, as attention does, would multiply every L1 norm by ``n`` and rank the same.
- Ties (equal norms or cosines) go to the lower position (``torch.topk``'s order is unspecified).
- Visual tokens an earlier stage protects (MustDrop's key set) are kept on top of ``n``, as for every in-LLM method.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ..budget import ratio_budget_count
from ..registry import register_method
from .fastv import check_drop_layer
from .llm_base import LayerView, PrefillContext, PrefillPruner


def pivot_quota(kept: int, image_tokens: int, text_tokens: int, pivots_image: int = 4,
                pivots_text: int = 4) -> tuple[int, int, list[int]]:
    """How ``kept`` visual tokens split: (image pivots, text pivots, tokens each pivot claims in claim order).

    Image pivots come first in claim order (the text span follows the image). Claims sum to ``kept`` minus the image
    pivots, so exactly ``min(kept, image_tokens)`` visual tokens are kept; the remainder of the even split goes one
    each to the first pivots.
    """
    kept = max(0, min(kept, image_tokens))
    p_img = min(pivots_image, kept)
    p_txt = min(pivots_text, text_tokens) if p_img else 0
    pivots = p_img + p_txt
    if pivots == 0:
        return 0, 0, []
    per, extra = divmod(kept - p_img, pivots)
    return p_img, p_txt, [per + 1] * extra + [per] * (pivots - extra)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (ties: the lower index)."""
    return torch.argsort(scores, descending=True, stable=True)[:k]


def dart_select(hidden: torch.Tensor, keys: torch.Tensor, image_span: Sequence[int] | torch.Tensor,
                text_span: Sequence[int] | torch.Tensor, pivots_image: int = 4, pivots_text: int = 4,
                per_pivot: int | Sequence[int] = 1) -> torch.Tensor:
    """DART's selection for one sample (``get_retained_image_token``): the kept image positions, ascending.

    hidden: [S, D] layer K−1's output through the final norm; keys: [S, Dk] its post-RoPE keys, heads concatenated.
    image_span / text_span: positions of the image and text tokens. per_pivot: ``T`` for every pivot, or one count
    per pivot in claim order (ascending position over all pivots). Pivots are the top ``||k||_1`` of each span; each
    claims its least cosine-similar remaining non-pivot image tokens; the image pivots and the claimed tokens are kept.
    """
    device = hidden.device
    image = torch.as_tensor(image_span, dtype=torch.long, device=device).reshape(-1)
    text = torch.as_tensor(text_span, dtype=torch.long, device=device).reshape(-1)
    norms = keys.float().abs().sum(dim=-1)
    image_pivots = image[_top(norms[image], pivots_image)]
    text_pivots = text[_top(norms[text], pivots_text)]
    pivots = torch.cat([image_pivots, text_pivots]).sort().values.tolist()
    quota = [per_pivot] * len(pivots) if isinstance(per_pivot, int) else [int(q) for q in per_pivot]
    if len(quota) != len(pivots):
        raise ValueError(f"per_pivot gives {len(quota)} counts for {len(pivots)} pivots")
    unit = F.normalize(hidden.float(), dim=-1)
    candidate = ~torch.isin(image, image_pivots)
    kept = [image_pivots]
    for pivot, count in zip(pivots, quota):
        remaining = candidate.nonzero().squeeze(1)
        if count <= 0 or remaining.numel() == 0:
            continue
        cosine = unit[image[remaining]] @ unit[pivot]
        chosen = remaining[torch.argsort(cosine, stable=True)[:count]]  # the least duplicated w.r.t. the pivot
        candidate[chosen] = False
        kept.append(image[chosen])
    return torch.cat(kept).sort().values


@register_method("dart")
@dataclasses.dataclass
class DARTPruner(PrefillPruner):
    """DART: keep the pivots and the tokens least similar to them, from layer K (pivots by key L1 norm at K−1)."""

    layer: int = dataclasses.field(
        default=2, metadata={"help": "K: first layer without the dropped tokens (official pruned_layer: 2).", "range": (1, None)}
    )
    pivots_image: int = dataclasses.field(
        default=4, metadata={"help": "Image pivot tokens, top key L1 norm among visual tokens (official: 4).", "range": (1, None)}
    )
    pivots_text: int = dataclasses.field(
        default=4, metadata={"help": "Text pivot tokens, top key L1 norm after the image (official: 4).", "range": (0, None)}
    )
    per_pivot: int | None = dataclasses.field(
        default=None,
        metadata={"help": "T: tokens each pivot claims (official max_num_trunction // 8); overrides the budget.",
                  "range": (0, None)},
    )

    def check(self, num_layers: int) -> None:
        check_drop_layer("dart", self.layer, self.budget if self.per_pivot is None else None, num_layers)

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.layer - 1,)

    def kept_counts(self, ctx: PrefillContext) -> torch.Tensor:
        """[B] visual tokens kept after layer K."""
        visual = ctx.visual_alive
        if self.per_pivot is None:
            return ratio_budget_count(self.budget, visual, ctx.images, self.layer, ctx.num_layers)
        image = visual.clamp(max=self.pivots_image)
        text = ctx.text_after_image.sum(dim=1).clamp(max=self.pivots_text)
        return torch.minimum(image + (image + text) * self.per_pivot, visual)

    def after_layer(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        keys, hidden = attention.keys(), attention.output(normed=True)
        image, text = ctx.alive & ctx.visual, ctx.text_after_image
        keep = torch.zeros_like(ctx.visual)
        for b, count in enumerate(self.kept_counts(ctx).tolist()):
            image_span, text_span = image[b].nonzero().squeeze(1), text[b].nonzero().squeeze(1)
            p_img, p_txt, quota = pivot_quota(count, image_span.numel(), text_span.numel(), self.pivots_image, self.pivots_text)
            if p_img:
                keep[b, dart_select(hidden[b], keys[b], image_span, text_span, p_img, p_txt, quota)] = True
        ctx.alive = (ctx.alive & ~ctx.visual) | keep

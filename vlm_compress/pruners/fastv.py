"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764): drop visual tokens once, inside the LLM, at layer K.

The attention of layer ``K-1`` — head mean, post-softmax, the *last token's* row (the official code; the paper
says "average attention", FastV issue #14) — ranks the visual tokens; layers ``K..L-1`` process only the top
ones, in their original order and at their original positions. Defaults: ``K=2`` (paper; the HF demo uses 3).

Budget (layer-averaged, docs/architecture.md, "The budget convention"): with ``N`` visual tokens, ``L`` layers
and ``n`` kept after layer K, the average is ``(K·N + (L−K)·n) / L``; so a float budget β gives ``n = round(N·(β·L − K)/(L − K))``,
i.e. FastV's drop ratio ``R = 1 − (β·L − K)/(L − K)``. β below ``K/L`` is unreachable and raises. An explicit
``ratio`` (the paper's R) overrides the budget. Several images in one prompt are ranked together.
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import ratio_budget_count
from ..registry import register_method
from .llm_base import PrefillContext, PrefillPruner, RowAttention


def fastv_keep_fraction(budget: float, layer: int, num_layers: int) -> float:
    """Share of visual tokens kept after layer ``layer`` so the layer-averaged share is ``budget``."""
    return (budget * num_layers - layer) / (num_layers - layer)


def top_visual(scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: per sample the ``keep[b]`` highest-scoring ``candidates`` (ties by position)."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    order = torch.argsort(masked, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < keep[:, None])


@register_method("fastv")
@dataclasses.dataclass
class FastVPruner(PrefillPruner):
    """FastV: rank visual tokens by the last token's attention at layer K−1, keep the top ones from layer K."""

    layer: int = dataclasses.field(default=2, metadata={"help": "K: first layer without the dropped tokens (paper: 2).", "range": (1, None)})
    ratio: float | None = dataclasses.field(
        default=None, metadata={"help": "R: share of visual tokens dropped at layer K; overrides the budget.", "range": (0, 1)}
    )

    def check(self, num_layers: int) -> None:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"fastv layer K must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {self.layer}")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"fastv ratio must be in [0, 1], got {self.ratio}")
        if self.ratio is None and isinstance(self.budget, float) and fastv_keep_fraction(self.budget, self.layer, num_layers) < 0:
            raise ValueError(
                f"budget {self.budget} is below what FastV at K={self.layer} can reach on a {num_layers}-layer LLM "
                f"(minimum {self.layer / num_layers:.3f}: layers before K see every token); lower `layer` or raise the budget"
            )

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.layer - 1,)

    def kept_counts(self, ctx: PrefillContext) -> torch.Tensor:
        """[B] visual tokens kept after layer K."""
        visual = ctx.visual_alive
        if self.ratio is not None:
            return torch.round(visual * (1.0 - self.ratio)).long()
        return ratio_budget_count(self.budget, visual, ctx.images, self.layer, ctx.num_layers)

    def after_layer(self, layer: int, ctx: PrefillContext, attention: RowAttention) -> None:
        scores = attention(ctx.last_token)[:, 0]
        keep = top_visual(scores, ctx.alive & ctx.visual, self.kept_counts(ctx))
        ctx.alive = (ctx.alive & ~ctx.visual) | keep

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
from .llm_base import PrefillContext, PrefillPruner, LayerView


def fastv_keep_fraction(budget: float, layer: int, num_layers: int) -> float:
    """Share of visual tokens kept after layer ``layer`` so the layer-averaged share is ``budget``."""
    return (budget * num_layers - layer) / (num_layers - layer)


def check_drop_layer(name: str, layer: int, budget: float | int | None, num_layers: int) -> None:
    """Raise a ``ValueError`` naming the fix when a method that drops once at layer ``K = layer`` cannot run on a
    ``num_layers``-layer LLM: K outside ``[1, L−1]``, or a float ``budget`` below ``K/L`` (the layers before K see
    every token). ``budget=None``: the count is not budget-driven (an explicit ratio or per-pivot count)."""
    if not 1 <= layer < num_layers:
        raise ValueError(f"{name} layer K must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}")
    if isinstance(budget, float) and fastv_keep_fraction(budget, layer, num_layers) < 0:
        raise ValueError(
            f"budget {budget} is below what {name} at K={layer} can reach on a {num_layers}-layer LLM "
            f"(minimum {layer / num_layers:.3f}: layers before K see every token); lower `layer` or raise the budget"
        )


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
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"fastv ratio must be in [0, 1], got {self.ratio}")
        check_drop_layer("fastv", self.layer, self.budget if self.ratio is None else None, num_layers)

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.layer - 1,)

    def kept_counts(self, ctx: PrefillContext) -> torch.Tensor:
        """[B] visual tokens kept after layer K."""
        visual = ctx.visual_alive
        if self.ratio is not None:
            return torch.round(visual * (1.0 - self.ratio)).long()
        return ratio_budget_count(self.budget, visual, ctx.images, self.layer, ctx.num_layers)

    def after_layer(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        scores = attention(ctx.last_token)[:, 0]
        keep = top_visual(scores, ctx.alive & ctx.visual, self.kept_counts(ctx))
        ctx.alive = (ctx.alive & ~ctx.visual) | keep

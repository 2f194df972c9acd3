"""``mustdrop_llm``: MustDrop stages 2 and 3, inside the LLM (Liu et al., arXiv 2411.10803; reference §5).

Stage 2, dual-attention filtering: after each scoring layer (the official 2/6/10/14 of 32 layers, scaled to the
model's depth as ``round(l·L/32)``), the attention ``A[t, j]`` of every text token after the image (question and
assistant prompt) to each alive visual token, head-mean and post-softmax, gives a global score ``g_j = Σ_t A[t, j]``
and an individual one ``max_t A[t, j]``. Stage 3, the output-aware cache: once the prompt is prefilled, every
layer from the first scoring layer on keeps only the visual tokens that survived the last stage (layers before it
keep all), as the official code does. The key set from stage 1 (``method=["mustdrop", "mustdrop_llm"]``) is never
dropped.

Two ways to decide the drops:

* ``mode="budget"`` (default): the layer-averaged budget is met exactly. Each stage keeps the same share ``ρ`` of
  the previous one's visual tokens, ``ρ`` solved so the layer average equals the budget; within a stage the
  tokens with the lowest global score go first.
* ``mode="official"``: drop ``j`` iff ``g_j < global_thr · Σ g`` and ``max_t A[t, j] < individual_thr``; the
  count is adaptive. The thresholds default to the official script's row for the nearest target (576-token
  LLaVA-1.5: 192 → 0.001/0.001, 128 → 0.0012/0.001, 64 → 0.011/0.01), tuned for a 7B model.

Unlike the official code, positions stay the original ones in every layer and at decode (the official code
compacts them per stage), and each sample is filtered on its own (the official code is batch-1).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import compat
from ..budget import visual_share
from ..registry import register_method
from .fastv import top_visual
from .llm_base import PrefillContext, PrefillPruner, LayerView

MODES = ("budget", "official")
# target layer-averaged share of 576 tokens → (global_thr, individual_thr), scripts/v1_5/eval/*.sh
OFFICIAL_THRESHOLDS = {192 / 576: (0.001, 0.001), 128 / 576: (0.0012, 0.001), 64 / 576: (0.011, 0.01)}


def stage_keep_share(budget: float, first_drop: list[int], num_layers: int) -> float:
    """ρ in [0, 1] with ``Σ_l ρ^{i(l)} = budget·L``, ``i(l)`` the stages whose drops precede layer ``l``.

    ``first_drop``: the first layer without each stage's dropped tokens (scoring layer + 1), ascending.
    """
    def layer_average(rho: float) -> float:
        return sum(rho ** sum(1 for f in first_drop if f <= layer) for layer in range(num_layers)) / num_layers

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if layer_average(mid) < budget else (lo, mid)
    return (lo + hi) / 2


def staged_counts(visual: torch.Tensor, shares: torch.Tensor, first_drop: list[int], num_layers: int) -> torch.Tensor:
    """[B, stages] visual tokens each stage keeps so the layer average is each sample's share (``visual`` [B],
    ``shares`` [B]): every stage keeps :func:`stage_keep_share` of the previous one's tokens."""
    counts = []
    for n, share in zip(visual.tolist(), shares.tolist()):
        rho = stage_keep_share(share, first_drop, num_layers)
        counts.append([int(n * rho ** (i + 1) + 0.5) for i in range(len(first_drop))])
    return torch.tensor(counts, device=visual.device, dtype=torch.long).reshape(len(counts), len(first_drop))


@register_method("mustdrop_llm")
@dataclasses.dataclass
class MustDropLLMPruner(PrefillPruner):
    """MustDrop stage 2 (dual-attention filtering at several LLM layers) and stage 3 (final-set caches)."""

    layers_of_32: tuple[int, ...] = dataclasses.field(
        default=(2, 6, 10, 14), metadata={"help": "Scoring layers of a 32-layer LLM, scaled to the depth (official)."}
    )
    mode: str = dataclasses.field(
        default="budget", metadata={"help": "'budget' (meet the budget) or 'official'.", "choices": MODES}
    )
    global_thr: float | None = dataclasses.field(default=None, metadata={"help": "Official mode: global threshold."})
    individual_thr: float | None = dataclasses.field(
        default=None, metadata={"help": "Official mode: individual threshold."}
    )
    shrink_cache: bool = dataclasses.field(default=True, metadata={"help": "Stage 3: caches hold the final set."})


    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(sorted({min(num_layers - 2, round(l * num_layers / 32)) for l in self.layers_of_32}))

    def check(self, num_layers: int) -> None:
        if num_layers < 2:
            raise ValueError("mustdrop_llm needs an LLM of at least 2 layers")
        first = self.scoring_layers(num_layers)[0] + 1
        if self.mode == "budget" and isinstance(self.budget, float) and self.budget < first / num_layers:
            raise ValueError(
                f"budget {self.budget} is below what mustdrop_llm can reach on a {num_layers}-layer LLM (minimum "
                f"{first / num_layers:.3f}: layers up to the first scoring layer see every token); raise the budget"
            )

    def thresholds(self) -> tuple[float, float]:
        if self.global_thr is not None and self.individual_thr is not None:
            return self.global_thr, self.individual_thr
        share = self.budget if isinstance(self.budget, float) else self.budget / 576
        nearest = min(OFFICIAL_THRESHOLDS, key=lambda target: abs(target - share))
        defaults = OFFICIAL_THRESHOLDS[nearest]
        return (self.global_thr or defaults[0], self.individual_thr or defaults[1])

    def start(self, ctx: PrefillContext) -> None:
        if self.mode != "budget":
            return
        visual = ctx.visual_alive
        first_drop = [layer + 1 for layer in self.scoring_layers(ctx.num_layers)]
        shares = visual_share(self.budget, visual, ctx.images)
        ctx.extras["mustdrop_counts"] = staged_counts(visual, shares, first_drop, ctx.num_layers)
        ctx.extras["mustdrop_stage"] = 0

    def after_layer(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        rows = attention(ctx.text_after_image)  # [B, T, S]
        global_score, individual = rows.sum(dim=1), rows.amax(dim=1)
        alive = ctx.alive & ctx.visual
        candidates = alive & ~ctx.protected
        if self.mode == "official":
            global_thr, individual_thr = self.thresholds()
            total = (global_score * alive).sum(dim=1, keepdim=True)
            drop = candidates & (global_score < global_thr * total) & (individual < individual_thr)
            ctx.alive = ctx.alive & ~drop
            return
        stage = ctx.extras["mustdrop_stage"]
        target = ctx.extras["mustdrop_counts"][:, stage]
        ctx.extras["mustdrop_stage"] = stage + 1
        protected = (alive & ctx.protected).sum(dim=1)
        keep = top_visual(global_score, candidates, (target - protected).clamp(min=0))
        ctx.alive = (ctx.alive & ~ctx.visual) | keep | (alive & ctx.protected)

    def finish(self, stage, cache) -> None:
        if not self.shrink_cache or not compat.has_layer_entries(cache):
            return
        ctx, slots = stage.ctx, stage.slots
        survivors = ctx.alive | ~ctx.visual
        for layer in range(self.scoring_layers(ctx.num_layers)[0], ctx.num_layers):
            positions = slots.positions[layer]
            keep = (positions >= 0) & torch.gather(survivors, 1, positions.clamp(min=0))
            if not bool(keep[positions >= 0].all()):
                stage.keep_slots(cache, layer, keep)

"""``h2o``: heavy-hitter KV eviction with a recent window, after the prompt and at every decode step (H2O, Zhang
et al., NeurIPS 2023, arXiv 2306.14048, §3.3 and Algorithm 1), a decode-stage policy.

H2O keeps a fixed-size cache: the entries with the largest *accumulated* attention ("heavy hitters") plus a window
of recent tokens; each step adds the new token and evicts the lowest-scoring one. Here, per layer and sample:

* **prompt**: the accumulated score of a visual slot starts as the attention it receives from the prompt's text
  after the image (the question) and the last prompt token, summed over those rows and averaged over heads — the
  rows the answer depends on, as in SnapKV's observation window (H2O accumulates over every prompt query, which
  needs the full attention matrix). After the prompt each layer keeps ``round(budget · V)`` of its ``V`` visual
  slots with the highest scores plus every text slot; the last ``window`` prompt positions are never evicted.
* **decode** (``rolling``, the paper's form): every step adds the new query's attention (head mean) to each
  slot's score; the step's slot joins the eligible set, and once it is older than ``window`` it competes with the
  visual slots; the eligible slot with the lowest score is evicted, so each layer's cache stays at the size the
  prompt's edit left for any generation length (never below the prompt's text plus the window: when the kept
  visual slots are fewer than ``window`` and all gone, the cache holds the text and the last ``window`` tokens).
  ``rolling=False``: generated tokens are never evicted and the cache grows by one slot per step from the shrunken
  prompt.

Deliberate differences from the paper's code (``FMInference/H2O``, ``h2o_hf``): scores are head means, because a
layer's cache here is one slot set shared by its heads (the official code masks per head over a full-size cache,
saving no memory); the prompt's text tokens are never evicted (the budget counts visual slots, and the text holds
the attention sink and the question); an evicted slot is overwritten by the step's own entry instead of masked,
so the cache really holds ``budget`` entries. Beam search works: the model's ``_reorder_cache`` reorders the
scores with the cache rows.

The prefill itself is untouched (first-token logits equal the uncompressed model's); the saving is KV memory and
decode attention. The budget counts visual slots in the cache, not layer-averaged prefill tokens; ``budget=1.0``
evicts nothing. Stacks with any encoder or prefill method: it acts on whatever each layer cached.
"""

from __future__ import annotations

import dataclasses

import torch

from ..registry import register_method
from .fastv import top_visual
from .llm_base import DecodePolicy, LayerView, PrefillContext, StepView


@dataclasses.dataclass
class RollingScores:
    """Per layer, in slot order: ``scores[l]`` [B, K_l] float32, each cache slot's accumulated attention;
    ``evictable[l]`` [B, K_l] bool, slots of a kind that may go (visual, or generated; the window is checked at
    each step); ``capacity[l]`` [B] the non-padding slots each row holds between steps (-1: unbounded, the prompt's
    edit evicted nothing)."""

    scores: dict[int, torch.Tensor]
    evictable: dict[int, torch.Tensor]
    capacity: dict[int, torch.Tensor]


@register_method("h2o")
@dataclasses.dataclass
class HeavyHitterPolicy(DecodePolicy):
    """Keep each layer's most-attended visual (and generated) KV entries plus a recent window; evict the rest."""

    window: int = dataclasses.field(
        default=8,
        metadata={"help": "H2O's recent window: the last `window` positions (prompt or generated) are never evicted.",
                  "range": (0, None)},
    )
    rolling: bool = dataclasses.field(
        default=True,
        metadata={"help": "Evict at every decode step so each cache stays at its budget (the paper's form); False: "
                          "evict once after the prompt and let generated tokens accumulate."},
    )

    def observe(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        scores = ctx.extras.setdefault("h2o", {})
        scores[layer], = attention.received(ctx.text_after_image | ctx.last_token)  # [B, S]

    def observes_steps(self) -> bool:
        return self.rolling

    def observe_step(self, layer: int, ctx: PrefillContext, attention: StepView) -> None:
        state: RollingScores | None = ctx.extras.get("h2o_rolling")
        if state is None or layer not in state.scores:
            return
        probs = attention()  # [B, K + 1]: the step's own slot last
        state.scores[layer] = _padded(state.scores[layer], probs.shape[1]) + probs  # `evictable` grows at the edit

    def reorder(self, ctx: PrefillContext, beam_idx: torch.Tensor) -> None:
        state: RollingScores | None = ctx.extras.get("h2o_rolling")
        if state is not None:
            for field in ("scores", "evictable", "capacity"):
                rows = {layer: x.index_select(0, beam_idx) for layer, x in getattr(state, field).items()}
                setattr(state, field, rows)

    def apply(self, stage, cache, prompt: bool) -> None:
        if cache is None:
            return
        if prompt:
            self._evict_prompt(stage, cache)
        elif self.rolling:
            self._evict_step(stage, cache)

    def _evict_prompt(self, stage, cache) -> None:
        ctx, slots = stage.ctx, stage.slots
        scores = ctx.extras.get("h2o", {})
        s = ctx.visual.shape[1]
        recent = torch.arange(s, device=ctx.visual.device)[None, :] >= ctx.valid.shape[1] - self.window
        state = RollingScores(scores={}, evictable={}, capacity={})
        for layer in range(len(stage.layers)):
            positions = slots.positions[layer]
            real = positions >= 0
            at = positions.clamp(min=0)
            visual = torch.gather(ctx.visual, 1, at) & real & ~torch.gather(recent.expand_as(ctx.visual), 1, at)
            visual &= torch.gather(ctx.valid, 1, at)
            score = torch.gather(scores[layer], 1, at)
            count = visual.sum(dim=1)
            keep_count = self._kept(count, ctx)
            evicts = keep_count < count  # [B] rows whose cache this policy bounds
            if not bool(evicts.any()):
                continue
            keep = top_visual(score, visual, keep_count) | (real & ~visual)
            index, kept = stage.keep_slots(cache, layer, keep)
            state.scores[layer] = torch.where(kept, torch.gather(score, 1, index), 0.0).float()
            kind = torch.gather(ctx.visual & ctx.valid, 1, at) & real  # visual, in the window or not
            state.evictable[layer] = kept & torch.gather(kind, 1, index)
            state.capacity[layer] = torch.where(evicts, slots.cached_tokens(layer), -1)
        if self.rolling and state.scores:
            ctx.extras["h2o_rolling"] = state

    def _evict_step(self, stage, cache) -> None:
        """After a decode step: each bounded row drops its lowest-scoring eligible slot (visual, or generated and
        older than the window) until it is back at its capacity."""
        slots = stage.slots
        state: RollingScores | None = stage.ctx.extras.get("h2o_rolling")
        if state is None:
            return
        for layer, capacity in state.capacity.items():
            positions = slots.positions[layer]
            width = positions.shape[1]
            score = _padded(state.scores[layer], width)  # a multi-token step was not observed: new slots at 0
            evictable = _padded(state.evictable[layer], width, True)  # generated tokens since the last edit
            real = slots.key_valid.get(layer)
            if real is None or real.shape[1] != width:
                real = (positions >= 0) & torch.gather(slots.valid, 1, positions.clamp(min=0))
            eligible = evictable & real & (positions < slots.length - self.window)
            over = torch.where(capacity >= 0, real.sum(dim=1) - capacity, 0).clamp(max=eligible.sum(dim=1))
            over_max, over_min = torch.aminmax(over)
            if int(over_max) <= 0:
                state.scores[layer], state.evictable[layer] = score, evictable
                continue
            if int(over_min) == 1 and int(over_max) == 1:  # the usual step: one in, one out, written in place
                drop = score.masked_fill(~eligible, float("inf")).argmin(dim=1)  # [B]
                state.scores[layer], state.evictable[layer] = stage.replace_with_last(cache, layer, drop,
                                                                                      (score, evictable))
                continue
            keep_count = eligible.sum(dim=1) - over.clamp(min=0)
            keep = top_visual(score, eligible, keep_count) | (real & ~eligible)
            index, kept = stage.keep_slots(cache, layer, keep)
            state.scores[layer] = torch.where(kept, torch.gather(score, 1, index), 0.0)
            state.evictable[layer] = kept & torch.gather(evictable, 1, index)

    def _kept(self, count: torch.Tensor, ctx: PrefillContext) -> torch.Tensor:
        if isinstance(self.budget, float):
            return torch.floor(count.double() * self.budget + 0.5).long()
        return torch.minimum(count, ctx.images * int(self.budget))


def _padded(values: torch.Tensor, width: int, fill: float | bool = 0.0) -> torch.Tensor:
    """[B, K] → [B, width]: ``fill`` for slots appended since (new tokens start at a score of nothing)."""
    if values.shape[1] == width:
        return values
    return torch.cat([values, values.new_full((values.shape[0], width - values.shape[1]), fill)], dim=1)

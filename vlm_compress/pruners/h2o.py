"""``h2o``: heavy-hitter KV eviction of visual tokens after the prompt (H2O, Zhang et al., NeurIPS 2023,
arXiv 2306.14048), a decode-stage policy.

H2O keeps the cache entries with the largest *accumulated* attention ("heavy hitters") plus a window of recent
tokens. Here, per layer and sample:

* the accumulated score of a visual slot is the attention it receives from the prompt's text after the image
  (the question), summed over those rows and averaged over heads — the rows the answer depends on, as in
  SnapKV's observation window; H2O accumulates over every query, which needs the full attention matrix;
* after the prompt, each layer keeps ``round(budget · V)`` of its ``V`` visual slots with the highest scores, plus
  every text slot; the last ``window`` prompt positions are never evicted (H2O's recent window);
* generated tokens are never evicted, so the cache grows by one slot per step from the shrunken prompt.

The prefill itself is untouched (first-token logits equal the uncompressed model's); the saving is KV memory and
decode attention. The budget here counts visual slots in the cache, not layer-averaged prefill tokens. Stacks
with any encoder or prefill method: it acts on whatever each layer cached.
"""

from __future__ import annotations

import dataclasses

import torch

from ..registry import register_method
from .fastv import top_visual
from .llm_base import DecodePolicy, PrefillContext, LayerView


@register_method("h2o")
@dataclasses.dataclass
class HeavyHitterPolicy(DecodePolicy):
    """Keep each layer's most-attended visual KV entries after the prompt; evict the rest."""

    window: int = dataclasses.field(default=0, metadata={"help": "Recent prompt positions never evicted.", "range": (0, None)})

    def observe(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        scores = ctx.extras.setdefault("h2o", {})
        scores[layer] = attention(ctx.text_after_image | ctx.last_token).sum(dim=1)  # [B, S]

    def apply(self, stage, cache, prompt: bool) -> None:
        if not prompt or cache is None:
            return
        ctx, slots = stage.ctx, stage.slots
        scores = ctx.extras.get("h2o", {})
        s = ctx.visual.shape[1]
        recent = torch.arange(s, device=ctx.visual.device)[None, :] >= ctx.valid.shape[1] - self.window
        for layer in range(len(stage.layers)):
            positions = slots.positions[layer]
            real = positions >= 0
            at = positions.clamp(min=0)
            visual = torch.gather(ctx.visual, 1, at) & real & ~torch.gather(recent.expand_as(ctx.visual), 1, at)
            visual &= torch.gather(ctx.valid, 1, at)
            score = torch.gather(scores[layer], 1, at)
            count = visual.sum(dim=1)
            keep_count = self._kept(count, ctx)
            if bool((keep_count >= count).all()):
                continue
            keep = top_visual(score, visual, keep_count) | (real & ~visual)
            stage.keep_slots(cache, layer, keep)

    def _kept(self, count: torch.Tensor, ctx: PrefillContext) -> torch.Tensor:
        if isinstance(self.budget, float):
            return torch.floor(count.double() * self.budget + 0.5).long()
        return torch.minimum(count, ctx.images * int(self.budget))

"""``m3``: Matryoshka Multimodal Models' nested pooling scales (Cai et al., arXiv 2405.17430, ICLR 2025; reference
trained-tokenizers-speculative §2).

The projected token grid is average-pooled with kernel = stride ``s`` for ``s`` a power of two dividing the grid,
plus the whole grid: on LLaVA-1.5's 24×24 that is 576, 144, 36, 9 and 1 tokens (the official ``finetune.sh``
scales), on tiny-llava's 12×12 144, 36, 9 and 1. Scales are nested: each token of a scale is the mean of four of the
next. A budget maps to the largest scale that fits in it (the official code takes the scale as an explicit argument
and silently rounds others: 100 → 144 tokens; we never exceed the budget). LLaVA-NeXT: the thumbnail and the
high-resolution grid are pooled with the same kernel, so each crop keeps ``(24/s)²`` tokens as in M3's per-grid
pooling; newlines are dropped; at least one token per grid.

Without M3 fine-tuning, the LLM has never seen pooled tokens, so this is the training-free "average pooling"
baseline of the paper's Table 4; with an M3-trained model it is M3.
"""

from __future__ import annotations

import dataclasses
import math

from ..adapters.base import OUTSIDE, TokenLayout
from ..registry import register_method
from .pool import PoolPruner


def m3_kernels(grid: tuple[int, int]) -> list[int]:
    """Pooling kernels of the nested scales, finest first: powers of two dividing both sides, then the whole grid."""
    h, w = grid
    kernels, k = [], 1
    while k < max(h, w) and h % k == 0 and w % k == 0:
        kernels.append(k)
        k *= 2
    return kernels + [max(h, w)]


@register_method("m3")
@dataclasses.dataclass
class M3Pruner(PoolPruner):
    def plan(self, keep: int, layout: TokenLayout) -> list[tuple[int, tuple[int, int]]]:
        prefix = int(((layout.partition == OUTSIDE) & ~layout.newline).sum())
        plans = []
        for k in m3_kernels(layout.grids[0]):
            plans.append([(p, (math.ceil(g[0] / k), math.ceil(g[1] / k))) for p, g in sorted(layout.grids.items())])
            if prefix + sum(h * w for _, (h, w) in plans[-1]) <= keep:
                return plans[-1]
        return plans[-1]

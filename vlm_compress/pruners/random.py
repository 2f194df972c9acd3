"""``random``: a seeded uniform subset of the visual tokens, raster order kept (the floor every method must beat)."""

from __future__ import annotations

import dataclasses

import torch

from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("random")
@dataclasses.dataclass
class RandomPruner(EncoderPruner):
    seed: int = dataclasses.field(
        default=0,
        metadata={
            "help": "Seed. Image j of a prompt keeps the subset drawn from seed + j, so a batch gives the same "
            "selection as single calls."
        },
    )

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        n = ctx.num_tokens
        index = []
        for keep, rank in zip(ctx.keep, ctx.image_index_in_prompt):
            generator = torch.Generator().manual_seed(self.seed + rank)
            index.append(torch.randperm(n, generator=generator)[:keep].sort().values)
        index = [i.to(ctx.features.device) for i in index]
        features = [f[i] for f, i in zip(ctx.features.unbind(0), index)]
        return EncoderSelection(features=features, kept_index=index)

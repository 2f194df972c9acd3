"""The decode stage: edit the per-layer KV caches between forwards (DESIGN.md, "decode").

A decode policy never changes what the prompt's prefill computes (its first-token logits are the uncompressed
model's); it shrinks what later steps attend to, and so the KV memory and the per-step attention cost. Cache
edits go through :func:`keep_slots`, the same per-layer slot bookkeeping the in-LLM stage uses, so a policy works
after any prefill method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from .. import compat
from ..config import MethodConfig
from ..pruners.llm_base import PrefillContext, RowAttention
from .prefill import pack


def keep_slots(stage: Any, cache: Any, layer: int, keep: torch.Tensor) -> None:
    """Keep the ``keep`` [B, K] slots of layer ``layer``'s cache (and its slot positions), in order.

    Samples keeping fewer slots than the batch maximum are padded with dropped slots re-marked as padding (-1).
    """
    slots = stage.slots
    index, real = pack(keep, dummy=0)  # padding entries re-use slot 0, re-marked as padding below
    slots.positions[layer] = torch.where(real, torch.gather(slots.positions[layer], 1, index), -1)
    keys, values = compat.layer_entries(cache, layer)
    gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
    compat.replace_layer_entries(cache, layer, torch.gather(keys, 2, gather), torch.gather(values, 2, gather))
    slots.reshaped = True


@dataclasses.dataclass
class DecodePolicy(MethodConfig):
    """Base of decode-stage methods: observe the prompt's attention while it is prefilled, then edit caches."""

    stage: ClassVar[str] = "decode"

    def check(self, num_layers: int) -> None:
        """Raise a ``ValueError`` naming the fix if the policy cannot run on this LLM."""

    def observe(self, layer: int, ctx: PrefillContext, attention: RowAttention) -> None:
        """Called after every layer of a prompt's prefill, with that layer's row attention."""

    def apply(self, stage: Any, cache: Any, prompt: bool) -> None:
        """Called after every forward (``prompt`` for the prefill) to edit ``cache``'s layers."""

"""The decode stage: edit the per-layer KV caches between forwards (docs/architecture.md, "The three stages").

A decode policy (:class:`~vlm_compress.pruners.llm_base.DecodePolicy`, with the other method bases) runs inside the
in-LLM stage: it observes the prompt's layers and, after every forward, edits the caches with
:meth:`PrefillStage.keep_slots <vlm_compress.stages.prefill.PrefillStage.keep_slots>`, the same per-layer slot
bookkeeping the in-LLM methods use, so a policy works after any prefill method.
"""

from __future__ import annotations

from typing import Any

import torch

from ..pruners.llm_base import DecodePolicy


def keep_slots(stage: Any, cache: Any, layer: int, keep: torch.Tensor) -> None:
    """``stage.keep_slots(cache, layer, keep)``."""
    stage.keep_slots(cache, layer, keep)


__all__ = ["DecodePolicy", "keep_slots"]

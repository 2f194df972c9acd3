"""The decode stage: edit the per-layer KV caches between forwards (docs/architecture.md, "The three stages").

A decode policy (:class:`~vlm_compress.pruners.llm_base.DecodePolicy`, with the other method bases) runs inside the
in-LLM stage: it observes the prompt's layers and, after every forward, edits the caches with
:meth:`PrefillStage.keep_slots <vlm_compress.stages.prefill.PrefillStage.keep_slots>`, the same per-layer slot
bookkeeping the in-LLM methods use, so a policy works after any prefill method.
"""

from __future__ import annotations

from ..pruners.llm_base import DecodePolicy

__all__ = ["DecodePolicy"]

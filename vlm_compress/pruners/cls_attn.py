"""``cls_attn``: keep the visual tokens the vision tower's CLS attends to most, in raster order.

The common core of FasterVLM/VisionZip-dominant/HiRED-selection: top-k of the CLS→patch attention of the
layer whose output feeds the LLM (ViT layer 22 of 24 for LLaVA-1.5; reference §1).

Towers without CLS (SigLIP; Qwen2-VL/Qwen2.5-VL) score with the substitute of :mod:`vlm_compress.scoring`: the
attention a token receives, averaged over the queries of its own tower image (Qwen: its image or video frame, over
the whole image even in Qwen2.5-VL's windowed layers); a Qwen visual token (2×2 merged patches) gets the mean of its
four patches' scores.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops import HEAD_REDUCTIONS, SCORE_KINDS
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("cls_attn")
@dataclasses.dataclass
class ClsAttnPruner(EncoderPruner):
    layer: int = dataclasses.field(
        default=-2,
        metadata={"help": "Vision-tower layer whose CLS row scores tokens; -2 is the layer LLaVA-1.5 takes features from."},
    )
    head_reduce: str = dataclasses.field(default="mean", metadata={"help": "Reduce heads by 'mean', 'sum' or 'max'.", "choices": HEAD_REDUCTIONS})
    kind: str = dataclasses.field(default="probs", metadata={"help": "'probs' (post-softmax) or 'logits'.", "choices": SCORE_KINDS})

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor:
        return ctx.cls_attention(self.layer, self.head_reduce, self.kind)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        return EncoderSelection.top_k(ctx.features, self.token_scores(ctx), ctx.uniform_keep())

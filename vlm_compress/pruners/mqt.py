"""``mqt``: Matryoshka Query Transformer (Hu et al., arXiv 2405.19315; reference trained-tokenizers-speculative §3).

A trained resampler (:class:`vlm_compress.modules.resampler.QueryResampler`) replaces the projector: its first
``m`` latent queries, ``m`` = the budget's token count (at most the ``M`` it was trained with), cross-attend to the
vision tower's feature-layer patches and become the ``m`` visual tokens the LLM sees. Needs weights trained for
the model: ``resampler=PATH`` (default: the one trained for the embedded ``tiny-llava`` by
``python -m vlm_compress.bench.train_mqt``; official MQT-LLaVA weights convert with
:func:`vlm_compress.loaders.convert_original_llava`). Single-grid models only (MQT has no AnyRes variant). The resampler replaces the projector, so no budget
reproduces the stock model's outputs (the one method without identity at budget 1.0).

``kept_index`` holds, per output token, the patch its query attends to most (the query's spatial centre; the keys
are positions only, so this does not depend on the image), for overlays.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from ..adapters.base import Adapter
from ..modules.resampler import QueryResampler
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection

EMBEDDED_RESAMPLER = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava-mqt"


@functools.lru_cache(maxsize=4)
def _load(path: str) -> QueryResampler:
    return QueryResampler.load(path)


@register_method("mqt")
@dataclasses.dataclass
class MQTPruner(EncoderPruner):
    resampler: str = dataclasses.field(
        default=str(EMBEDDED_RESAMPLER),
        metadata={"help": "Directory of a trained resampler (resampler_config.json + resampler.safetensors)."},
    )

    def module(self) -> QueryResampler:
        try:
            return _load(str(self.resampler))
        except ValueError as err:
            raise ValueError(f"{err}; pass resampler=PATH, or train the embedded one with "
                             "python -m vlm_compress.bench.train_mqt") from None

    def check(self, adapter: Adapter) -> None:
        if adapter.anyres:
            raise ValueError("mqt resamples one patch grid; it has no AnyRes (LLaVA-NeXT) variant")
        config = self.module().config
        vision, text = adapter.vision_feature_size, adapter.text_config.hidden_size
        if (config.kv_dim, config.embed_dim) != (vision, text):
            raise ValueError(f"the resampler at {self.resampler} maps {config.kv_dim} → {config.embed_dim} features; "
                             f"this model needs {vision} → {text}: pass resampler=PATH trained for it")

    def output_count(self, keep: int, layout) -> int:
        return min(keep, self.module().config.num_queries)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        module = self.module()
        grid = ctx.layout.tokens_of(0).to(ctx.features.device)  # the patch grid, without any CLS prefix
        vision = ctx.images.vision_features[:, grid]
        m = ctx.uniform_keep()
        param = next(module.parameters())
        with torch.no_grad():
            out, weights = module.to(vision.device)(vision.to(param.dtype), m, return_weights=True)
        centre = grid[weights[0].argmax(-1)]  # [m]
        return EncoderSelection(features=list(out.to(ctx.features.dtype).unbind(0)),
                                kept_index=[centre] * out.shape[0])

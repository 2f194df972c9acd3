"""Base of encoder-stage methods: what a pruner sees (:class:`EncoderContext`) and returns (:class:`EncoderSelection`).

A pruner is a :class:`MethodConfig` dataclass with one job: from scores and image structure to kept tokens.
Hooks, input rewriting and statistics live in :mod:`vlm_compress.stages.encoder`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .. import kernels
from ..adapters.base import ImageBatch, TokenLayout
from ..config import MethodConfig
from ..ops import HeadReduce, ScoreKind, gather_tokens
from ..scoring import AttentionCapture


@dataclasses.dataclass
class EncoderContext:
    """Inputs of one selection call over ``I`` images that share a layout of ``N`` visual tokens.

    ``keep[i]`` is the number of tokens image ``i`` must come out with; ``image_index_in_prompt[i]`` its rank
    among the images of its own prompt (batch-invariant, unlike the flat index ``i``).
    """

    images: ImageBatch
    keep: list[int]
    image_index_in_prompt: list[int]
    capture: AttentionCapture

    @property
    def features(self) -> torch.Tensor:
        """``[I, N, D]`` projected visual tokens."""
        return self.images.features

    @property
    def num_tokens(self) -> int:
        return self.images.features.shape[1]

    @property
    def layout(self) -> TokenLayout:
        return self.images.layout

    def cls_attention(self, layer: int, head_reduce: HeadReduce = "mean", kind: ScoreKind = "probs") -> torch.Tensor:
        """``[I, N]`` float32: each visual token's attention from the CLS of the tower image it came from (a crop's
        own CLS under AnyRes) at vision ``layer``; ``-inf`` for tokens the tower did not produce (newlines), so
        score-based methods drop them first."""
        return self._per_token(self.capture.first_row_attention(layer, head_reduce, kind), float("-inf"))

    def keys(self, layer: int) -> torch.Tensor:
        """``[I, N, head_dim]`` head-mean keys of vision ``layer`` per visual token (zeros for newlines)."""
        return self._per_token(self.capture.head_mean_keys(layer), 0.0)

    def attention_statistics(self, layer: int, kind: ScoreKind = "logits") -> tuple[torch.Tensor, torch.Tensor]:
        """``(received, given)`` ``[I, N]`` float32: the head-mean patch-to-patch attention of vision ``layer`` each
        visual token receives (mean over queries) and gives (mean over keys), within its own tower image and
        excluding CLS; ``-inf`` for tokens without one (newlines, CLS). Needs :meth:`EncoderPruner.needs_all_query_rows`."""
        means = self.capture.attention_means(layer, kind)  # [tower images, T - 1]: CLS has none
        cls = torch.full_like(means[0][:, :1], float("-inf"))
        return tuple(self._per_token(torch.cat([cls, m], dim=1), float("-inf")) for m in means)

    def hidden(self, layer: int) -> torch.Tensor:
        """``[I, N, Dv]`` output of vision ``layer`` at each visual token (zeros for newlines)."""
        return self._per_token(self.capture.hidden_states[layer], 0.0)

    def _per_token(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Tower outputs ``[tower images, T, ...]`` at each visual token's source: ``[I, N, ...]``, ``fill`` where
        the tower produced no token (newlines)."""
        source = self.images.source
        out = values.flatten(0, 1)[source.clamp_min(0)]
        missing = (source < 0).view(*source.shape, *([1] * (out.dim() - source.dim())))
        return out.masked_fill(missing, fill)

    def tower_cell(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tower image [I, N], (row, col) [I, N, 2])``: where each visual token sits in the tower image it came
        from (a crop, the thumbnail, or the only image), its patch grid being ``images.grid``; -1 for
        newlines and CLS."""
        per_image = self.images.tower_length
        source = self.images.source
        patch = source % per_image - (per_image - self.images.grid[0] * self.images.grid[1])
        valid = (source >= 0) & (patch >= 0)
        side = self.images.grid[1]
        cell = torch.stack([patch // side, patch % side], -1).masked_fill(~valid.unsqueeze(-1), -1)
        return torch.where(valid, source // per_image, torch.full_like(source, -1)), cell

    def uniform_keep(self) -> int:
        """The common ``keep`` count (images of one call share a layout, hence a count)."""
        if len(set(self.keep)) != 1:
            raise ValueError(f"this pruner needs one token count for all images, got {sorted(set(self.keep))}")
        return self.keep[0]


@dataclasses.dataclass
class EncoderSelection:
    """Result of a pruner, per image.

    features: ``[k_i, D]`` tokens to feed to the LLM, in the order they will be placed.
    kept_index: ``[k_i]`` index of the source token of each output (the representative for merged tokens).
    merged_into: optional ``[N]`` output slot each source token went into (-1 if dropped), for overlays.
    protected: optional ``[p_i]`` output slots later stages must not drop (MustDrop's key set).
    """

    features: list[torch.Tensor]
    kept_index: list[torch.Tensor]
    merged_into: list[torch.Tensor] | None = None
    protected: list[torch.Tensor] | None = None

    @classmethod
    def from_indices(cls, features: torch.Tensor, index: torch.Tensor) -> "EncoderSelection":
        """Selection by gathering ``features`` [I, N, D] at sorted ``index`` [I, k]."""
        return cls(features=list(gather_tokens(features, index).unbind(0)), kept_index=list(index.unbind(0)))

    @classmethod
    def top_k(cls, features: torch.Tensor, scores: torch.Tensor, k: int) -> "EncoderSelection":
        """The ``k`` highest-scoring rows of ``features`` [I, N, D] by ``scores`` [I, N], in raster order (ties:
        lower index), through the fused top-k + gather kernel dispatch."""
        kept, index, _ = kernels.topk_gather(scores, features, k)
        return cls(features=list(kept.unbind(0)), kept_index=list(index.unbind(0)))


@dataclasses.dataclass
class EncoderPruner(MethodConfig):
    """Encoder-stage method: choose or merge visual tokens before they enter the LLM."""

    stage: ClassVar[str] = "encoder"
    adaptive_count: ClassVar[bool] = False  # may return fewer tokens than the budget (data-dependent merging)
    requires_anyres: ClassVar[bool] = False  # needs thumbnail + crops (LLaVA-NeXT); compress() refuses other models

    def check(self, adapter) -> None:
        """Raise a ``ValueError`` if this method cannot run on ``adapter``'s model (called by ``compress``)."""
        if self.requires_anyres and not adapter.anyres:
            raise ValueError(
                f"{self.name!r} needs AnyRes images (thumbnail + crops), which {type(adapter.model).__name__} does not "
                f"have; use it on LlavaNextForConditionalGeneration, or pick a single-grid method such as 'cls_attn'"
            )

    def attention_layers(self) -> tuple[int, ...]:
        """Vision-tower layers whose queries/keys :meth:`select` reads (empty: no hooks)."""
        return ()

    def hidden_state_layers(self) -> tuple[int, ...]:
        """Vision-tower layers whose output hidden states :meth:`select` reads (:meth:`EncoderContext.hidden`)."""
        return ()

    def needs_all_query_rows(self) -> bool:
        """Whether :meth:`select` reads attention rows other than CLS (full maps cost memory; say so only then)."""
        return False

    def output_count(self, keep: int, images: ImageBatch) -> int:
        """Tokens this method outputs for a budget of ``keep`` (a pooling grid may give fewer)."""
        return keep

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        raise NotImplementedError

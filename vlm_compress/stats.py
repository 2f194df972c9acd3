"""What one compressed forward/generate cost: token counts, a FLOPs model, KV-cache bytes, selection time."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass
class CompressionStats:
    """Statistics of the last prefill that went through a compressed model (whole batch).

    Token counts are totals over the batch; ``*_per_image`` are the per-image means. ``layer_avg_visual_tokens``
    follows the equal-cost convention of docs/architecture.md (visual tokens averaged over LLM layers, per image).
    """

    images: int
    visual_tokens_in: int
    visual_tokens_kept: int  # entering the LLM
    layer_avg_visual_tokens: float  # per image
    prompt_tokens_in: int  # non-padding prompt tokens before compression
    prompt_tokens_llm: int  # non-padding prompt tokens entering the LLM
    prefill_flops: float
    prefill_flops_full: float
    kv_cache_bytes: int  # after the prompt (after eviction, with a decode policy)
    kv_cache_bytes_full: int
    encode_ms: float  # vision tower + projector, including score capture
    select_ms: float  # scoring and selection/merging, excluding the tower
    kept_per_image: list[int]
    newlines_in: int = 0  # LLaVA-NeXT newline tokens among visual_tokens_in (counted as visual tokens)
    newlines_kept: int = 0  # of those, how many reach the LLM
    layer_visual_tokens: list[float] | None = None  # in-LLM methods: visual tokens per image at each layer
    kv_cache_bytes_decode: int | None = None  # decode policies: KV bytes after the last generated token
    decode_select_ms: float = 0.0  # decode policies: per-step scoring and eviction, summed since the prompt
    kept_per_frame: list[list[int]] | None = None  # videos: tokens kept in each frame, per video
    frame_scores: list[list[float] | None] | None = None  # videos: a frame-scoring method's scores, per video
    scoring_passes: int = 0  # model passes a method ran to score (QuoTA: decoupling + frame relevance)
    scoring_ms: float = 0.0  # their wall time (inside select_ms)
    scoring_tokens: int = 0  # tokens they processed (prompt + generated)
    scoring_flops: float = 0.0  # their FLOPs (LLM prefill of every token + vision tower per frame)

    @property
    def visual_tokens_per_image_in(self) -> float:
        return self.visual_tokens_in / max(self.images, 1)

    @property
    def visual_tokens_per_image_kept(self) -> float:
        return self.visual_tokens_kept / max(self.images, 1)

    @property
    def kept_fraction(self) -> float:
        return self.visual_tokens_kept / max(self.visual_tokens_in, 1)

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / max(self.prefill_flops_full, 1.0)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(kept_fraction=self.kept_fraction, flops_ratio=self.flops_ratio)
        return out


def _text_dims(text_config: Any) -> tuple[int, int, int, int, int, int]:
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    return d, heads * head_dim, kv_heads * head_dim, text_config.intermediate_size, text_config.num_hidden_layers, head_dim


def layer_flops(n: int, text_config: Any) -> float:
    """FLOPs of one decoder layer on ``n`` tokens (prefill, no cache).

    ``2·[n·d·(2·d_q + 2·d_kv) + 2·n²·d_q + 3·n·d·m]``: q/o and k/v projections, QKᵀ and AV over the full n×n
    square (causal masking not credited), and the gated MLP; 2 FLOPs per multiply-add. With d_q = d_kv = d this
    is twice SparseVLM's per-layer count ``4nd² + 2n²d + 3ndm``. Norms, RoPE and softmax are ignored.
    """
    d, d_q, d_kv, m, _, _ = _text_dims(text_config)
    return 2.0 * (n * d * (2 * d_q + 2 * d_kv) + 2 * n * n * d_q + 3 * n * d * m)


def prefill_flops(tokens_per_layer: Sequence[Sequence[int]], text_config: Any) -> float:
    """Sum of :func:`layer_flops` over samples and layers. tokens_per_layer: ``[batch][layer]`` token counts."""
    return sum(layer_flops(n, text_config) for sample in tokens_per_layer for n in sample)


def decode_flops(cached_tokens: float, text_config: Any) -> float:
    """FLOPs of one decode step with ``cached_tokens`` KV entries summed over all layers.

    Per layer the projections and MLP of one token, ``2·[d·(2·d_q + 2·d_kv) + 3·d·m]``, plus ``2·2·d_q`` per cached
    entry (QKᵀ and AV), plus the LM head ``2·d·V``. Only the attention term shrinks with the cache.
    """
    d, d_q, d_kv, m, layers, _ = _text_dims(text_config)
    fixed = layers * 2.0 * (d * (2 * d_q + 2 * d_kv) + 3 * d * m) + 2.0 * d * text_config.vocab_size
    return fixed + 4.0 * d_q * cached_tokens


def kv_entry_bytes(text_config: Any, element_size: int) -> int:
    """Bytes of K and V of one token in one layer."""
    _, _, d_kv, *_ = _text_dims(text_config)
    return 2 * d_kv * element_size


def kv_cache_bytes(tokens_per_layer: Sequence[Sequence[int]], text_config: Any, element_size: int) -> int:
    """Bytes of K and V cached after prefill for the non-padding tokens of each sample and layer."""
    return int(sum(n for sample in tokens_per_layer for n in sample) * kv_entry_bytes(text_config, element_size))


def prompt_costs(lengths: Sequence[int], text_config: Any, element_size: int) -> tuple[float, int]:
    """(prefill FLOPs, KV-cache bytes) of prompts with these non-padding lengths when every layer sees them all."""
    per_layer = [[n] * text_config.num_hidden_layers for n in lengths]
    return prefill_flops(per_layer, text_config), kv_cache_bytes(per_layer, text_config, element_size)


def vision_flops(vision_config: Any, tokens: int, images: int = 1) -> float:
    """FLOPs of a ViT (CLIP-style: q/k/v/o projections, 2-matrix MLP) over ``tokens`` per image, all layers.

    ``2·[4·T·d² + 2·T²·d + 2·T·d·m]`` per layer plus the patch embedding ``2·T·3·p²·d``. Compression never
    shortens the tower here (encoder-stage methods act on its output), so this is the fixed part of a prefill.
    """
    config = vision_config
    d = getattr(config, "embed_dim", None) or config.hidden_size  # Qwen2-VL: embed_dim (hidden_size is its output)
    m = getattr(config, "intermediate_size", None) or int(d * config.mlp_ratio)
    layers = getattr(config, "num_hidden_layers", None) or config.depth
    p, frames = config.patch_size, getattr(config, "temporal_patch_size", 1)  # Qwen: 2 frames per patch
    per_layer = 2.0 * (4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m)
    return images * (layers * per_layer + 2.0 * tokens * 3 * frames * p * p * d)

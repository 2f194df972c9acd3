"""Attention rows inside the LLM, computed from q/k instead of ``output_attentions`` (docs/architecture.md,
"The three stages").

Only the rows a method asks for are computed: the query projection of those rows (with RoPE) against the keys
a layer already holds, so SDPA/flash attention stay on for the layer itself and peak memory does not grow.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, R, hd]; cos/sin: [B, R, hd] (the rotary tables of the rows' own positions)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def check_decoder_layer(layer: nn.Module) -> None:
    """A Llama/Qwen2/Mistral-style decoder layer: ``input_layernorm``, ``self_attn.{q,k}_proj``, ``mlp``."""
    attn = getattr(layer, "self_attn", None)
    needed = ("input_layernorm", "post_attention_layernorm", "mlp")
    if attn is None or not all(hasattr(layer, n) for n in needed) or not all(
        hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")
    ):
        raise TypeError(
            f"in-LLM methods support Llama/Qwen2/Mistral-style decoder layers (input_layernorm, self_attn.q_proj/"
            f"k_proj, mlp); got {type(layer).__name__}"
        )
    if getattr(attn, "q_norm", None) is not None:
        raise TypeError(f"{type(layer).__name__} normalises queries (q_norm); its row attention is not implemented")


def project_queries(layer: nn.Module, hidden_rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Queries of ``hidden_rows`` [B, R, D] (the layer *input*) at layer ``layer``, RoPE applied: [B, H, R, hd]."""
    attn = layer.self_attn
    b, r, _ = hidden_rows.shape
    q = attn.q_proj(layer.input_layernorm(hidden_rows)).view(b, r, -1, attn.head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin)


def project_keys(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Keys of ``hidden`` [B, N, D] as the layer caches them (RoPE applied): [B, H_kv, N, hd]."""
    attn = layer.self_attn
    b, n, _ = hidden.shape
    k = attn.k_proj(layer.input_layernorm(hidden)).view(b, n, -1, attn.head_dim).transpose(1, 2)
    return apply_rope(k, cos, sin)


def row_attention(
    layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Head-mean post-softmax attention of query rows over keys: [B, R, K].

    queries: [B, H, R, hd] (RoPE applied); keys: [B, H_kv, K, hd] (from the cache, RoPE applied);
    allowed: [B, R, K] bool, which keys each row may see (causality and padding). Softmax in float32.
    """
    # a row with no allowed key (padding) is all zero
    return kernels.row_attention(queries, keys, layer.self_attn.scaling, "mean", "probs", allowed)


def row_attention_received(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """[B, G, K]: ``weights`` [B, G, R] times :func:`row_attention`'s rows, summed over rows, without forming them
    (``kernels.row_attention_received``); rows with no allowed key must weigh 0."""
    return kernels.row_attention_received(queries, keys, layer.self_attn.scaling, allowed, weights)

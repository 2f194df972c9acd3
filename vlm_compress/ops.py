"""Shared tensor primitives for the pruners: order-preserving top-k, gathers, row attention, pooling, merges.

Everything here is batched over a leading dim and free of model knowledge.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import torch
import torch.nn.functional as F

from . import kernels

HeadReduce = Literal["mean", "sum", "max"]
ScoreKind = Literal["probs", "logits"]
HEAD_REDUCTIONS = typing.get_args(HeadReduce)  # the choices of methods' head_reduce option
SCORE_KINDS = typing.get_args(ScoreKind)  # the choices of methods' kind option


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, returned in ascending (raster) order.

    scores: ``[..., N]`` → ``[..., k]`` (int64). Ties go to the lower index (stable descending sort), so the
    result is deterministic across devices and batch sizes.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [B, N, D] at ``index`` [B, k] → [B, k, D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def row_attention(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    head_reduce: HeadReduce = "mean",
    kind: ScoreKind = "probs",
) -> torch.Tensor:
    """Attention of a few query rows against all keys, without materialising the full map.

    q_rows: ``[B, R, H, hd]``, k: ``[B, N, H, hd]`` (any RoPE already applied) → ``[B, R, N]`` in float32:
    ``softmax(q·kᵀ·scale)`` per head (``kind="probs"``) or the pre-softmax logits, reduced over heads.
    """
    if head_reduce not in ("mean", "sum", "max"):
        raise ValueError(f"head_reduce must be 'mean', 'sum' or 'max', got {head_reduce!r}")
    return kernels.row_attention(q_rows.transpose(1, 2), k.transpose(1, 2), scale, head_reduce, kind)


def pooled_grid_shape(count: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Largest pooled grid with the aspect ratio of ``grid`` and at most ``count`` cells.

    Each side is ``floor(side · sqrt(count / cells))`` (at least 1), so a square 24×24 grid with a budget of
    115 tokens pools to 10×10 = 100. ``count >= cells`` returns ``grid`` unchanged.
    """
    h, w = grid
    if count >= h * w:
        return h, w
    f = math.sqrt(count / (h * w))
    return max(1, min(h, math.floor(h * f + 1e-9))), max(1, min(w, math.floor(w * f + 1e-9)))


def pool_grid(x: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """2-D average pooling of a raster token grid: ``[B, h·w, D]`` → ``[B, h'·w', D]`` (adaptive windows)."""
    h, w = grid
    if tuple(out) == (h, w):
        return x
    b, n, d = x.shape
    if n != h * w:
        raise ValueError(f"expected {h}×{w}={h * w} tokens, got {n}")
    img = x.transpose(1, 2).reshape(b, d, h, w)
    pooled = F.adaptive_avg_pool2d(img.float(), out).to(x.dtype)
    return pooled.flatten(2).transpose(1, 2)


def merge_into_targets(
    x: torch.Tensor, metric: torch.Tensor, target_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign every non-target token to its most cosine-similar target and add the mean of each group.

    x: ``[B, M, D]`` values; metric: ``[B, M, C]`` similarity features; target_index: ``[B, c]`` sorted.
    Returns ``(merged [B, c, D], assignment [B, M])`` where ``merged_j = x_target_j + mean(x_assigned_j)`` (the
    VisionZip contextual-token rule; an empty group adds 0) and ``assignment`` holds, per token, the position
    in ``0..c-1`` of the target it went into (targets map to themselves).
    """
    b, m, _ = x.shape
    c = target_index.shape[1]
    is_target = torch.zeros(b, m, dtype=torch.bool, device=x.device)
    is_target.scatter_(1, target_index, True)
    metric = F.normalize(metric.float(), dim=-1)
    sim = metric @ gather_tokens(metric, target_index).transpose(1, 2)  # [B, M, c]
    assignment = sim.argmax(dim=-1)
    slot = torch.arange(c, device=x.device).expand(b, c)
    assignment = assignment.scatter(1, target_index, slot)
    one_hot = F.one_hot(assignment, c).to(torch.float32) * (~is_target).unsqueeze(-1)  # [B, M, c]
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, c, 1]
    mean_assigned = (one_hot.transpose(1, 2) @ x.float()) / counts
    merged = gather_tokens(x, target_index).float() + mean_assigned
    return merged.to(x.dtype), assignment

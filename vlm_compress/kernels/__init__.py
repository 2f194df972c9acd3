"""Fused kernels for the hot selection and merge steps, behind one dispatch.

Each function runs a Triton kernel (:mod:`.triton_kernels`) on CUDA tensors when Triton is installed, and its torch
reference (:mod:`.reference`) otherwise. ``VLM_COMPRESS_KERNELS`` overrides the choice: ``torch`` always takes the
reference, ``triton`` always the kernel (on CPU tensors that needs ``TRITON_INTERPRET=1`` set before the first
kernel import: the interpreter the tests use), ``auto`` (default) decides by device. Methods call these functions,
never the kernels directly.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import reference
from .reference import KINDS, REDUCTIONS

BACKENDS = ("auto", "torch", "triton")
ENV = "VLM_COMPRESS_KERNELS"

__all__ = ["backend", "best_match", "bipartite_merge", "grid_windows", "row_attention", "topk_gather", "window_merge"]


@functools.lru_cache(maxsize=1)
def _triton_module():
    from . import triton_kernels

    return triton_kernels


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # ~20 µs: once, not at every decode step's scoring


def backend(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: what a kernel call on ``tensors`` runs now."""
    choice = os.environ.get(ENV, "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {BACKENDS}, got {choice!r}")
    available = _triton_installed()
    if choice == "triton":
        if not available:
            raise RuntimeError(f"{ENV}=triton but triton is not installed: pip install triton, or unset {ENV}")
        if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return "triton"
    if choice == "auto" and available and tensors and all(t.is_cuda for t in tensors):
        return "triton"
    return "torch"


def _as_groups(value, batch: int, total: int, device) -> torch.Tensor:
    if value is None:
        return torch.full((batch, 1), total, dtype=torch.long, device=device)
    value = torch.as_tensor(value, dtype=torch.long, device=device)
    return value.expand(batch, -1).contiguous() if value.dim() == 1 else value.contiguous()


def topk_gather(scores: torch.Tensor, features: torch.Tensor, k: int | torch.Tensor,
                group_sizes: torch.Tensor | list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, or per group of a row, the ``k`` highest-scoring feature rows, in their original order.

    scores [B, N]; features [B, N, D]; ``group_sizes`` [B, G] (or [G] for every sample; default one group of N):
    consecutive runs from position 0, e.g. the crops or frames of a sample, ragged with zero-size padding groups;
    ``k``: an int or [B, G]. Ties go to the lower index; ``k = 0`` keeps nothing of a group, ``k >=`` its size
    keeps all of it. Returns (kept [B, K, D] zero-padded, index [B, K] into N with -1 padding, counts [B]),
    ``K`` the largest count. One kernel launch for the whole batch.
    """
    if scores.dim() != 2 or features.dim() != 3 or features.shape[:2] != scores.shape:
        raise ValueError(f"topk_gather expects scores [B, N] and features [B, N, D]; got {tuple(scores.shape)} "
                         f"and {tuple(features.shape)}")
    b, n = scores.shape
    sizes = _as_groups(group_sizes, b, n, scores.device)
    if (sizes.sum(dim=1) > n).any() or (sizes < 0).any():
        raise ValueError(f"group sizes {sizes.tolist()} must be >= 0 and sum to at most N = {n} per sample")
    counts = _as_groups(k, b, n, scores.device) if isinstance(k, torch.Tensor) else torch.full_like(sizes, int(k))
    if counts.shape != sizes.shape or (counts < 0).any():
        raise ValueError(f"k must be an int >= 0 or one value >= 0 per group {tuple(sizes.shape)}")
    if backend(scores, features) == "torch":
        return reference.topk_gather(scores, features, sizes, counts)
    sample, starts, lengths, kept, out_starts, per_sample = reference.segments(sizes, counts)
    width = int(per_sample.max()) if per_sample.numel() else 0
    out, index = _triton_module().topk_gather(scores, features, sample, starts, lengths, kept, out_starts, width)
    return out, index, per_sample


def row_attention(q: torch.Tensor, k: torch.Tensor, scale: float, reduce: str = "mean", kind: str = "probs",
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q·Kᵀ·scale)`` per head (or the logits), reduced over heads, for a few query rows: [B, R, N] float32.

    q [B, H, R, hd], k [B, H_kv, N, hd] with RoPE already applied (H a multiple of H_kv: grouped-query heads);
    ``allowed`` [B, R, N] bool masks keys per row (masked: probability 0, logit ``-inf``). Never materialises more
    than the requested rows.
    """
    if reduce not in REDUCTIONS or kind not in KINDS:
        raise ValueError(f"reduce must be one of {REDUCTIONS} and kind one of {KINDS}; got {reduce!r}, {kind!r}")
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"row_attention expects q [B, H, R, hd] and k [B, H_kv, N, hd] with H a multiple of H_kv; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if backend(q, k) == "torch":
        return reference.row_attention(q, k, scale, reduce, kind, allowed)
    return _triton_module().row_attention(q, k, scale, reduce, kind, allowed)


def row_attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """``[B, G, N]`` float32: per group ``g``, ``Σ_r weights[:, g, r]`` times the head-mean post-softmax attention of
    row ``r`` (:func:`row_attention` with ``"mean"``, ``"probs"``), the rows never formed on the torch path.

    q [B, H, R, hd], k [B, H_kv, N, hd] (RoPE applied), allowed [B, R, N] bool, weights [B, G, R] (0 for rows with
    no allowed key).
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1] or weights.shape[-1] != q.shape[2]:
        raise ValueError(f"row_attention_received expects q [B, H, R, hd], k [B, H_kv, N, hd], weights [B, G, R]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(weights.shape)}")
    if backend(q, k) == "torch":
        return reference.row_attention_received(q, k, scale, allowed, weights)
    rows = _triton_module().row_attention(q, k, scale, "mean", "probs", allowed)  # [B, R, N]
    return torch.bmm(weights.float(), rows)


def grid_windows(height: int, width: int, window: int, device=None) -> torch.Tensor:
    """[W, window²] token indices of the complete ``window×window`` windows of a raster grid, members in raster
    order (windows that would cross the border are left out)."""
    rows, cols = height // window, width // window
    wy, wx, dy, dx = torch.meshgrid(torch.arange(rows), torch.arange(cols), torch.arange(window), torch.arange(window),
                                    indexing="ij")
    index = (wy * window + dy) * width + wx * window + dx
    return index.reshape(rows * cols, window * window).to(device)


def window_merge(values: torch.Tensor, metric: torch.Tensor, windows: torch.Tensor, threshold: float,
                 sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which windows of tokens merge, and their size-weighted means (MustDrop stage 1's window merge).

    values [B, N, D]; metric [B, N, C]; windows [B, W, M] (or [W, M] for every sample) token indices, a row of -1
    marking an absent window; ``sizes`` [B, N] token sizes (default 1). A window merges when the mean pairwise
    cosine similarity of its members' metric rows is ``>= threshold``. Returns (merged [B, W] bool,
    similarity [B, W] float32, mean [B, W, D]).
    """
    if windows.dim() == 2:
        windows = windows.expand(values.shape[0], -1, -1)
    windows = windows.to(device=values.device, dtype=torch.long)
    if windows.shape[-1] < 2:
        raise ValueError(f"a merge window needs at least 2 members, got {windows.shape[-1]}")
    if backend(values, metric) == "torch":
        return reference.window_merge(values, metric, windows, threshold, sizes)
    weights = torch.ones(values.shape[:2], device=values.device) if sizes is None else sizes.float()
    similarity, mean = _triton_module().window_merge(values, metric, windows, weights)
    present = windows[..., 0] >= 0
    return present & (similarity >= threshold), similarity, mean.to(values.dtype)


def best_match(metric_a: torch.Tensor, metric_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``metric_a`` [B, Na, C] the most cosine-similar row of ``metric_b`` [B, Nb, C]:
    (similarity [B, Na] float32, index [B, Na]); ties go to the lower index."""
    if backend(metric_a, metric_b) == "torch":
        return reference.best_match(metric_a, metric_b)
    return _triton_module().best_match(metric_a, metric_b)


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int, sizes: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023): merge ``r`` tokens per sample.

    Tokens alternate into sets A (even positions) and B (odd); each A token's best B match by cosine similarity
    of ``metric`` (:func:`best_match`, the fused step) is an edge, and the ``r`` most similar edges merge their A
    token into its B token by size-weighted averaging. x [B, N, D]; metric [B, N, C]; sizes [B, N] (default 1).
    Returns (merged [B, N − r, D] with the survivors in their original order, sizes [B, N − r], source [B, N]:
    the output slot every input token went to).
    """
    b, n, d = x.shape
    r = max(0, min(int(r), (n + 1) // 2))
    weights = torch.ones(b, n, device=x.device) if sizes is None else sizes.float()
    if r == 0 or n < 2:
        return x, weights, torch.arange(n, device=x.device).expand(b, n)
    similarity, match = best_match(metric[:, ::2], metric[:, 1::2])
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    merged_a = order[:, :r]  # positions within A
    keep = torch.ones(b, n, dtype=torch.bool, device=x.device)
    keep.scatter_(1, 2 * merged_a, False)
    slot = torch.cumsum(keep.long(), dim=1) - 1
    source = slot.clone()
    source.scatter_(1, 2 * merged_a, slot.gather(1, 2 * match.gather(1, merged_a) + 1))
    total = torch.zeros(b, n - r, device=x.device).scatter_add_(1, source, weights)
    summed = torch.zeros(b, n - r, d, device=x.device).scatter_add_(
        1, source[..., None].expand(-1, -1, d), x.float() * weights[..., None])
    return (summed / total[..., None]).to(x.dtype), total, source

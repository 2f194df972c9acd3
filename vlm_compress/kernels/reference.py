"""Torch references of the fused kernels: the semantics every Triton kernel is tested against, and the path taken
on CPU tensors (or whenever ``VLM_COMPRESS_KERNELS=torch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "max")
KINDS = ("probs", "logits")


def segments(group_sizes: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flatten ``[B, G]`` groups into segments: (sample, start, length, kept, output start), each [B·G] int64,
    plus the kept count per sample [B]. ``k`` is clamped to each group's size."""
    b, g = group_sizes.shape
    kept = torch.minimum(k, group_sizes).clamp(min=0)
    starts = torch.cumsum(group_sizes, dim=1) - group_sizes
    out_starts = torch.cumsum(kept, dim=1) - kept
    sample = torch.arange(b, device=group_sizes.device).repeat_interleave(g)
    return sample, starts.flatten(), group_sizes.flatten(), kept.flatten(), out_starts.flatten(), kept.sum(dim=1)


def topk_gather(scores: torch.Tensor, features: torch.Tensor, group_sizes: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, the ``k`` highest scores (ties: lower index) gathered in their original order.

    scores [B, N]; features [B, N, D]; group_sizes, k [B, G] int64 (groups are consecutive runs from position 0).
    Returns (kept features [B, K, D] zero-padded, kept index [B, K] into N with -1 padding, counts [B]);
    ``K`` is the largest count. Batched over samples, one stable sort per group.
    """
    b, n = scores.shape
    kept = torch.minimum(k, group_sizes).clamp(min=0)
    counts = kept.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    ends = torch.cumsum(group_sizes, dim=1)
    group_of = torch.searchsorted(ends, torch.arange(n, device=scores.device).expand(b, n).contiguous(), right=True)
    out_starts = torch.cumsum(kept, dim=1) - kept
    index = torch.full((b, width + 1), -1, dtype=torch.long, device=scores.device)  # last column: a dump slot
    positions = torch.arange(n, device=scores.device).expand(b, n)
    for g in range(group_sizes.shape[1]):
        member = group_of == g
        order = torch.sort(scores.float().masked_fill(~member, float("-inf")), dim=1, descending=True, stable=True).indices
        ranked = torch.arange(n, device=scores.device)[None, :] < kept[:, g : g + 1]
        chosen = torch.zeros_like(member).scatter_(1, order, ranked) & member
        slot = torch.where(chosen, torch.cumsum(chosen.long(), dim=1) - 1 + out_starts[:, g : g + 1], width)
        index.scatter_(1, slot, torch.where(chosen, positions, -1))
    index = index[:, :width]
    gathered = features.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, features.shape[-1]))
    return gathered.masked_fill(index[..., None] < 0, 0), index, counts


CHUNK_ELEMENTS = 2**19  # per-head logits of one chunk of rows: ~2 MB of float32, kept in cache between passes


def _key_reach(allowed: torch.Tensor, rows: int) -> list[int]:
    """Per chunk of ``rows`` query rows of ``allowed`` [B, R, N], how many leading keys some row of the chunk may
    see (1 + the last allowed key over the batch, at least 1): the keys after it are masked for the whole chunk, so
    the product stops there. Under a causal mask this halves the work of scoring every row of a prompt."""
    r, n = allowed.shape[1], allowed.shape[2]
    index = torch.arange(n, device=allowed.device)
    last = torch.where(allowed.any(dim=0), index, -1).amax(dim=-1).tolist() if r and n else []  # per row
    return [max(1, max(last[start : start + rows]) + 1) if last else n for start in range(0, max(r, 1), rows)]


def _float_keys(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, H, hd, N] float32 keys, grouped-query heads repeated to q's H, transposed for ``q @ keys``."""
    groups = q.shape[1] // k.shape[1]
    return (k.float() if groups == 1 else k.float().repeat_interleave(groups, dim=1)).transpose(-1, -2)


def _mask_bias(allowed: torch.Tensor) -> torch.Tensor:
    """[B, R, N] float32 additive mask: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def row_attention(q: torch.Tensor, k: torch.Tensor, scale: float, reduce: str = "mean", kind: str = "probs",
                  allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Head-reduced attention of a few query rows over all keys, float32 [B, R, N].

    q [B, H, R, hd], k [B, H_kv, N, hd] (RoPE already applied; H a multiple of H_kv), ``allowed`` [B, R, N] bool.
    ``probs``: per-head softmax (a row with no allowed key is all zero), masked entries 0. ``logits``: masked
    entries ``-inf``. Rows go in chunks of about :data:`CHUNK_ELEMENTS` per-head logits, so the passes after the
    product (mask, softmax, head reduction) run over cache-sized tensors, and peak memory stays bounded for many
    rows (ATP's every-visual-row scoring).
    """
    b, h, r, _ = q.shape
    keys = _float_keys(q, k)
    # the mask as an additive [B, 1, rows, N] bias and the scale on q: passes over small tensors, not [B, H, rows, N]
    bias = blind = None
    if allowed is not None:
        bias = _mask_bias(allowed)
        blind = ~allowed.any(dim=-1, keepdim=True)  # [B, R, 1] rows with no allowed key: NaN softmax → zeros
        blind = blind if kind == "probs" and bool(blind.any()) else None
    n = k.shape[2]
    rows = max(1, CHUNK_ELEMENTS // max(1, b * h * n))
    reach = _key_reach(allowed, rows) if allowed is not None else [n] * max(1, -(-r // rows))
    out = []
    for start, width in zip(range(0, max(r, 1), rows), reach):  # zero rows: one empty chunk
        logits = torch.matmul(q[:, :, start : start + rows].float() * scale, keys[..., :width])
        if bias is not None:
            logits += bias[:, None, start : start + rows, :width]
        per_head = torch.softmax(logits, dim=-1) if kind == "probs" else logits
        if reduce == "mean":
            reduced = per_head.mean(dim=1)
        elif reduce == "sum":
            reduced = per_head.sum(dim=1)
        else:
            reduced = per_head.amax(dim=1)
        if blind is not None:  # on the head-reduced rows: H times less than the logits
            reduced = reduced.masked_fill(blind[:, start : start + rows], 0.0)
        if width < n:  # keys no row of the chunk may see: probability 0, logit -inf
            fill = 0.0 if kind == "probs" else float("-inf")
            reduced = torch.cat([reduced, reduced.new_full((*reduced.shape[:2], n - width), fill)], dim=-1)
        out.append(reduced)
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def row_attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums of head-mean attention rows, float32 [B, G, N]: ``Σ_r weights[b, g, r] · A[b, r, :]`` with ``A``
    what :func:`row_attention` gives for ``("mean", "probs")``, without forming ``A``.

    q [B, H, R, hd], k [B, H_kv, N, hd], allowed [B, R, N] bool, weights [B, G, R] float (rows with no allowed key
    must weigh 0: they contribute nothing). Per chunk of rows the per-head probabilities ``[B, H, rows, N]`` are
    contracted with the weights in one matrix product, which also does the head mean (ATP's and H2O's accumulated
    scores: a few sums over many rows).
    """
    b, h, r, _ = q.shape
    keys = _float_keys(q, k)
    bias = _mask_bias(allowed)
    bias.masked_fill_(~allowed.any(dim=-1, keepdim=True), 0.0)  # blind rows: finite, and weighted 0
    per_head_weights = (weights.float() / h)[:, :, None, :]  # [B, G, 1, R]: the head mean folded into the weights
    out = torch.zeros(b, weights.shape[1], k.shape[2], dtype=torch.float32, device=q.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, b * h * k.shape[2]))
    for start, width in zip(range(0, r, rows), _key_reach(allowed, rows)):
        stop = min(start + rows, r)
        logits = torch.matmul(q[:, :, start:stop].float() * scale, keys[..., :width])
        logits += bias[:, None, start:stop, :width]
        probs = torch.softmax(logits, dim=-1).view(b, h * (stop - start), width)  # [B, H·rows, width]
        w = per_head_weights[..., start:stop].expand(-1, -1, h, -1).reshape(b, -1, h * (stop - start))
        out[..., :width].baddbmm_(w, probs)
    return out


def window_merge(values: torch.Tensor, metric: torch.Tensor, windows: torch.Tensor, threshold: float,
                 sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge decision and size-weighted mean of token windows (MustDrop stage 1).

    values [B, N, D]; metric [B, N, C] (similarity features); windows [B, W, M] token indices (a row of -1 is an
    absent window; present windows are complete); sizes [B, N] (default 1). A window merges when the mean
    pairwise cosine similarity of its members' metric rows is ``>= threshold``. Returns (merged [B, W] bool,
    similarity [B, W] float32, mean [B, W, D] in ``values.dtype``: the size-weighted average of its members, 0 for
    an absent window).
    """
    present = windows[..., 0] >= 0
    at = windows.clamp(min=0)
    b, w, m = windows.shape
    rows = lambda x: x.gather(1, at.flatten(1)[..., None].expand(-1, -1, x.shape[-1])).view(b, w, m, -1)  # noqa: E731
    unit = F.normalize(rows(metric).float(), dim=-1)
    similarity = ((unit @ unit.transpose(-1, -2)).sum(dim=(-1, -2)) - m) / (m * (m - 1))
    similarity = similarity.masked_fill(~present, 0.0)
    weight = torch.ones(b, values.shape[1], device=values.device) if sizes is None else sizes.float()
    member_weight = weight.gather(1, at.flatten(1)).view(b, w, m, 1)
    mean = (rows(values).float() * member_weight).sum(dim=2) / member_weight.sum(dim=2)
    mean = mean.masked_fill(~present[..., None], 0.0)
    return present & (similarity >= threshold), similarity, mean.to(values.dtype)


def best_match(metric_a: torch.Tensor, metric_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``metric_a`` [B, Na, C], its most cosine-similar row of ``metric_b`` [B, Nb, C]:
    (similarity [B, Na] float32, index [B, Na]); ties go to the lower index."""
    a = F.normalize(metric_a.float(), dim=-1)
    bb = F.normalize(metric_b.float(), dim=-1)
    return (a @ bb.transpose(-1, -2)).max(dim=-1)

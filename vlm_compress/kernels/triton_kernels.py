"""Triton kernels for the hot selection and merge steps. Import only through :mod:`vlm_compress.kernels`, which
decides when they run; each mirrors a function of :mod:`vlm_compress.kernels.reference`.

On CPU they run under the interpreter (``TRITON_INTERPRET=1`` set before this module is imported); every kernel
takes contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_gather_kernel(scores_ptr, feat_ptr, out_ptr, index_ptr,
                        seg_sample_ptr, seg_start_ptr, seg_len_ptr, seg_k_ptr, seg_out_ptr,
                        N, D, K_OUT,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (segment, D-slice): radix-select the segment's k-th largest score, mark the kept
    positions (ties: lower index), write their indices in order, then copy their feature slice."""
    seg = tl.program_id(0)
    d_block = tl.program_id(1)
    b = tl.load(seg_sample_ptr + seg).to(tl.int64)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    k = tl.load(seg_k_ptr + seg)
    out0 = tl.load(seg_out_ptr + seg)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < length
    s = tl.load(scores_ptr + b * N + start + offs, mask=valid, other=0.0).to(tl.float32)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits >= 0, bits + 2147483648, -1 - bits)  # order-preserving map of fp32 onto [0, 2^32)
    key = tl.where(valid, key, -1)
    threshold = tl.zeros([1], dtype=tl.int64)  # the largest t with #(key >= t) >= k: the k-th largest key
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold | (1 << bit)
        count = tl.sum((key[:, None] >= candidate[None, :]).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    greater = key > threshold
    equal = key == threshold
    equal_rank = tl.cumsum(equal.to(tl.int32), axis=0) - 1
    n_greater = tl.sum(greater.to(tl.int32), axis=0)
    chosen = (greater | (equal & (equal_rank < k - n_greater))) & valid
    chosen = chosen & (offs < tl.where(k > 0, length, 0))  # k = 0 keeps nothing
    position = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(index_ptr + b * K_OUT + out0 + position, (start + offs).to(tl.int64), mask=chosen)
    tl.debug_barrier()  # every program of a segment writes the same indices; this one reads its own back
    n_kept = tl.minimum(k, length)
    d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    for c in range(0, n_kept, BLOCK_K):
        slot = c + tl.arange(0, BLOCK_K)
        slot_ok = slot < n_kept
        row = tl.load(index_ptr + b * K_OUT + out0 + slot, mask=slot_ok, other=0)
        mask = slot_ok[:, None] & d_ok[None, :]
        values = tl.load(feat_ptr + (b * N + row)[:, None] * D + d[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + (b * K_OUT + out0 + slot)[:, None] * D + d[None, :], values, mask=mask)


def topk_gather(scores, features, sample, starts, lengths, kept, out_starts, width):
    b, n = scores.shape
    d = features.shape[-1]
    out = torch.zeros(b, width, d, dtype=features.dtype, device=features.device)
    index = torch.full((b, width), -1, dtype=torch.long, device=features.device)
    if width == 0 or sample.numel() == 0:
        return out, index
    block_n = triton.next_power_of_2(max(int(lengths.max()), 1))
    block_d = min(128, triton.next_power_of_2(d))
    grid = (sample.numel(), triton.cdiv(d, block_d))
    _topk_gather_kernel[grid](scores.contiguous(), features.contiguous(), out, index,
                              sample, starts, lengths, kept, out_starts, n, d, width,
                              BLOCK_N=block_n, BLOCK_K=32, BLOCK_D=block_d)
    return out, index


@triton.jit
def _row_attention_kernel(q_ptr, k_ptr, allowed_ptr, out_ptr, stats_ptr,
                          H, GROUPS, R, N, HD, scale,
                          HAS_MASK: tl.constexpr, REDUCE: tl.constexpr, PROBS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_HD: tl.constexpr):
    """One program per (sample, row). Pass 1: per head, the softmax max and normaliser over all keys (online,
    per lane). Pass 2: per key block, the head-reduced probabilities (or logits). REDUCE: 0 mean, 1 sum, 2 max."""
    pid = tl.program_id(0)
    b = (pid // R).to(tl.int64)
    r = pid % R
    hd = tl.arange(0, BLOCK_HD)
    hd_ok = hd < HD
    num_kv = H // GROUPS
    if PROBS:
        for h in range(H):
            q = tl.load(q_ptr + ((b * H + h) * R + r) * HD + hd, mask=hd_ok, other=0.0).to(tl.float32)
            kv = h // GROUPS
            lane_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
            lane_sum = tl.zeros([BLOCK_N], tl.float32)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                ok = n < N
                if HAS_MASK:
                    ok = ok & (tl.load(allowed_ptr + (b * R + r) * N + n, mask=n < N, other=0) != 0)
                keys = tl.load(k_ptr + ((b * num_kv + kv) * N + n)[:, None] * HD + hd[None, :],
                               mask=(n < N)[:, None] & hd_ok[None, :], other=0.0).to(tl.float32)
                logit = tl.where(ok, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
                new_max = tl.maximum(lane_max, logit)
                safe = tl.where(new_max == float("-inf"), 0.0, new_max)
                lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(logit - safe)
                lane_max = new_max
            row_max = tl.max(lane_max, axis=0)
            safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            total = tl.sum(lane_sum * tl.exp(lane_max - safe_max), axis=0)
            tl.store(stats_ptr + ((b * R + r) * H + h) * 2, safe_max)
            tl.store(stats_ptr + ((b * R + r) * H + h) * 2 + 1, total)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_range = n < N
        ok = in_range
        if HAS_MASK:
            ok = ok & (tl.load(allowed_ptr + (b * R + r) * N + n, mask=in_range, other=0) != 0)
        if REDUCE == 2:
            acc = tl.full([BLOCK_N], float("-inf"), tl.float32)
        else:
            acc = tl.zeros([BLOCK_N], tl.float32)
        for h in range(H):
            q = tl.load(q_ptr + ((b * H + h) * R + r) * HD + hd, mask=hd_ok, other=0.0).to(tl.float32)
            keys = tl.load(k_ptr + ((b * num_kv + h // GROUPS) * N + n)[:, None] * HD + hd[None, :],
                           mask=in_range[:, None] & hd_ok[None, :], other=0.0).to(tl.float32)
            logit = tl.sum(keys * q[None, :], axis=1) * scale
            if PROBS:
                row_max = tl.load(stats_ptr + ((b * R + r) * H + h) * 2)
                total = tl.load(stats_ptr + ((b * R + r) * H + h) * 2 + 1)
                value = tl.where(ok, tl.exp(logit - row_max) / tl.maximum(total, 1e-30), 0.0)  # no key: all 0
            else:
                value = tl.where(ok, logit, float("-inf"))
            if REDUCE == 2:
                acc = tl.maximum(acc, value)
            else:
                acc = acc + value
        if REDUCE == 0:
            acc = acc / H
        tl.store(out_ptr + (b * R + r) * N + n, acc, mask=in_range)


def row_attention(q, k, scale, reduce, kind, allowed):
    b, h, r, hd = q.shape
    n = k.shape[2]
    out = torch.empty(b, r, n, dtype=torch.float32, device=q.device)
    stats = torch.empty(b * r * h * 2, dtype=torch.float32, device=q.device)
    mask = allowed.to(torch.int8).contiguous() if allowed is not None else out  # unused pointer when no mask
    _row_attention_kernel[(b * r,)](q.contiguous(), k.contiguous(), mask, out, stats,
                                    h, h // k.shape[1], r, n, hd, float(scale),
                                    HAS_MASK=allowed is not None, REDUCE=("mean", "sum", "max").index(reduce),
                                    PROBS=kind == "probs", BLOCK_N=min(128, triton.next_power_of_2(n)),
                                    BLOCK_HD=triton.next_power_of_2(hd))
    return out


@triton.jit
def _window_merge_kernel(values_ptr, metric_ptr, windows_ptr, sizes_ptr, sim_ptr, mean_ptr,
                         N, W, M, C, D,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (sample, window): mean pairwise cosine similarity of the members' metric rows, and the
    size-weighted mean of their value rows."""
    pid = tl.program_id(0)
    b = (pid // W).to(tl.int64)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    member = tl.load(windows_ptr + pid * M + m, mask=m_ok, other=-1)
    present = tl.max(member, axis=0) >= 0
    m_ok = m_ok & (member >= 0)
    row = tl.where(m_ok, member, 0).to(tl.int64)
    gram = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    norm = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(metric_ptr + (b * N + row)[:, None] * C + c[None, :], mask=m_ok[:, None] & (c < C)[None, :],
                    other=0.0).to(tl.float32)
        gram += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
        norm += tl.sum(x * x, axis=1)
    unit = tl.maximum(tl.sqrt(norm), 1e-12)
    cosine = gram / (unit[:, None] * unit[None, :])
    pair = m_ok[:, None] & m_ok[None, :]
    total = tl.sum(tl.sum(tl.where(pair, cosine, 0.0), axis=1), axis=0)
    count = M * 1.0
    similarity = tl.where(present, (total - count) / (count * (count - 1.0)), 0.0)  # the diagonal counts as 1
    tl.store(sim_ptr + pid, similarity)
    weight = tl.load(sizes_ptr + b * N + row, mask=m_ok, other=0.0).to(tl.float32)
    weight_sum = tl.maximum(tl.sum(weight, axis=0), 1e-12)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(values_ptr + (b * N + row)[:, None] * D + d[None, :], mask=m_ok[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        tl.store(mean_ptr + pid * D + d, tl.sum(v * weight[:, None], axis=0) / weight_sum, mask=d < D)


def window_merge(values, metric, windows, sizes):
    b, n, d = values.shape
    w, m = windows.shape[1], windows.shape[2]
    similarity = torch.empty(b, w, dtype=torch.float32, device=values.device)
    mean = torch.empty(b, w, d, dtype=torch.float32, device=values.device)
    if b * w == 0:
        return similarity, mean
    c = metric.shape[-1]
    _window_merge_kernel[(b * w,)](values.contiguous(), metric.contiguous(), windows.contiguous(), sizes.contiguous(),
                                   similarity, mean, n, w, m, c, d,
                                   BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_C=32,
                                   BLOCK_D=min(128, triton.next_power_of_2(d)))
    return similarity, mean


@triton.jit
def _best_match_kernel(a_ptr, b_ptr, sim_ptr, index_ptr, NA, NB, C,
                       BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (sample, block of A rows): cosine similarity to every B row, running max and argmax
    (a later B block wins only when strictly greater, so ties go to the lower index)."""
    sample = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ok = a < NA
    a_norm = tl.zeros([BLOCK_A], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(a_ptr + (sample * NA + a)[:, None] * C + c[None, :], mask=a_ok[:, None] & (c < C)[None, :],
                    other=0.0).to(tl.float32)
        a_norm += tl.sum(x * x, axis=1)
    a_norm = tl.maximum(tl.sqrt(a_norm), 1e-12)
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_index = tl.zeros([BLOCK_A], tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        bb = b0 + tl.arange(0, BLOCK_B)
        b_ok = bb < NB
        dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        b_norm = tl.zeros([BLOCK_B], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(a_ptr + (sample * NA + a)[:, None] * C + c[None, :], mask=a_ok[:, None] & (c < C)[None, :],
                        other=0.0).to(tl.float32)
            y = tl.load(b_ptr + (sample * NB + bb)[:, None] * C + c[None, :], mask=b_ok[:, None] & (c < C)[None, :],
                        other=0.0).to(tl.float32)
            dots += tl.dot(x, tl.trans(y), input_precision="ieee")
            b_norm += tl.sum(y * y, axis=1)
        cosine = dots / (a_norm[:, None] * tl.maximum(tl.sqrt(b_norm), 1e-12)[None, :])
        cosine = tl.where(b_ok[None, :], cosine, float("-inf"))
        block_best = tl.max(cosine, axis=1)
        block_index = tl.argmax(cosine, axis=1).to(tl.int64) + b0
        better = block_best > best
        best_index = tl.where(better, block_index, best_index)
        best = tl.where(better, block_best, best)
    tl.store(sim_ptr + sample * NA + a, best, mask=a_ok)
    tl.store(index_ptr + sample * NA + a, best_index, mask=a_ok)


def best_match(metric_a, metric_b):
    b, na, c = metric_a.shape
    nb = metric_b.shape[1]
    similarity = torch.empty(b, na, dtype=torch.float32, device=metric_a.device)
    index = torch.empty(b, na, dtype=torch.long, device=metric_a.device)
    if b * na == 0:
        return similarity, index
    grid = (b, triton.cdiv(na, 32))
    _best_match_kernel[grid](metric_a.contiguous(), metric_b.contiguous(), similarity, index, na, nb, c,
                             BLOCK_A=32, BLOCK_B=32, BLOCK_C=32)
    return similarity, index

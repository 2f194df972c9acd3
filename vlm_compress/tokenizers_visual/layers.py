"""FlexTok's transformer pieces (attention, SwiGLU MLP, pre-norm and AdaLN-zero blocks) and shared embeddings.

Attention runs through ``F.scaled_dot_product_attention`` with an explicit boolean mask (``True`` = may attend),
so the masks FlexTok relies on are plain tensors a test can read. SEED uses timm's ViT blocks instead, as the
official code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FlexAttention(nn.Module):
    """FlexTok's attention (``flextok/model/layers/attention.py``): bias-free ``wq``/``wk``/``wv``/``proj``, a
    parameter-free LayerNorm on each head's queries and keys, and the μP scale ``8 / head_dim``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for f in (self.wq, self.wk, self.wv))
        q, k = F.layer_norm(q, (self.head_dim,)), F.layer_norm(k, (self.head_dim,))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8.0 / self.head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class GatedMlp(nn.Module):
    """SwiGLU ``fc2(silu(fc1 x) · fc3 x)``, hidden ``int(2/3 · ratio · dim)``, bias-free (FlexTok's ``GatedMlp``)."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(2 * ratio * dim / 3)
        self.fc1, self.fc3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


def plain_norm(x: torch.Tensor) -> torch.Tensor:
    """FlexTok's ``Fp32LayerNorm(elementwise_affine=False, bias=False)``: no parameters, computed in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],)).to(x.dtype)


class FlexBlock(nn.Module):
    """FlexTok's pre-norm block (``FlexBlock``/``FlexBlockAdaLN``): parameter-free norms, :class:`FlexAttention`,
    :class:`GatedMlp`. With ``cond_dim`` it is AdaLN-zero conditioned (DiT, arXiv 2212.09748, §3.2):
    ``adaLN_modulation`` maps ``cond [B, C]`` to ``groups`` sets of (gate_msa, gate_mlp, shift_msa, scale_msa,
    shift_mlp, scale_mlp), the official chunk order; ``groups`` are consecutive spans of the sequence (FlexTok's
    decoder: patches, then registers) modulated separately."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cond_dim: int | None = None,
                 groups: tuple[int, ...] = ()):
        super().__init__()
        self.attn, self.mlp = FlexAttention(dim, heads), GatedMlp(dim, mlp_ratio)
        self.groups = tuple(groups)
        if cond_dim is not None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim * len(self.groups)))
            nn.init.zeros_(self.adaLN_modulation[1].weight)
            nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                groups: tuple[int, ...] | None = None):
        """``x [B, L, D]``; ``mask``: bool (``True`` = may attend) or an additive float bias, broadcastable to
        ``[B, heads, L, L]``; ``groups``: the spans' lengths for this call when they differ from the built ones (as
        many spans, summing to ``L``)."""
        if cond is None:
            x = x + self.attn(plain_norm(x), mask=mask)
            return x + self.mlp(plain_norm(x))
        groups = self.groups if groups is None else tuple(groups)
        if len(groups) != len(self.groups) or sum(groups) != x.shape[1]:
            raise ValueError(f"block built for {len(self.groups)} spans, got spans {groups} for {x.shape[1]} positions")
        mods = self.adaLN_modulation(cond).chunk(len(groups), -1)  # per group [B, 6·D]
        mods = torch.cat([m[:, None].expand(-1, n, -1) for m, n in zip(mods, groups)], 1)
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = mods.chunk(6, -1)
        x = x + gate_msa * self.attn(plain_norm(x) * (1 + scale_msa) + shift_msa, mask=mask)
        return x + gate_mlp * self.mlp(plain_norm(x) * (1 + scale_mlp) + shift_mlp)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 256.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B] → [B, dim]``, ``[cos, sin]``, of ``t`` in [0, 1] scaled by 1000 (FlexTok's
    ``TimestepEmbedder``, whose ``max_period`` default is 256)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[height·width, dim]`` (MAE's), raster order."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    parts = [f(pos.flatten()[:, None] * omega[None]) for pos in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] → [B, (H/p)·(W/p), p·p·C]``: patches in raster order, each flattened (row, column, channel),
    FlexTok's ``b (n0 p0) (n1 p1) d -> b n0 n1 (p0 p1 d)``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)

"""The Matryoshka Query Transformer resampler (Hu et al., arXiv 2405.19315; reference trained-tokenizers-speculative §3).

One cross-attention layer from ``M`` latent queries to the vision tower's patch features, then a linear map into
the LLM's width. Any prefix of the queries is a valid output: trained with a random ``m`` per batch, the first
``m`` queries carry the most important content, so ``m`` can be chosen per call. As in the official code, the
keys are the (layer-normed) 2-D sin-cos positions of the patches only, not their content ("input-invariant" keys,
confirmed deliberate by the authors in gordonhu608/MQT-LLaVA#5), the values are the layer-normed features, and
each query adds the sin-cos position of its own cell in a ``√M × √M`` grid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """``[rows·cols, dim]`` 2-D sin-cos position embedding in the Qwen-VL/MQT layout: the first half of the channels
    encodes the column (``sin`` then ``cos``), the second half the row; frequencies ``1/10000^(i/(dim/4))``."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")
    parts = []
    for grid in (c.flatten(), r.flatten()):
        angles = grid[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


@dataclasses.dataclass
class ResamplerConfig:
    num_queries: int = 64  # M; official: 256 (a 16×16 grid)
    kv_dim: int = 128  # vision feature width; official: 1024 (CLIP ViT-L)
    embed_dim: int = 128  # LLM width; official: 4096
    num_heads: int = 4  # official: 16

    def __post_init__(self) -> None:
        side = math.isqrt(self.num_queries)
        if side * side != self.num_queries:
            raise ValueError(f"num_queries must be a square (queries sit on a √M × √M grid), got {self.num_queries}")


class QueryResampler(nn.Module):
    """``[B, N, kv_dim]`` patch features on a square grid → ``[B, m, embed_dim]`` for any ``1 ≤ m ≤ M``."""

    def __init__(self, config: ResamplerConfig):
        super().__init__()
        self.config = config
        side = math.isqrt(config.num_queries)
        self.register_buffer("pos_embed", sincos_2d(config.kv_dim, side, side))  # saved, as in official checkpoints
        self.query = nn.Parameter(torch.empty(config.num_queries, config.kv_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(config.kv_dim, config.num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(config.kv_dim, eps=1e-6)
        self.ln_k = nn.LayerNorm(config.kv_dim, eps=1e-6)
        self.ln_v = nn.LayerNorm(config.kv_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(config.kv_dim, config.embed_dim) * config.embed_dim**-0.5)

    def key_positions(self, num_patches: int) -> torch.Tensor:
        """``[N, kv_dim]`` the query grid's sin-cos positions resized (bicubic) to the patch grid."""
        side, grid = math.isqrt(self.config.num_queries), math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"patch features must form a square grid, got {num_patches} tokens")
        pos = self.pos_embed.T.reshape(1, -1, side, side)
        return F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)[0].flatten(1).T

    def forward(self, features: torch.Tensor, m: int, return_weights: bool = False):
        if not 1 <= m <= self.config.num_queries:
            raise ValueError(f"m must be in [1, {self.config.num_queries}], got {m}")
        b, n, _ = features.shape
        keys = self.ln_k(self.key_positions(n).to(features.dtype)).expand(b, -1, -1)
        queries = self.ln_q(self.query[:m] + self.pos_embed[:m].to(self.query.dtype)).expand(b, -1, -1)
        out, weights = self.attn(queries, keys, self.ln_v(features), need_weights=return_weights)
        out = out @ self.proj
        return (out, weights) if return_weights else out

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "resampler_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path / "resampler.safetensors")

    @classmethod
    def load(cls, path: str | Path) -> "QueryResampler":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "resampler_config.json").exists():
            raise ValueError(f"{path} holds no resampler (resampler_config.json + resampler.safetensors)")
        module = cls(ResamplerConfig(**json.loads((path / "resampler_config.json").read_text())))
        module.load_state_dict(load_file(path / "resampler.safetensors"))
        return module.eval()

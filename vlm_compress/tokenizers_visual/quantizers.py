"""Discrete bottlenecks with straight-through gradients: a VQ codebook (SEED) and finite scalar quantisation (FlexTok).

``VectorQuantizer`` follows taming-transformers' ``VectorQuantizer2`` as SEED-2 uses it (``legacy=True``,
beta 0.25; reference ``trained-tokenizers-speculative.md`` §4.1), with usage counters and dead-code restarts added
for training. ``FSQ`` follows FlexTok's ``quantize_fsq.py`` (Mentzer et al., arXiv 2309.15505; reference §5.1):
bounded tanh, rounding with a straight-through estimator, a mixed-radix index.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class QuantizerOutput:
    """``codes``: the quantised vectors ``[B, T, D]`` (straight-through: the forward value is the code, the
    gradient flows to the input); ``indices``: ``[B, T]`` long; ``loss``: the auxiliary loss (VQ's codebook +
    commitment terms; zero for FSQ)."""

    codes: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation ``[B, T, D] → [B, T]`` with ``num_codes`` entries of ``dim``.

    ``loss = ‖sg(z) − e‖² + β‖z − sg(e)‖²`` (``legacy=True``, the form SEED's checkpoint was trained with;
    ``legacy=False`` puts β on the codebook term instead, as taming's fixed variant does). ``normalize=True``
    l2-normalises inputs and codebook before the lookup (SEED-2's ``VectorQuantizer2`` does; the cosine codebook
    of ViT-VQGAN).

    Training extras (not in SEED's code): ``usage`` counts how often each code was picked since the last
    :meth:`reset_usage`; :meth:`restart_dead_codes` re-seeds codes used fewer than ``threshold`` times with
    random encoder outputs of the current batch (the usual fix for codebook collapse, e.g. Jukebox §3.2).
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, legacy: bool = True, normalize: bool = False):
        super().__init__()
        self.num_codes, self.dim, self.beta, self.legacy, self.normalize = num_codes, dim, beta, legacy, normalize
        self.embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        if normalize:  # LlamaGen's VectorQuantizer: unit-norm codes from the start, so that an optimiser step of
            # ~lr does not turn a code of norm ~1/num_codes around (the lookup normalises, the gradient scales by 1/‖e‖)
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("usage", torch.zeros(num_codes, dtype=torch.long), persistent=False)

    @property
    def codebook(self) -> torch.Tensor:
        """``[num_codes, dim]``, normalised when the quantiser is."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=-1) if self.normalize else weight

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer expects inputs [..., {self.dim}], got {tuple(z.shape)}")
        if self.normalize:
            z = F.normalize(z, dim=-1)
        codebook = self.codebook
        flat = z.reshape(-1, self.dim)
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
        indices = dist.argmin(1)
        quant = codebook[indices].view_as(z)
        codebook_term = (quant - z.detach()).pow(2).mean()
        commit_term = (quant.detach() - z).pow(2).mean()
        loss = codebook_term + self.beta * commit_term if self.legacy else self.beta * codebook_term + commit_term
        if self.training:
            self.usage += torch.bincount(indices.detach(), minlength=self.num_codes)
            self._last_inputs = flat.detach()
        quant = z + (quant - z).detach()
        return QuantizerOutput(quant, indices.view(z.shape[:-1]), loss)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` long → ``[B, T, dim]`` (ids checked against the codebook size)."""
        check_indices(indices, self.num_codes)
        return self.codebook[indices]

    def reset_usage(self) -> None:
        self.usage.zero_()

    def perplexity(self) -> float:
        """exp(entropy) of the usage counts: the effective number of codes in use."""
        return perplexity(self.usage)

    @torch.no_grad()
    def restart_dead_codes(self, threshold: int = 1, generator: torch.Generator | None = None) -> int:
        """Re-seed codes used fewer than ``threshold`` times since :meth:`reset_usage` from the last batch's
        encoder outputs (with a little noise); resets the counters and returns how many codes moved."""
        inputs = getattr(self, "_last_inputs", None)
        dead = (self.usage < threshold).nonzero().flatten()
        if inputs is None or dead.numel() == 0:
            self.reset_usage()
            return 0
        pick = torch.randint(0, inputs.shape[0], (dead.numel(),), generator=generator)
        noise = torch.randn(dead.numel(), self.dim, generator=generator) * inputs.std() * 0.01
        self.embedding.weight[dead] = inputs[pick] + noise
        self.reset_usage()
        return int(dead.numel())


class FSQ(nn.Module):
    """Finite scalar quantisation of ``len(levels)``-dim vectors: dimension ``i`` takes ``levels[i]`` values.

    Each coordinate is bounded to ``levels[i]`` integer steps by ``tanh`` (with FlexTok's ``1e-3`` margin and the
    half-step offset for even levels), rounded with a straight-through estimator and divided by ``levels[i] // 2``,
    so codes lie in ``[-1, 1]``. The index of a code is its mixed-radix number, dimension 0 least significant:
    ``[8, 8, 8, 5, 5, 5]`` gives ``8·8·8·5·5·5 = 64 000`` codes and :meth:`indices_to_codes` inverts
    :meth:`codes_to_indices` exactly.

    ``drop_quant_p`` (training only, FlexTok's option): that share of samples skips the rounding.
    """

    def __init__(self, levels: list[int] | tuple[int, ...], drop_quant_p: float = 0.0, eps: float = 1e-3):
        super().__init__()
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels_list = [int(x) for x in levels]
        self.drop_quant_p, self.eps = drop_quant_p, eps
        levels_t = torch.tensor(self.levels_list, dtype=torch.long)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels_t[:-1]]), 0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels_list)

    @property
    def num_codes(self) -> int:
        return int(torch.prod(self.levels))

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        half_l = (self.levels - 1).to(z.dtype) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with {self.dim} levels expects inputs [..., {self.dim}], got {tuple(z.shape)}")
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        codes = rounded / (self.levels // 2).to(z.dtype)
        indices = self.codes_to_indices(codes.detach())
        if self.training and self.drop_quant_p > 0:
            skip = torch.rand(z.shape[0], *([1] * (z.dim() - 1)), device=z.device) < self.drop_quant_p
            codes = torch.where(skip, bounded / (self.levels // 2).to(z.dtype), codes)
        return QuantizerOutput(codes, indices, z.new_zeros(()))

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` codes (on the grid) → ``[...]`` long indices."""
        half = (self.levels // 2).to(codes.dtype)
        digits = (codes * half + half).round().long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``[...]`` long indices → ``[..., dim]`` codes in ``[-1, 1]`` (ids checked against ``num_codes``)."""
        check_indices(indices, self.num_codes)
        digits = (indices[..., None] // self.basis) % self.levels
        half = (self.levels // 2).float()
        return (digits.float() - half) / half


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of code counts ``[num_codes]``: the effective number of codes in use."""
    probs = counts.float() / counts.sum().clamp(min=1)
    return float(torch.exp(-(probs * probs.clamp(min=1e-12).log()).sum()))


def check_indices(indices: torch.Tensor, num_codes: int) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the valid range when token ids are not codes of this codebook."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"token ids must be an integer tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_codes):
        raise ValueError(
            f"token ids must lie in [0, {num_codes}) for this codebook, got values in "
            f"[{int(indices.min())}, {int(indices.max())}]; ids from another tokenizer, or ids shifted into an LLM's "
            f"vocabulary (SEED-LLaMA adds 32000), must be mapped back first"
        )

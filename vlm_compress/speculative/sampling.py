"""Turning logits into the distribution a token is drawn from, and the source of randomness decoding uses.

:class:`Warp` applies temperature, top-k and top-p in that order (the order of transformers' and LlamaGen's logits
processors). Speculative decoding must apply the same warp to the target's and the drafter's logits: the rule is
lossless with respect to the warped target distribution (reference ``trained-tokenizers-speculative.md`` §7.1).

Decoding draws through a :class:`Sampler` (``categorical``, ``bernoulli``) instead of calling torch directly, so a test
can replace it by one that enumerates every branch with its probability and read off the exact output law of the
real decoding loop.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass(frozen=True)
class Warp:
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "Divides the logits (> 0)."})
    top_k: int | None = dataclasses.field(default=None, metadata={"help": "Keep the k most likely tokens (None: all)."})
    top_p: float | None = dataclasses.field(default=None, metadata={
        "help": "Keep the smallest set of most likely tokens whose mass reaches top_p (None or 1: all)."})

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (greedy decoding: greedy=True), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p!r}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` → probabilities ``[..., V]`` (float32, or float64 for float64 logits)."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            beyond = probs.cumsum(-1) - probs >= self.top_p  # the mass before it already reaches top_p
            logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
        return logits.softmax(-1)


class Sampler(Protocol):
    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of ``probs [..., V]`` → ``[...]`` long."""

    def bernoulli(self, prob: float) -> bool:
        """``True`` with probability ``prob``."""


class TorchSampler:
    """Draws from a ``torch.Generator`` (seeded: reruns give the same tokens)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def categorical(self, probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(-1, probs.shape[-1]).double()
        drawn = torch.multinomial(flat.cpu(), 1, generator=self.generator).to(probs.device)
        return drawn.reshape(probs.shape[:-1])

    def bernoulli(self, prob: float) -> bool:
        return bool(torch.rand((), generator=self.generator) < prob)

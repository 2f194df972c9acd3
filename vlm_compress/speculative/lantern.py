"""LANTERN: relaxed speculative decoding for visual autoregressive models (Jang et al., arXiv 2410.03355, ICLR 2025;
LANTERN++, arXiv 2502.06352; official code ``jadohu/LANTERN``, ``models/ea_model_llamagen.py::evaluate_posterior``;
reference ``trained-tokenizers-speculative.md`` §6.2, §7.3).

Image tokens are ambiguous: many codes decode to nearly the same patch, so the target spreads its mass and exact
verification rejects most drafts. LANTERN accepts a draft ``x`` against a relaxed target. ``N_k(x)`` are the ``k``
codes nearest to ``x`` in the codebook (L2, ``x`` excluded, precomputed once: :func:`latent_neighbors`). The
*latent proximity set* ``A(x)`` is the longest prefix of ``N_k(x)`` whose target mass stays within ``δ``
(LANTERN) or within ``(λ − 1)·p(x)`` (LANTERN++, so that ``p̃(x) ≤ λ·p(x)``). ``π_x`` moves that mass onto ``x``:
``π_x(x) = p(x) + p(A(x))``, ``π_x(A(x)) = 0``, elsewhere ``p``; hence ``TV(p, π_x) = p(A(x)) ≤ δ`` per step. ``δ = 0``
(or ``λ = 1``) gives ``π_x = p``: the standard, lossless rule exactly. The bound is per step and per draft; the output
law of a whole sampling run is *not* within δ of the target's (reference §7.3), so quality is measured, not assumed.

Deliberate differences from the official code:

* On rejection the residual is ``norm(max(0, π_x − q))`` — for an argmax draft: ``p`` with ``x`` and ``A(x)``
  removed. The official dynamic-tree code zeroes the first ``k + 1`` neighbours ``N_{k+1}(x)`` whenever ``A(x)`` is
  non-empty (up to 1001 codes at its default ``k = 1000``), and its static-tree residual uses the drafter's
  distribution with tried siblings removed; ours makes every step the standard rule against ``π_x``.
* Neighbours are computed on the vectors the VQ lookup compares (l2-normalised for LlamaGen's cosine codebook);
  the official code uses the raw codebook weights (the authors report L2 and cosine as comparable).
* Drafts form one chain of length γ (no tree): one draft per position.
"""

from __future__ import annotations

import torch

from .acceptance import AcceptanceRule


def latent_neighbors(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """``[V, D]`` code vectors → ``[V, k]`` long: for each code the ``k`` nearest other codes by L2 distance,
    nearest first (ties by index), the code itself excluded (LANTERN's ``generate_codebook.py``)."""
    v = codebook.shape[0]
    if not 1 <= k < v:
        raise ValueError(f"k must lie in [1, {v - 1}] for a codebook of {v} codes, got {k}")
    dist = torch.cdist(codebook.double(), codebook.double())
    dist.fill_diagonal_(float("inf"))
    return dist.argsort(dim=1, stable=True)[:, :k].contiguous()


class LanternRule(AcceptanceRule):
    """LANTERN's relaxed acceptance (module docstring): exactly one of ``delta`` (total-variation budget, LANTERN) or
    ``lam`` (``p̃(x) ≤ λ·p(x)``, LANTERN++) over the neighbour table ``neighbors [V, k]``."""

    name = "lantern"

    def __init__(self, neighbors: torch.Tensor, delta: float | None = None, lam: float | None = None):
        if (delta is None) == (lam is None):
            raise ValueError("give exactly one of delta (LANTERN) or lam (LANTERN++)")
        if delta is not None and not 0 <= delta <= 1:
            raise ValueError(f"delta must lie in [0, 1], got {delta}")
        if lam is not None and not lam >= 1:
            raise ValueError(f"lam must be >= 1, got {lam}")
        if neighbors.dim() != 2 or neighbors.dtype != torch.long:
            raise ValueError(f"neighbors must be a [V, k] long tensor (latent_neighbors), got "
                             f"{neighbors.dtype} {tuple(neighbors.shape)}")
        self.neighbors, self.delta, self.lam = neighbors, delta, lam

    @property
    def k(self) -> int:
        return self.neighbors.shape[1]

    def proximity_set(self, p: torch.Tensor, x: int) -> torch.Tensor:
        """``A(x)``: the longest prefix of ``N_k(x)`` (latent-distance order) whose cumulative ``p`` mass is within
        the budget; ``[|A|]`` long."""
        near = self.neighbors[x].to(p.device)
        budget = self.delta if self.delta is not None else (self.lam - 1) * float(p[x])
        inside = int((p[near].cumsum(0) <= budget).sum())  # the cumsum never falls, so this counts a prefix
        return near[:inside]

    def target(self, p: torch.Tensor, x: int) -> torch.Tensor:
        near = self.proximity_set(p, x)
        if near.numel() == 0:
            return p
        pi = p.clone()
        pi[x] = p[x] + p[near].sum()
        pi[near] = 0
        return pi

    def describe(self) -> dict:
        return {"rule": self.name, "k": self.k, **({"delta": self.delta} if self.delta is not None else {"lam": self.lam})}

"""The verification rule of speculative decoding: accept a drafted token or replace it, one position at a time.

Standard speculative sampling (Leviathan et al., arXiv 2211.17192, §2.3; Chen et al., arXiv 2302.01318, Alg. 2;
reference ``trained-tokenizers-speculative.md`` §7.1): a draft ``x`` drawn from the drafter's ``q`` is accepted with
probability ``min(1, p(x)/q(x))``; otherwise a token is drawn from the residual ``norm(max(0, p − q))``. The output
is then distributed exactly as ``p``. A draft that is the drafter's argmax (``q`` a point mass, EAGLE-2's
``qx = 1.0``) is the same rule with ``q = δ_x``. Greedy verification accepts ``x`` iff it is the target's argmax.

A rule is written against a *proposal-specific target* ``π_x`` (:meth:`AcceptanceRule.target`): ``p`` itself for the
standard rule; LANTERN (:mod:`.lantern`) moves the mass of ``x``'s latent neighbours onto ``x``.
"""

from __future__ import annotations

import torch


class AcceptanceRule:
    """The standard, lossless rule. Subclasses change :meth:`target` only."""

    name = "standard"

    def target(self, p: torch.Tensor, x: int) -> torch.Tensor:
        """``π_x [V]``: the distribution the draft ``x`` is verified against (here ``p``)."""
        return p

    def decide(self, p: torch.Tensor, q: torch.Tensor, x: int) -> tuple[float, torch.Tensor]:
        """Target ``p [V]``, drafter ``q [V]`` (a point mass for argmax drafts), draft ``x`` → the probability of
        accepting ``x`` and the distribution ``[V]`` to draw from instead when it is rejected:
        ``min(1, π_x(x)/q(x))`` and ``norm(max(0, π_x − q))``."""
        pi = self.target(p, x)
        qx = float(q[x])
        accept = 1.0 if qx <= 0 else min(1.0, float(pi[x]) / qx)
        residual = (pi - q).clamp(min=0)
        total = residual.sum()
        # an all-zero residual means π_x <= q everywhere, i.e. π_x = q: then every draft is accepted (accept = 1)
        return accept, (residual / total if total > 0 else pi)

    def greedy_accepts(self, p: torch.Tensor, x: int) -> bool:
        """Greedy verification: ``x`` is the argmax of ``π_x`` (ties: the lowest index, as ``argmax`` gives)."""
        return int(self.target(p, x).argmax()) == int(x)

    def describe(self) -> dict:
        return {"rule": self.name}

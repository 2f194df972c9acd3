"""``divprune``: keep a maximally diverse subset of the projected visual tokens (max-min diversity, solved greedily).

DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175; reference ``sota-methods.md`` §2). Official code:
``vbdi/divprune`` @799e2d9 (algorithm from 689ab4d), ``LLaVA/llava/model/llava_arch.py::DivPrune``.

On the projected tokens ``X`` (mm_projector output, LLM space) of one image, with the cosine distance
``D = 1 − cos(X, X)``: step 0 picks the most isolated token (the largest distance to its nearest *other* token),
every later step the token farthest from the chosen set (``argmax_j min_{s ∈ sel} D[s, j]``), ties to the lowest
index; the kept tokens go to the LLM in ascending original order. No text, no attention, no other hyper-parameter.

Budget: the official ratio ``K = int(round(r·L))`` over the image's ``L`` visual tokens is our float-budget rule
(:func:`vlm_compress.budget.tokens_to_keep`), so ``K = ctx.uniform_keep()``; the two differ only when ``r·L`` is
exactly half-way (Python's ``round`` goes to even, ours up). An int budget is a fixed count; ``budget="auto"`` is
refused (DivPrune has no per-token score to count by). LLaVA-NeXT: as officially, the selection is **global** over the whole packed image (thumbnail,
unpadded crops and the ``image_newline`` tokens, which are candidates like any other token; being identical
vectors, at most one of them is normally kept). Qwen2-VL/Qwen2.5-VL and OneVision frames: the same, per image or
frame (the official code has no such variant).

Differences from the official code, each deliberate:

* float32 throughout (official: the model dtype, fp16, where near-ties fall to the lowest index by rounding).
* Step 0 scores each token by its distance to the nearest other token with the self-distance excluded exactly
  (official: the 2nd-smallest entry of the distance column, assuming the self-distance ``≈ 0`` is the smallest).
* Chosen tokens are excluded from later steps (official: their score ``≈ 0`` is merely small, so with more picks
  than distinct vectors a token can be picked twice and fewer than ``K`` distinct tokens come out).
* Each image of a batch is selected on its own (official: ``new_input_embeds[0]`` and the hard-coded offset
  ``SYS_TOKEN_LEN = 35``, so batch size 1 and the vicuna_v1 template only); at ``K ≥ L`` everything is kept in
  order (identity).
"""

from __future__ import annotations

import dataclasses

import torch

from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` → ``[N, N]`` float32 ``1 − cos`` (zero vectors: cosine 0)."""
    unit = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    return 1.0 - unit @ unit.T


def max_min_diversity(features: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]`` indices of ``features`` [N, D] in the order DivPrune's greedy picks them (``k`` capped at ``N``).

    Step 0: ``argmax_j min_{i≠j} D[i, j]``; step ``t``: ``argmax_j min_{s ∈ chosen} D[s, j]`` over the tokens not
    chosen yet; ties to the lowest index. ``D`` is the cosine distance (:func:`cosine_distance`)."""
    n = features.shape[0]
    k = min(int(k), n)
    order = torch.empty(k, dtype=torch.long, device=features.device)
    if k == 0:
        return order
    distance = cosine_distance(features)
    eye = torch.eye(n, dtype=torch.bool, device=features.device)
    score = distance.masked_fill(eye, float("inf")).min(dim=0).values if n > 1 else distance.new_zeros(1)
    nearest = torch.full_like(score, float("inf"))  # min distance of each token to the chosen set
    for step in range(k):
        j = torch.argmax(score)  # first maximal index
        order[step] = j
        nearest = torch.minimum(nearest, distance[j])
        nearest[order[: step + 1]] = float("-inf")
        score = nearest
    return order


@register_method("divprune")
@dataclasses.dataclass
class DivPrunePruner(EncoderPruner):
    """DivPrune has no hyper-parameter besides the budget (official: ``SUBSET_RATIO``, default 0.098 = 56 of 576)."""

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        """Per image of ``ctx.features`` [I, N, D]: the ``k`` most diverse tokens, ascending → ``[I, k]``."""
        features, keep, n = ctx.features, ctx.uniform_keep(), ctx.num_tokens
        if keep >= n:
            index = torch.arange(n, device=features.device).expand(features.shape[0], n)
            return EncoderSelection.from_indices(features, index)
        with torch.no_grad():  # indices only; the kept features are gathered with their autograd history
            index = torch.stack([max_min_diversity(x, keep).sort().values for x in features])
        return EncoderSelection.from_indices(features, index)

"""``scope``: saliency-weighted coverage — greedy facility location on the tower features, gains times CLS attention.

SCOPE (Deng et al., NeurIPS 2025, arXiv 2510.24214; reference ``sota-methods.md`` §4). Official code:
``kinredon/SCOPE`` @6bf7306 (code a01b98f), ``scope/clip_encoder.py::CLIPVisionTower_SCOPE.forward, ::SCOPE``.

Inside the vision tower, before the projector: ``V`` are the feature layer's outputs (CLIP layer 22 of 24,
``hidden_states[-2]`` without CLS: ``ctx.images.vision_features``), ``S = cos(V, V)``, and the saliency ``a`` is the
same layer's CLS→patch attention, post-softmax, **summed** over heads. With the coverage ``m_i`` of each token by
the chosen set (0 at first), each step picks

    j* = argmax_j  g_j · a_j^α,   g_j = Σ_i max(0, S_ij − m_i)   (``combine="multiply"``; ``"add"``: g_j + a_j^α)

over the unchosen tokens (ties to the lowest index) and sets ``m = max(m, S[j*])``: the marginal gain of the
facility-location objective ``F(T) = Σ_i max(0, max_{s∈T} S_is)``, weighted by how much CLS attends to the
candidate. Defaults: α = 1 (official ``ALPHA=1.0``), multiply (official ``COMBINED='multi'``). The kept tokens
go to the LLM in ascending order, projected as the model projects them.

Differences from the official code, each deliberate:

* float32 (official fp16: gains up to N summed at a resolution of 0.5, so ties are common and fall to the lowest
  index; an fp32 port can select differently on near-ties).
* Each image is selected on its own with the budget's count (official: ``num_token / B`` for a vision batch of B
  images, so a LLaVA-1.5 batch splits one budget).
* LLaVA-NeXT: the official code runs SCOPE per sub-image (``int(num / n_sub)`` each) and then disables unpad and
  newlines; HF keeps both, so here each sub-image (thumbnail, each unpadded crop; :meth:`TokenLayout.sub_images`)
  gets a share of the image's count in proportion to its tokens (:func:`vlm_compress.budget.apportion`), each crop
  scored by its own CLS, and newlines are never chosen unless the budget exceeds the content tokens.
* Qwen2-VL/Qwen2.5-VL (no CLS; the official code has none): the saliency is the received-attention substitute of
  :mod:`vlm_compress.scoring`, ``V`` the merger's input (four patches concatenated). The official code needs
  ``output_attentions`` (eager CLIP); here the CLS row comes from the captured q/k.
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import apportion
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection

COMBINE = ("multiply", "add")


def coverage_greedy(features: torch.Tensor, saliency: torch.Tensor, k: int, alpha: float = 1.0,
                    combine: str = "multiply") -> torch.Tensor:
    """``[k]`` indices of ``features`` [N, D] in the order SCOPE's greedy picks them (``k`` capped at ``N``), with
    ``saliency`` [N] (non-negative) weighting the facility-location gains (module docstring)."""
    n = features.shape[0]
    k = min(int(k), n)
    order = torch.empty(k, dtype=torch.long, device=features.device)
    if k == 0:
        return order
    unit = torch.nn.functional.normalize(features.detach().float(), dim=-1)
    similarity = unit @ unit.T  # [N, N]
    weight = saliency.detach().float().clamp_min(0) ** alpha
    covered = similarity.new_zeros(n)
    chosen = torch.zeros(n, dtype=torch.bool, device=features.device)
    for step in range(k):
        gains = (similarity - covered[:, None]).clamp_min(0).sum(dim=0)  # [N]: Σ_i max(0, S_ij − m_i)
        score = gains * weight if combine == "multiply" else gains + weight
        j = torch.argmax(score.masked_fill(chosen, float("-inf")))
        order[step] = j
        chosen[j] = True
        covered = torch.maximum(covered, similarity[j])
    return order


@register_method("scope")
@dataclasses.dataclass
class ScopePruner(EncoderPruner):
    layer: int = dataclasses.field(
        default=-2, metadata={"help": "Vision layer whose CLS attention is the saliency (official: 22 of 24, -2)."}
    )
    alpha: float = dataclasses.field(default=1.0, metadata={"help": "Saliency exponent α (official ALPHA: 1.0).",
                                                            "range": (0, None)})
    combine: str = dataclasses.field(default="multiply", metadata={
        "help": "Gain × saliency^α ('multiply', official COMBINED='multi') or gain + saliency^α ('add').",
        "choices": COMBINE})

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        """Per image of ``ctx.features`` [I, N, D]: ``k`` tokens by saliency-weighted coverage → sorted ``[I, k]``."""
        features, keep, n = ctx.features, ctx.uniform_keep(), ctx.num_tokens
        device = features.device
        if keep >= n:
            return EncoderSelection.from_indices(features, torch.arange(n, device=device).expand(features.shape[0], n))
        saliency = ctx.cls_attention(self.layer, "sum", "probs")  # [I, N], newlines -inf
        parts = [p.to(device) for p in ctx.layout.sub_images()]
        sizes = [int(p.numel()) for p in parts]
        if keep >= sum(sizes):  # every content token, then newlines
            return EncoderSelection.top_k(features, saliency, keep)
        counts = apportion(keep, [float(s) for s in sizes], sizes)
        vision = ctx.images.vision_features
        chosen = []
        with torch.no_grad():  # indices only; the kept features are gathered with their autograd history
            for i in range(features.shape[0]):
                picks = [part[coverage_greedy(vision[i, part], saliency[i, part], count, self.alpha, self.combine)]
                         for part, count in zip(parts, counts) if count > 0]
                chosen.append(torch.cat(picks).sort().values)
        return EncoderSelection.from_indices(features, torch.stack(chosen))

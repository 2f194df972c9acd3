"""``fopru``: Focal Pruning (Jiang et al., arXiv 2411.14164; reference §3).

No official code exists. Implemented from the paper's description, with the open choices settled as follows
(each is an option):

* **Significance** of a token: the head-mean patch-to-patch attention of the vision layer that feeds the LLM
  (``layer=-2``), CLS excluded, averaged over the other axis: the attention a token *receives* (mean over
  queries) or *gives* (mean over keys). ``statistic="auto"`` takes, per image, whichever of the two has the larger
  variance (the paper's "most discriminative"; an unofficial implementation in hydrainfer does the same).
* **Post-softmax probabilities** by default (``kind="probs"``). The hydrainfer code takes pre-softmax logits
  (``kind="logits"``), where "given" is informative; with probabilities every row sums to one, so "given" is
  nearly constant and ``auto`` settles on "received". Measured on the embedded models
  (``eval/results/investigate_encoder_scores.md``), logits rank *below random* (tiny-llava @0.5: 0.398 vs random
  0.525) while probabilities are the best training-free method there (0.725; 0.550 @0.11): a query-mean of
  logits is ``(mean q)·k``, one fixed direction in key space, not where the queries actually look.
* **rank** strategy (global view): the ``k`` most significant tokens of the image.
* **row** strategy (local view): whole grid rows by mean significance, best first, as long as they fit; the next
  best row then gives its most significant tokens for the remainder, so the count equals the budget (the paper's
  row strategy is defined for budgets that are whole rows). On LLaVA-NeXT the thumbnail's rows and the
  high-resolution grid's rows compete; a high-resolution row kept whole keeps its newline token, which counts.
* Selected tokens keep their original order ("reordered to maintain their original positional relationships").
  Under AnyRes every token is scored within its own crop (or the thumbnail), and the statistic is chosen once per
  image over all of them.
* **Qwen2-VL/Qwen2.5-VL** (no CLS, packed tower): received and given are taken within each image or video frame
  (:class:`vlm_compress.scoring.PackedAttentionCapture`), a visual token's being the mean of its four merged patches;
  rows are the rows of the merged grid.
"""

from __future__ import annotations

import dataclasses

import torch

from ..adapters.base import OUTSIDE, TokenLayout
from ..ops import SCORE_KINDS, topk_indices
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection

STRATEGIES = ("rank", "row")
STATISTICS = ("auto", "received", "given")


@register_method("fopru")
@dataclasses.dataclass
class FoPruPruner(EncoderPruner):
    strategy: str = dataclasses.field(default="rank", metadata={"help": "'rank' (global) or 'row' (whole rows).", "choices": STRATEGIES})
    layer: int = dataclasses.field(default=-2, metadata={"help": "Vision layer scored (the feature layer, -2)."})
    kind: str = dataclasses.field(
        default="probs", metadata={"help": "'probs' (post-softmax; measured best) or 'logits' (hydrainfer's choice).",
                                 "choices": SCORE_KINDS}
    )
    statistic: str = dataclasses.field(
        default="auto", metadata={"help": "'received', 'given', or 'auto' (the one with larger variance per image).",
                                "choices": STATISTICS}
    )

    def attention_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def needs_all_query_rows(self) -> bool:
        return True

    def significance(self, ctx: EncoderContext) -> torch.Tensor:
        """``[I, N]`` token significance (``-inf`` for tokens without a tower source, such as newlines)."""
        received, given = ctx.attention_statistics(self.layer, self.kind)
        if self.statistic == "received":
            return received
        if self.statistic == "given":
            return given
        finite = torch.isfinite(received)
        pick_received = _variance(received, finite) >= _variance(given, finite)
        return torch.where(pick_received[:, None], received, given)

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor:
        return self.significance(ctx)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        keep = ctx.uniform_keep()
        scores = self.significance(ctx)
        if self.strategy == "rank" or keep >= ctx.num_tokens:
            return EncoderSelection.top_k(ctx.features, scores, keep)
        rows = _grid_rows(ctx.layout)
        index = torch.stack([_best_rows(rows, s, keep) for s in scores.cpu()])
        return EncoderSelection.from_indices(ctx.features, index.to(ctx.features.device))


def _variance(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = torch.where(mask, x, torch.zeros_like(x))
    count = mask.sum(-1).clamp_min(1)
    mean = x.sum(-1) / count
    return (((x - mean[:, None]) * mask) ** 2).sum(-1) / count


def _grid_rows(layout: TokenLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per grid row of every partition: (its tokens in column order, its trailing newline or an empty tensor)."""
    out = []
    for partition in sorted(layout.grids):
        tokens = layout.tokens_of(partition)
        row_of = layout.cell[tokens, 0]
        for r in row_of.unique().tolist():
            members = tokens[row_of == r]
            after = int(members.max()) + 1
            newline = (torch.tensor([after]) if after < layout.num_tokens and bool(layout.newline[after])
                       else torch.empty(0, dtype=torch.long))
            out.append((members, newline))
    prefix = ((layout.partition == OUTSIDE) & ~layout.newline).nonzero().squeeze(1)  # e.g. CLS under "full"
    if prefix.numel():
        out.append((prefix, torch.empty(0, dtype=torch.long)))
    return out


def _best_rows(rows: list[tuple[torch.Tensor, torch.Tensor]], scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Whole rows by mean score while they fit, then the top tokens of the next best row; sorted indices."""
    means = torch.stack([scores[members].mean() for members, _ in rows])
    order = torch.sort(means, descending=True, stable=True).indices.tolist()
    chosen, left = [], keep
    for r in order:
        members, newline = rows[r]
        cost = members.numel() + newline.numel()
        if cost <= left:
            chosen += [members, newline]
            left -= cost
        else:
            chosen.append(members[topk_indices(scores[members], min(left, members.numel()))])
            left -= min(left, members.numel())
        if left == 0:
            break
    return torch.cat(chosen).sort().values

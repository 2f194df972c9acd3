"""``mustdrop``: MustDrop stage 1, the vision-encoder stage (Liu et al., arXiv 2411.10803; reference §5).

The patch grid of every tower image is cut into non-overlapping ``3×3`` windows. A window whose tokens are alike
(mean pairwise cosine similarity of their ViT layer-0 hidden states ≥ 0.8) is merged into one token, the
size-weighted average of its members, placed at its last (bottom-right) member. Then a key set, the top 8 % of
the remaining tokens by CLS attention of the last ViT layer, is marked in ``EncoderSelection.protected``: later
stages (MustDrop's in-LLM stages 2–3) must never drop those. Official constants: threshold 0.8, window 3×3,
key rate 0.08, layers 0 and 23 of 24.

As an encoder-stage method alone it meets the budget like the others: if more tokens than the budget remain after
merging, the non-key tokens with the lowest CLS attention are dropped (newlines first); if fewer remain, fewer
are kept (the count is adaptive, as in the paper). With ``fixed_count=True`` (set by the vLLM plugin, whose
placeholder counts are fixed before the image is encoded) only the most similar windows above the threshold are
merged, as many as keep the survivors at or above the budget, so every image comes out with exactly the budget. Differences from the official code, each deliberate:

* Merging is applied to the feature-layer outputs, windows chosen by layer-0 similarity; the official code merges
  layer-0 hidden states and runs the rest of the tower on the shorter sequence (that would mean replacing the
  tower's forward). A merged token's CLS score is the mean of its members'.
* Every window above the threshold is merged, per image. The official code merges the same number ``r`` in every
  image of a batch (the batch minimum), so a sample's result would depend on its batch.
* Merged tokens stay in raster order (the official code moves them to the front).
* At a budget covering every token nothing is merged (identity at full budget).
* Qwen2-VL/Qwen2.5-VL: windows are 3×3 blocks of the merged token grid (a token's layer-0 hidden state is the mean
  of its four patches'), merged tokens are averaged in the merger's input space and projected by the merger, and the
  key set is chosen by the received-attention substitute of :mod:`vlm_compress.scoring` (no CLS).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .. import kernels
from ..ops import topk_indices
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection


@register_method("mustdrop")
@dataclasses.dataclass
class MustDropPruner(EncoderPruner):
    adaptive_count: ClassVar[bool] = True

    threshold: float = dataclasses.field(default=0.8, metadata={"help": "Merge a window at this mean cosine similarity.",
                                                                      "range": (-1, 1)})
    window: int = dataclasses.field(default=3, metadata={"help": "Window side in patches (official: 3).", "range": (1, None)})
    merge_layer: int = dataclasses.field(default=0, metadata={"help": "ViT layer whose outputs decide merges (official: 0)."})
    key_layer: int = dataclasses.field(default=-1, metadata={"help": "ViT layer of the key-set CLS attention (official: last)."})
    key_rate: float = dataclasses.field(default=0.08, metadata={"help": "Share of tokens in the protected key set.", "range": (0, 1)})
    fixed_count: bool = dataclasses.field(default=False, metadata={
        "help": "Always output exactly the budget: merge the most similar windows only while the survivors stay at or "
                "above it (what serving engines that fix placeholder counts up front need; the vLLM plugin sets it)."})

    def exact_count(self) -> bool:
        return self.fixed_count

    def attention_layers(self) -> tuple[int, ...]:
        return (self.key_layer,)

    def hidden_state_layers(self) -> tuple[int, ...]:
        return (self.merge_layer,)

    def windows(self, ctx: EncoderContext) -> list[list[torch.Tensor]]:
        """Per image, the complete windows as token-index tensors (members in raster order)."""
        tower_image, cell = ctx.tower_cell()
        out = []
        for i in range(tower_image.shape[0]):
            valid = (tower_image[i] >= 0).nonzero().squeeze(1).cpu()
            key = torch.stack([tower_image[i, valid].cpu(), cell[i, valid, 0].cpu() // self.window,
                               cell[i, valid, 1].cpu() // self.window], 1)
            groups: dict[tuple[int, int, int], list[int]] = {}
            for token, k in zip(valid.tolist(), key.tolist()):
                groups.setdefault(tuple(k), []).append(token)
            out.append([torch.tensor(g) for g in groups.values() if len(g) == self.window**2])
        return out

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor:
        """``[I, N]`` the key layer's CLS attention (newlines -inf)."""
        return ctx.cls_attention(self.key_layer, "mean", "probs")

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        keep, n = ctx.uniform_keep(), ctx.num_tokens
        scores = self.token_scores(ctx).cpu()
        if keep >= n:
            index = torch.arange(n, device=ctx.features.device).expand(scores.shape[0], n)
            selection = EncoderSelection.from_indices(ctx.features, index)
            selection.protected = [topk_indices(s, math.ceil(self.key_rate * n)) for s in scores]
            return selection
        hidden = ctx.hidden(self.merge_layer)
        vision = ctx.images.vision_features
        features, kept, merged_into, protected = [], [], [], []
        for i, windows in enumerate(self.windows(ctx)):
            slot_of = torch.arange(n)  # token → the token it is merged into (itself if not merged)
            merged_value: dict[int, torch.Tensor] = {}
            score = scores[i].clone()
            if windows:
                index = torch.stack(windows)  # [W, window²]
                merged, similarity, means = kernels.window_merge(vision[i : i + 1], hidden[i : i + 1], index,
                                                                 self.threshold)
                chosen_windows = merged[0].nonzero().flatten()
                if self.fixed_count:  # the most similar first, while the survivors stay >= keep
                    room = max(n - keep, 0) // (self.window**2 - 1) if self.window > 1 else 0
                    order = similarity[0, chosen_windows].float().argsort(descending=True, stable=True)
                    chosen_windows = chosen_windows[order[:room]].sort().values
                for w in chosen_windows.tolist():
                    members = index[w]
                    target = int(members[-1])
                    slot_of[members] = target
                    merged_value[target] = means[0, w].float()
                    score[target] = scores[i, members].mean()
            survivors = (slot_of == torch.arange(n)).nonzero().squeeze(1)
            s = score[survivors]
            keys = topk_indices(s, min(math.ceil(self.key_rate * int(torch.isfinite(s).sum())), keep))
            if survivors.numel() > keep:  # the budget: keys first, then the best of the rest
                priority = s.clone()
                priority[keys] = float("inf")
                chosen = topk_indices(priority, keep)
                keys = torch.nonzero(torch.isin(chosen, keys)).squeeze(1)
                survivors = survivors[chosen]
            out = ctx.features[i, survivors.to(ctx.features.device)].clone()
            for j, token in enumerate(survivors.tolist()):
                if token in merged_value:
                    out[j] = ctx.images.project(merged_value[token].to(vision.dtype)).to(out.dtype)
            slot = torch.full((n,), -1, dtype=torch.long)
            slot[survivors] = torch.arange(survivors.numel())
            merged_into.append(slot[slot_of].to(ctx.features.device))
            features.append(out)
            kept.append(survivors.to(ctx.features.device))
            protected.append(keys)
        return EncoderSelection(features=features, kept_index=kept, merged_into=merged_into, protected=protected)

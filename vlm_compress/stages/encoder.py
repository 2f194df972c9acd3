"""Encoder stage: select or merge visual tokens before the LLM and shorten the prompt to match.

Given the stock processor's inputs (every image expanded to its full placeholder count), :meth:`EncoderStage.run`
encodes the images with score hooks, lets the pruner choose ``k_i`` tokens per image, keeps the first ``k_i``
placeholders of each image's run, drops the rest from ``input_ids``/``attention_mask``/``labels``, and re-pads the
rows on their original side. Positions become contiguous (``cumsum(attention_mask) - 1`` in ``generate``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from ..adapters.base import Adapter, ImageBatch
from ..budget import tokens_to_keep
from ..pruners.base import EncoderContext, EncoderPruner, EncoderSelection
from ..scoring import AttentionCapture
from ..stats import CompressionStats, prompt_costs


@dataclasses.dataclass
class RewrittenInputs:
    """The shortened prompt and the features that fill its placeholders (``[k_i, D]`` per image)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    image_features: list[torch.Tensor]
    keep_mask: torch.Tensor  # [B, L] which original positions survive
    selection: EncoderSelection
    stats: CompressionStats


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def repack_rows(
    values: torch.Tensor, keep: torch.Tensor, fill: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact the ``keep`` entries of each row of ``values`` [B, L] and pad to the longest row.

    Returns ``(packed [B, L'], new_mask [B, L'])``; padding goes left when ``left`` (as generation needs).
    """
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if keep.numel() else 0
    rank = keep.long().cumsum(dim=1) - 1
    column = rank + (width - lengths).unsqueeze(1) if left else rank
    packed = torch.full((values.shape[0], width), fill, dtype=values.dtype, device=values.device)
    mask = torch.zeros((values.shape[0], width), dtype=torch.long, device=values.device)
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(keep)
    packed[rows[keep], column[keep]] = values[keep]
    mask[rows[keep], column[keep]] = 1
    return packed, mask


class EncoderStage:
    """Runs one encoder-stage pruner on a model through its adapter."""

    def __init__(self, adapter: Adapter, pruner: EncoderPruner):
        pruner.check(adapter)
        self.adapter = adapter
        self.pruner = pruner
        self._attention = {layer: adapter.vision_attention(layer) for layer in pruner.attention_layers()}
        self._layers = {layer: adapter.vision_layer(layer) for layer in pruner.hidden_state_layers()}

    def run(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_kwargs: dict[str, Any] | None = None,
    ) -> RewrittenInputs | None:
        """Compress one call's inputs; ``None`` when there is nothing to compress (no placeholders)."""
        image_mask = input_ids == self.adapter.image_token_id
        if not bool(image_mask.any()):
            return None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device

        t0 = _now(device)
        with AttentionCapture(self._attention, self.pruner.needs_all_query_rows(), self._layers) as capture:
            batches = self.adapter.encode_images(pixel_values, **(image_kwargs or {}))
        t1 = _now(device)

        counts = [b.layout.num_tokens for b in batches for _ in range(b.num_images)]
        placeholders = int(image_mask.sum())
        if placeholders != sum(counts):
            raise ValueError(
                f"the prompt has {placeholders} image placeholder tokens but {len(counts)} image(s) give "
                f"{sum(counts)} visual tokens ({', '.join(map(str, counts))}); build inputs with the model's "
                f"processor, which expands each image token to its number of visual tokens"
            )
        width = input_ids.shape[1]
        flat_positions = image_mask.flatten().nonzero().squeeze(1).split(counts)
        sample_of_image = [int(p[0]) // width for p in flat_positions]
        rank_in_prompt = [sample_of_image[:i].count(s) for i, s in enumerate(sample_of_image)]

        selection, keep = self._select(batches, rank_in_prompt, capture)
        t2 = _now(device)

        keep_flat = ~image_mask.flatten()
        for positions, k in zip(flat_positions, keep):
            keep_flat[positions[:k]] = True
        keep_mask = keep_flat.view_as(input_ids)
        valid = attention_mask.bool()
        survive = keep_mask & valid
        left = not bool((attention_mask[:, -1] == 0).any())
        pad_id = getattr(self.adapter.text_config, "pad_token_id", None)
        new_ids, new_mask = repack_rows(input_ids, survive, pad_id if pad_id is not None else 0, left)
        new_labels = repack_rows(labels, survive, -100, left)[0] if labels is not None else None
        new_positions = None
        if position_ids is not None:
            new_positions = (new_mask.cumsum(dim=1) - 1).masked_fill(new_mask == 0, 0)

        newlines = self._newlines(batches, selection)
        stats = self._stats(valid, survive, keep, counts, newlines, batches[0].features.dtype, t1 - t0, t2 - t1)
        return RewrittenInputs(
            input_ids=new_ids,
            attention_mask=new_mask.to(attention_mask.dtype),
            labels=new_labels,
            position_ids=new_positions,
            image_features=selection.features,
            keep_mask=keep_mask,
            selection=selection,
            stats=stats,
        )

    def _select(
        self, batches: list[ImageBatch], rank_in_prompt: list[int], capture: AttentionCapture
    ) -> tuple[EncoderSelection, list[int]]:
        """Run the pruner once per group of images with equal layouts; results in placeholder order."""
        members: dict[Any, list[tuple[int, ImageBatch, int]]] = {}
        image = 0
        for batch in batches:
            for row in range(batch.num_images):
                members.setdefault(batch.layout.key(), []).append((image, batch, row))
                image += 1
        features: list[Any] = [None] * image
        kept_index: list[Any] = [None] * image
        merged_into: list[Any] = [None] * image
        protected: list[Any] = [None] * image
        keep = [0] * image
        for group in members.values():
            whole = group[0][1]
            if len(group) == whole.num_images and all(b is whole and r == j for j, (_, b, r) in enumerate(group)):
                images = whole  # one adapter batch, in order (LLaVA-1.5): no copy
            else:
                images = ImageBatch.cat([batch.rows([row]) for _, batch, row in group])
            count = self.pruner.output_count(tokens_to_keep(self.pruner.budget, images.layout.num_tokens), images)
            ctx = EncoderContext(images=images, keep=[count] * len(group),
                                 image_index_in_prompt=[rank_in_prompt[i] for i, _, _ in group], capture=capture)
            chosen = self.pruner.select(ctx)
            for j, (i, _, _) in enumerate(group):
                got = chosen.features[j].shape[0]
                if got > count or (got < count and not self.pruner.adaptive_count) or got == 0:
                    raise RuntimeError(f"{self.pruner.name} returned {got} tokens for image {i}, expected {count}")
                features[i], kept_index[i], keep[i] = chosen.features[j], chosen.kept_index[j], got
                merged_into[i] = chosen.merged_into[j] if chosen.merged_into is not None else None
                protected[i] = chosen.protected[j] if chosen.protected is not None else None
        complete = lambda values: values if all(v is not None for v in values) else None  # noqa: E731
        selection = EncoderSelection(features=features, kept_index=kept_index, merged_into=complete(merged_into),
                                     protected=complete(protected))
        return selection, keep

    @staticmethod
    def _newlines(batches: list[ImageBatch], selection: EncoderSelection) -> tuple[int, int]:
        """(newline tokens in, newline tokens that reach the LLM as themselves)."""
        layouts = [b.layout for b in batches for _ in range(b.num_images)]
        total = sum(layout.num_newlines for layout in layouts)
        kept = sum(int(layout.newline[idx.cpu()].sum()) for layout, idx in zip(layouts, selection.kept_index))
        return total, kept

    def _stats(
        self,
        valid: torch.Tensor,
        survive: torch.Tensor,
        keep: list[int],
        counts: list[int],
        newlines: tuple[int, int],
        dtype: torch.dtype,
        encode_s: float,
        select_s: float,
    ) -> CompressionStats:
        text_config = self.adapter.text_config
        full_lengths = valid.sum(dim=1).tolist()
        new_lengths = survive.sum(dim=1).tolist()
        element = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        flops, kv = prompt_costs(new_lengths, text_config, element)
        flops_full, kv_full = prompt_costs(full_lengths, text_config, element)
        kept = sum(keep)
        return CompressionStats(
            images=len(keep),
            visual_tokens_in=sum(counts),
            visual_tokens_kept=kept,
            layer_avg_visual_tokens=kept / len(keep),
            prompt_tokens_in=sum(full_lengths),
            prompt_tokens_llm=sum(new_lengths),
            prefill_flops=flops,
            prefill_flops_full=flops_full,
            kv_cache_bytes=kv,
            kv_cache_bytes_full=kv_full,
            encode_ms=encode_s * 1e3,
            select_ms=select_s * 1e3,
            kept_per_image=list(keep),
            newlines_in=newlines[0],
            newlines_kept=newlines[1],
        )

"""Encoder stage: select or merge visual tokens before the LLM and shorten the prompt to match.

Given the stock processor's inputs (every image expanded to its full placeholder count), :meth:`EncoderStage.run`
encodes the images with score hooks, lets the pruner choose ``k_i`` tokens per image, keeps the first ``k_i``
placeholders of each image's run, drops the rest from ``input_ids``/``attention_mask``/``labels``, and re-pads the
rows on their original side. Positions become contiguous (``cumsum(attention_mask) - 1`` in ``generate``).

Videos: the budget covers the whole video (``tokens_to_keep(budget, F·n + suffix)``); the suffix (OneVision's
closing newline) is always kept and the rest is split over frames by :meth:`EncoderPruner.frame_counts` (evenly,
unless the method assigns frames, as QuoTA does). The pruner then selects within each frame as within an image;
a frame given no tokens disappears with its placeholders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Iterator

import torch

from ..adapters.base import Adapter, ImageBatch, VideoBatch
from ..budget import auto_count, auto_mass, is_auto, tokens_to_keep
from ..pruners.base import EncoderContext, EncoderPruner, EncoderSelection, ModelRunner, VideoContext, kept_count
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
    selection: EncoderSelection  # images first, then videos (each in placeholder order)
    stats: CompressionStats
    video_features: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [k_v, D] per video
    token_inputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # shortened [B, L'] inputs


def _ranks(samples: list[int]) -> list[int]:
    """Each item's rank among the earlier items of its own sample (batch-invariant)."""
    return [samples[:i].count(s) for i, s in enumerate(samples)]


def _complete(values: list[Any]) -> list[Any] | None:
    return values if values and all(v is not None for v in values) else None


def _instruction(input_ids: torch.Tensor, text: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[T]`` the text tokens (``text`` [B, L] bool) of the row holding flat placeholder ``positions`` that come
    after the last of them."""
    width = input_ids.shape[1]
    row, last = int(positions[-1]) // width, int(positions[-1]) % width
    after = text[row].clone()
    after[: last + 1] = False
    return input_ids[row][after]


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


@dataclasses.dataclass
class _Unit:
    """One image or one video frame to select from: row ``row`` of ``batch``, to come out with ``count`` tokens."""

    batch: ImageBatch
    row: int
    requested: int  # the budget it gets; the pruner's output_count of it is what it must come out with
    rank: int  # batch-invariant position among its prompt's images/frames (seeds of random methods)
    capture: AttentionCapture
    instruction: torch.Tensor  # [T] the prompt's text after the image/video (EncoderContext.instruction_ids)


@dataclasses.dataclass
class _Chosen:
    features: torch.Tensor
    kept_index: torch.Tensor
    merged_into: torch.Tensor | None
    protected: torch.Tensor | None


class EncoderStage:
    """Runs one encoder-stage pruner on a model through its adapter."""

    def __init__(self, adapter: Adapter, pruner: EncoderPruner):
        pruner.check(adapter)
        self.adapter = adapter
        self.pruner = pruner
        self._attention = {layer: adapter.vision_attention(layer) for layer in pruner.attention_layers()}
        self._layers = {layer: adapter.vision_layer(layer) for layer in pruner.hidden_state_layers()}
        self.suspended = False  # scoring passes (ModelRunner) run the model uncompressed

    @contextlib.contextmanager
    def suspend(self) -> Iterator[None]:
        previous, self.suspended = self.suspended, True
        try:
            yield
        finally:
            self.suspended = previous

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` token ids → ``[T, D]`` the LLM's input embeddings (no gradient)."""
        embedding = self.adapter.model.get_input_embeddings()
        with torch.no_grad():  # ids stay on the prompt's device: an offloading hook (accelerate) moves them itself
            return embedding(ids)

    def _capture(self) -> AttentionCapture:
        return self.adapter.capture(self._attention, self.pruner.needs_all_query_rows(), self._layers)

    def run(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_kwargs: dict[str, Any] | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_kwargs: dict[str, Any] | None = None,
        token_inputs: dict[str, torch.Tensor] | None = None,
    ) -> RewrittenInputs | None:
        """Compress one call's inputs; ``None`` when there is nothing to compress (no placeholders).

        ``token_inputs``: other ``[B, L]`` per-token inputs (``mm_token_type_ids``), shortened like ``input_ids``.
        Where the adapter gives per-token positions (M-RoPE), every kept token keeps the position it has in the
        uncompressed prompt (a kept visual token: the one of the token it was selected as) and ``position_ids``
        of the shortened prompt are returned, ``[R + 1, B, L']`` with contiguous text positions in row 0 (the
        layout the stock ``generate`` builds and extends by one per step)."""
        adapter = self.adapter
        if not bool(adapter.visual_mask(input_ids).any()):
            return None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device

        t0 = _now(device)
        images, videos = [], []
        image_capture, video_capture = self._capture(), self._capture()
        if pixel_values is not None:
            with image_capture:
                images = adapter.encode_images(pixel_values, **(image_kwargs or {}))
        if pixel_values_videos is not None:
            with video_capture:
                videos = adapter.encode_videos(pixel_values_videos, **(video_kwargs or {}))
        t1 = _now(device)

        image_counts = [b.layout.num_tokens for b in images for _ in range(b.num_images)]
        video_counts = [v.num_tokens for v in videos]
        image_positions = self._positions(input_ids, adapter.image_token_id, image_counts, "image")
        video_positions = (self._positions(input_ids, adapter.video_token_id, video_counts, "video")
                           if adapter.video_token_id is not None else [])
        width = input_ids.shape[1]
        image_ranks = _ranks([int(p[0]) // width for p in image_positions])
        video_samples = [int(p[0]) // width for p in video_positions]

        units = []
        text = attention_mask.bool() & ~adapter.visual_mask(input_ids)
        flat = [(batch, row) for batch in images for row in range(batch.num_images)]
        for (batch, row), rank, positions in zip(flat, image_ranks, image_positions):
            units.append(_Unit(batch, row, self._requested(batch.layout.num_tokens), rank,
                               image_capture, _instruction(input_ids, text, positions)))
        runner = ModelRunner(adapter.model, self.suspend)
        frame_counts, frame_scores = [], []
        for video, sample, rank, positions in zip(videos, video_samples, _ranks(video_samples), video_positions):
            instruction = _instruction(input_ids, text, positions)
            counts, scores = self._frame_counts(video, input_ids[sample][attention_mask[sample].bool()], runner)
            frame_counts.append(counts)
            frame_scores.append(scores)
            for f, count in enumerate(counts):
                if count > 0:
                    units.append(_Unit(video.frames, f, count, rank * 100_000 + f, video_capture, instruction))
        if is_auto(self.pruner.budget):
            self._auto_counts(units)
        chosen = self._select(units)
        t2 = _now(device)

        image_chosen = chosen[: len(flat)]
        video_chosen, features_v, kept_per_frame = self._assemble_videos(videos, frame_counts, chosen[len(flat):])
        selection = EncoderSelection(
            features=[c.features for c in image_chosen] + [c.features for c in video_chosen],
            kept_index=[c.kept_index for c in image_chosen] + [c.kept_index for c in video_chosen],
            merged_into=_complete([c.merged_into for c in image_chosen + video_chosen]),
            protected=_complete([c.protected for c in image_chosen + video_chosen]),
        )
        keep = [c.features.shape[0] for c in image_chosen + video_chosen]

        keep_flat = ~adapter.visual_mask(input_ids).flatten()
        origin = torch.arange(input_ids.numel(), device=device)  # the uncompressed token whose position each keeps
        for positions, k, c in zip(image_positions + video_positions, keep, image_chosen + video_chosen):
            keep_flat[positions[:k]] = True
            origin[positions[:k]] = positions[c.kept_index.to(positions.device)]
        keep_mask = keep_flat.view_as(input_ids)
        valid = attention_mask.bool()
        survive = keep_mask & valid
        left = not bool((attention_mask[:, -1] == 0).any())
        pad_id = getattr(adapter.text_config, "pad_token_id", None)
        new_ids, new_mask = repack_rows(input_ids, survive, pad_id if pad_id is not None else 0, left)
        new_labels = repack_rows(labels, survive, -100, left)[0] if labels is not None else None
        new_positions = None
        full = adapter.prompt_positions(input_ids, attention_mask, {**(image_kwargs or {}), **(video_kwargs or {})})
        if full is not None:  # [R, B, L]: each kept token at its uncompressed position
            kept_at = full.flatten(1)[:, origin].view_as(full)
            rows = [repack_rows(row, survive, 0, left)[0] for row in kept_at]
            text = (new_mask.cumsum(dim=1) - 1).masked_fill(new_mask == 0, 0)
            new_positions = torch.stack([text, *rows])
        elif position_ids is not None:
            new_positions = (new_mask.cumsum(dim=1) - 1).masked_fill(new_mask == 0, 0)
        new_tokens = {name: repack_rows(value, survive, 0, left)[0] for name, value in (token_inputs or {}).items()}

        newlines = self._newlines(images, image_chosen)
        suffix = sum(v.suffix.shape[0] for v in videos)
        newlines = (newlines[0] + suffix, newlines[1] + suffix)
        dtype = (images[0].features if images else videos[0].frames.features).dtype
        stats = self._stats(valid, survive, keep, image_counts + video_counts, newlines, dtype, t1 - t0, t2 - t1)
        if videos:
            stats.kept_per_frame = kept_per_frame
            stats.frame_scores = frame_scores if any(s is not None for s in frame_scores) else None
            stats.scoring_passes, stats.scoring_ms = runner.passes, runner.seconds * 1e3
            stats.scoring_tokens, stats.scoring_flops = runner.tokens, runner.flops
        return RewrittenInputs(
            input_ids=new_ids,
            attention_mask=new_mask.to(attention_mask.dtype),
            labels=new_labels,
            position_ids=new_positions,
            image_features=[c.features for c in image_chosen],
            keep_mask=keep_mask,
            selection=selection,
            stats=stats,
            video_features=features_v,
            token_inputs=new_tokens,
        )

    @staticmethod
    def _positions(input_ids: torch.Tensor, token_id: int, counts: list[int], kind: str) -> list[torch.Tensor]:
        """Flat placeholder positions of each image/video (row-major), checked against the encoded counts."""
        mask = input_ids == token_id
        placeholders = int(mask.sum())
        if placeholders != sum(counts):
            given = f"{len(counts)} {kind}(s) give {sum(counts)} visual tokens ({', '.join(map(str, counts))})"
            if not counts:
                given = f"the call has no {kind} pixels (pixel_values{'_videos' if kind == 'video' else ''})"
            raise ValueError(
                f"the prompt has {placeholders} {kind} placeholder tokens but {given}; build inputs with the "
                f"model's processor, which expands each {kind} token to its number of visual tokens"
            )
        return list(mask.flatten().nonzero().squeeze(1).split(counts)) if counts else []

    def _requested(self, num_tokens: int) -> int:
        """An image's budget in tokens; under ``budget="auto"`` all of them until :meth:`_auto_counts`."""
        return num_tokens if is_auto(self.pruner.budget) else tokens_to_keep(self.pruner.budget, num_tokens)

    def _auto_counts(self, units: list[_Unit]) -> None:
        """``budget="auto"``: each unit's count from the pruner's token scores (:func:`~vlm_compress.budget.auto_count`),
        scored in groups of one layout and capture; a unit's count depends on its own scores only."""
        mass = auto_mass(self.pruner.budget)
        groups: dict[Any, list[int]] = {}
        for i, unit in enumerate(units):
            groups.setdefault((unit.batch.layout.key(), id(unit.capture)), []).append(i)
        for members in groups.values():
            images = ImageBatch.cat([units[i].batch.rows([units[i].row]) for i in members])
            n = images.layout.num_tokens
            ctx = EncoderContext(images=images, keep=[n] * len(members),
                                 image_index_in_prompt=[units[i].rank for i in members], capture=units[members[0]].capture)
            scores = self.pruner.token_scores(ctx)
            for j, i in enumerate(members):
                units[i].requested = auto_count(scores[j], mass)

    def _frame_counts(self, video: VideoBatch, prompt_ids: torch.Tensor,
                      runner: ModelRunner) -> tuple[list[int], list[float] | None]:
        """Per-frame token counts of one video: the budget over the whole video (suffix kept), split by the
        pruner (evenly unless it assigns frames itself), checked to sum exactly. Under ``budget="auto"`` every
        frame is a unit of its own, counted by its scores (:meth:`_auto_counts`)."""
        per_frame = video.frames.layout.num_tokens
        if is_auto(self.pruner.budget):
            return [per_frame] * video.num_frames, None
        suffix = video.suffix.shape[0]
        total = tokens_to_keep(self.pruner.budget, video.num_tokens)
        frame_total = min(max(total - suffix, 1), video.num_frames * per_frame)
        ctx = VideoContext(video=video, total=frame_total, prompt_ids=prompt_ids, runner=runner)
        counts = [int(c) for c in self.pruner.frame_counts(ctx)]
        if len(counts) != video.num_frames or sum(counts) != frame_total or min(counts) < 0 or max(counts) > per_frame:
            raise RuntimeError(f"{self.pruner.name} assigned {counts} tokens over {video.num_frames} frames of "
                               f"{per_frame}; expected non-negative counts summing to {frame_total}")
        return counts, ctx.frame_scores

    def _select(self, units: list[_Unit]) -> list[_Chosen]:
        """Run the pruner once per group of units with equal layout, budget and capture; results in unit order."""
        groups: dict[Any, list[int]] = {}
        for i, unit in enumerate(units):
            groups.setdefault((unit.batch.layout.key(), unit.requested, id(unit.capture)), []).append(i)
        out: list[Any] = [None] * len(units)
        for members in groups.values():
            first = units[members[0]]
            whole = first.batch
            if len(members) == whole.num_images and all(units[i].batch is whole and units[i].row == j
                                                        for j, i in enumerate(members)):
                images = whole  # one adapter batch, in order (LLaVA-1.5): no copy
            else:
                images = ImageBatch.cat([units[i].batch.rows([units[i].row]) for i in members])
            count = kept_count(self.pruner, images.layout, first.requested)
            ctx = EncoderContext(images=images, keep=[count] * len(members),
                                 image_index_in_prompt=[units[i].rank for i in members], capture=first.capture,
                                 requested=[first.requested] * len(members),
                                 instruction_ids=[units[i].instruction for i in members],
                                 embed_tokens=self._embed_tokens)
            chosen = self.pruner.select(ctx)
            for j, i in enumerate(members):
                got = chosen.features[j].shape[0]
                if got > count or (got < count and self.pruner.exact_count()) or got == 0:
                    raise RuntimeError(f"{self.pruner.name} returned {got} tokens for image {i}, expected {count}")
                out[i] = _Chosen(chosen.features[j], chosen.kept_index[j],
                                 chosen.merged_into[j] if chosen.merged_into is not None else None,
                                 chosen.protected[j] if chosen.protected is not None else None)
        return out

    @staticmethod
    def _assemble_videos(videos: list[VideoBatch], frame_counts: list[list[int]],
                         chosen: list[_Chosen]) -> tuple[list[_Chosen], list[torch.Tensor], list[list[int]]]:
        """Each video's kept frame tokens in temporal order, then its suffix; indices over the video's tokens
        (frame ``f``'s token ``j`` is ``f·n + j``; the suffix follows the last frame)."""
        out, features, kept_per_frame = [], [], []
        it = iter(chosen)
        for video, counts in zip(videos, frame_counts):
            n, frames = video.frames.layout.num_tokens, video.num_frames
            parts, index, merged, protected, kept, slot = [], [], [], [], [], 0
            for f, count in enumerate(counts):
                if count == 0:
                    kept.append(0)
                    merged.append(torch.full((n,), -1, dtype=torch.long, device=video.suffix.device))
                    continue
                c = next(it)
                parts.append(c.features)
                index.append(c.kept_index + f * n)
                merged.append(None if c.merged_into is None else torch.where(c.merged_into >= 0, c.merged_into + slot,
                                                                             c.merged_into))
                protected.append(None if c.protected is None else c.protected + slot)
                kept.append(c.features.shape[0])
                slot += c.features.shape[0]
            suffix = video.suffix.shape[0]
            device = video.suffix.device
            parts.append(video.suffix)
            index.append(torch.arange(frames * n, frames * n + suffix, device=device))
            merged_all = None
            if all(m is not None for m in merged):
                merged_all = torch.cat([*merged, torch.arange(slot, slot + suffix, device=device)])
            protected_all = torch.cat(protected) if protected and all(p is not None for p in protected) else None
            video_features = torch.cat(parts)
            out.append(_Chosen(video_features, torch.cat(index), merged_all, protected_all))
            features.append(video_features)
            kept_per_frame.append(kept)
        return out, features, kept_per_frame

    @staticmethod
    def _newlines(batches: list[ImageBatch], chosen: list[_Chosen]) -> tuple[int, int]:
        """(newline tokens in, newline tokens that reach the LLM as themselves) of the images."""
        layouts = [b.layout for b in batches for _ in range(b.num_images)]
        total = sum(layout.num_newlines for layout in layouts)
        kept = sum(int(layout.newline[c.kept_index.cpu()].sum()) for layout, c in zip(layouts, chosen))
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

"""LLaVA-OneVision structure (``LlavaOnevisionForConditionalGeneration``): AnyRes-max images and pooled video frames.

Images (``pack_image_features``): a prompt with one image gets the base grid, then the unpadded high-resolution
grid tiled from its crops, shrunk bilinearly when it exceeds ``anyres_max_N`` base grids, with one newline after
every row; in a multi-image prompt each image is its base grid plus one newline. As for LLaVA-NeXT, we run the
model's own packing on index tensors (tower image, row, column) to learn where every packed token comes from; a
shrunk grid's tokens map to the tower token nearest their interpolated position (its scores are read there).

Videos (``get_video_features``): every frame's grid goes through the projector, then ``apply_pooling`` resizes it
bilinearly to ``ceil(h/2)×ceil(w/2)``; frames follow each other and one ``image_newline`` closes the whole video
(transformers 5.18–5.24: no per-row or per-frame newlines, unlike the LLaVA-NeXT repository's video path). Each
frame is a pooled grid (:attr:`ImageBatch.pooled_from`): tower scores are pooled the same way.

The tower is SigLIP in the released models: no CLS token, so CLS-based methods use the substitute score of
:mod:`vlm_compress.scoring`. A CLIP tower (the embedded tiny video model) works as for LLaVA.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import compat
from .base import OUTSIDE, ImageBatch, TokenLayout, VideoBatch
from .llava import LlavaAdapter, ProjectorInput
from .llava_next import anyres_layout


class OnevisionAdapter(LlavaAdapter):
    model_class_names = ("LlavaOnevisionForConditionalGeneration",)
    anyres = True
    video = True

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def _strategy(self, kwargs: dict[str, Any]) -> tuple[str, int]:
        """(feature strategy, tower offset): the CLS column the features skip under ``"default"``."""
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        return strategy, 1 if strategy == "default" else 0

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> list[ImageBatch]:
        """One single-image :class:`ImageBatch` per image (layouts differ with the aspect ratio)."""
        get_grid_shape, num_patches = compat.anyres_helpers("llava_onevision")
        image_sizes = image_kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision image inputs need image_sizes; pass everything the processor returns")
        base, config = self.model.model, self.model.config
        _, tower_offset = self._strategy(image_kwargs)
        aspect = image_kwargs.get("vision_aspect_ratio") or config.vision_aspect_ratio
        with ProjectorInput(base.multi_modal_projector) as captured:
            packed = list(compat.image_features(base, pixel_values, **image_kwargs))
        batch_num_images = image_kwargs.get("batch_num_images")
        patched = ([True] * len(image_sizes) if batch_num_images is None
                   else [int(n) == 1 for n in batch_num_images for _ in range(int(n))])
        size = config.vision_config.image_size
        crops_per_image = [num_patches(s, config.image_grid_pinpoints, size) if p else 1
                           for s, p in zip(image_sizes, patched)]
        vision = captured.value  # [tower images, T', Dv]
        per_tower = vision.shape[1]
        side = size // config.vision_config.patch_size
        if per_tower != side * side:
            raise ValueError(f"{per_tower} features per tower image do not fill its {side}×{side} patch grid")
        starts = torch.tensor([0, *crops_per_image]).cumsum(0)[:-1].tolist()
        cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).view(-1, 2)
        index = [torch.cat([torch.arange(start, start + n)[:, None, None].expand(n, per_tower, 1),
                            cells[None].expand(n, -1, -1)], -1).double()
                 for start, n in zip(starts, crops_per_image)]  # [n, T', (tower image, row, col)]
        where3 = compat.pack_onevision(base, index, image_sizes, torch.full((3,), -1.0, dtype=torch.float64), aspect)

        vision_flat = vision.flatten(0, 1)
        batches = []
        for i, (feats, w3) in enumerate(zip(packed, where3)):
            w3 = w3.round().long()
            where = torch.where(w3[:, 0] >= 0, w3[:, 0] * per_tower + w3[:, 1] * side + w3[:, 2], -1).to(feats.device)
            crop_layout = tuple(get_grid_shape(image_sizes[i], config.image_grid_pinpoints, size)) if crops_per_image[i] > 1 else (0, 0)
            layout = anyres_layout(where, per_tower, starts[i], side, crop_layout)
            source = torch.where(where >= 0, (where // per_tower) * (per_tower + tower_offset) + tower_offset
                                 + where % per_tower, torch.full_like(where, OUTSIDE))
            vision_features = vision_flat[where.clamp_min(0)] * (where >= 0)[:, None].to(vision_flat.dtype)
            batches.append(ImageBatch(features=feats[None], vision_features=vision_features[None], layout=layout,
                                      source=source[None], tower_length=per_tower + tower_offset,
                                      project=base.multi_modal_projector))
        return batches

    def encode_videos(self, pixel_values_videos: torch.Tensor, **video_kwargs: Any) -> list[VideoBatch]:
        """One :class:`VideoBatch` per video: ``F`` pooled frame grids and the closing newline."""
        base, config = self.model.model, self.model.config
        _, tower_offset = self._strategy(video_kwargs)
        with ProjectorInput(base.multi_modal_projector) as captured:
            pooled = compat.video_features(base, pixel_values_videos, **video_kwargs)  # [B, F·n + 1, D]
        vision = captured.value  # [B·F, h·w, Dv]
        videos, frames = pixel_values_videos.shape[:2]
        side = config.vision_config.image_size // config.vision_config.patch_size
        grid = (math.ceil(side / 2), math.ceil(side / 2))
        n = grid[0] * grid[1]
        vision_pooled = base.apply_pooling(vision)  # the same bilinear resize, in the projector's input space
        tower_length = side * side + tower_offset
        rows = (torch.arange(grid[0]) * 2).clamp_max(side - 1)
        cols = (torch.arange(grid[1]) * 2).clamp_max(side - 1)
        corner = (rows[:, None] * side + cols[None, :]).flatten() + tower_offset  # [n] top-left tower token
        out = []
        for v in range(videos):
            tower_images = torch.arange(v * frames, (v + 1) * frames)[:, None]
            out.append(VideoBatch(
                frames=ImageBatch(
                    features=pooled[v, : frames * n].view(frames, n, -1),
                    vision_features=vision_pooled[v * frames:(v + 1) * frames],
                    layout=TokenLayout.single_grid(grid),
                    source=(tower_images * tower_length + corner[None]).to(pooled.device),
                    tower_length=tower_length,
                    project=base.multi_modal_projector,
                    pooled_from=(side, side),
                ),
                suffix=pooled[v, frames * n:],
                pixel_values=pixel_values_videos[v],
            ))
        return out

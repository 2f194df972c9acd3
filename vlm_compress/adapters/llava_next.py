"""LLaVA-NeXT AnyRes structure (``LlavaNextForConditionalGeneration``): thumbnail + crops + newline tokens.

The stock model packs each image as ``[thumbnail h·w] ++ [high-resolution grid, unpadded, one newline token
after every row]``, the high-resolution grid being the crops tiled in 2-D. Rather than re-deriving that packing
(its unpadding rounds in ways that are easy to get wrong), we run the model's own ``pack_image_features`` on a
one-channel tensor holding each tower token's flat index, with the newline set to -1: what comes out maps every
packed position to the tower token it came from, for any image size and any transformers version.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import compat
from .base import OUTSIDE, ImageBatch, TokenLayout
from .llava import LlavaAdapter, ProjectorInput


class LlavaNextAdapter(LlavaAdapter):
    model_class_names = ("LlavaNextForConditionalGeneration",)
    anyres = True

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> list[ImageBatch]:
        """One single-image :class:`ImageBatch` per image (AnyRes layouts differ with the aspect ratio)."""
        get_anyres_image_grid_shape, image_size_to_num_patches = compat.anyres_helpers()
        image_sizes = image_kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT inputs need image_sizes; pass everything the processor returns")
        base, config = self.model.model, self.model.config
        strategy = image_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        with ProjectorInput(base.multi_modal_projector) as captured:
            packed = list(compat.image_features(base, pixel_values, **image_kwargs))
        crops_per_image = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]
        vision = captured.value  # [tower images, T', Dv], T' = tower tokens the features keep
        per_tower = vision.shape[1]
        tower_offset = 1 if strategy == "default" else 0
        starts = torch.tensor([0, *crops_per_image]).cumsum(0)[:-1] * per_tower
        index = [
            (start + torch.arange(n * per_tower, dtype=torch.float64)).view(n, per_tower, 1)
            for start, n in zip(starts.tolist(), crops_per_image)
        ]
        newline = torch.tensor([-1.0], dtype=torch.float64)
        flat_index = compat.pack_anyres(base, index, image_sizes, strategy, newline)

        side = config.vision_config.image_size // config.vision_config.patch_size
        vision_flat = vision.flatten(0, 1)
        batches = []
        for i, (feats, where) in enumerate(zip(packed, flat_index)):
            where = where[:, 0].long().to(feats.device)  # [N] flat tower-token index, -1 for newlines
            crop_layout = tuple(get_anyres_image_grid_shape(image_sizes[i], config.image_grid_pinpoints,
                                                            config.vision_config.image_size))
            layout = anyres_layout(where, per_tower, int(starts[i]) // per_tower, side, crop_layout)
            source = torch.where(where >= 0, (where // per_tower) * (per_tower + tower_offset) + tower_offset
                                 + where % per_tower, torch.full_like(where, OUTSIDE))
            vision_features = vision_flat[where.clamp_min(0)] * (where >= 0)[:, None].to(vision_flat.dtype)
            batches.append(ImageBatch(
                features=feats[None],
                vision_features=vision_features[None],
                layout=layout,
                source=source[None],
                tower_length=per_tower + tower_offset,
                project=base.multi_modal_projector,
            ))
        return batches


def anyres_layout(where: torch.Tensor, per_tower: int, first_tower: int, side: int,
                  crop_layout: tuple[int, int]) -> TokenLayout:
    """Layout of one packed image from its flat tower indices (``-1``: newline)."""
    where = where.cpu()
    n = where.shape[0]
    newline = where < 0
    tower_image = torch.div(where, per_tower, rounding_mode="floor") - first_tower  # 0 thumbnail, c+1 crop c
    token = where % per_tower
    partition = torch.where(newline, OUTSIDE, (tower_image > 0).long())
    crop = torch.where(partition == 1, tower_image - 1, OUTSIDE)
    cell = torch.full((n, 2), OUTSIDE)
    base = partition == 0
    cell[base] = torch.stack([token[base] // side, token[base] % side], 1)
    hires = partition == 1
    grids = {0: (side, side)}
    if bool(hires.any()):
        # high-resolution rows end at newlines: row = newlines before the token, col = tokens since the last one
        first = int(hires.nonzero()[0])
        row = newline[first:].long().cumsum(0) - newline[first:].long()
        start_of_row = torch.zeros(n - first, dtype=torch.long)
        breaks = newline[first:].nonzero().squeeze(1) + 1
        start_of_row[breaks[breaks < n - first]] = breaks[breaks < n - first]
        start_of_row = start_of_row.cummax(0).values
        col = torch.arange(n - first) - start_of_row
        cell[first:][hires[first:]] = torch.stack([row, col], 1)[hires[first:]]
        grids[1] = (int(newline[first:].sum()), int((row == 0).sum()) - 1)
    return TokenLayout(partition=partition, cell=cell, crop=crop, newline=newline, grids=grids,
                       crop_layout=crop_layout if bool(hires.any()) else (0, 0))

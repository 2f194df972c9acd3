"""LLaVA-1.5 structure (``LlavaForConditionalGeneration``): one patch grid per image, CLS optionally kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import compat
from .base import Adapter, ImageBatch, TokenLayout


class LlavaAdapter(Adapter):
    model_class_names = ("LlavaForConditionalGeneration",)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> list[ImageBatch]:
        """Run the stock ``get_image_features`` and keep the projector's input as the vision-space features."""
        base = self.model.model
        with ProjectorInput(base.multi_modal_projector) as captured:
            feats = compat.image_features(base, pixel_values, **image_kwargs)
        features = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        vision_features = captured.value.reshape(*features.shape[:2], -1)

        strategy = image_kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        patch = self.model.config.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        num_images, num_tokens = features.shape[:2]
        tower_offset = 1 if strategy == "default" else 0  # the CLS column the features skip
        prefix = num_tokens - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"{num_tokens} visual tokens per image do not fill a {grid[0]}×{grid[1]} patch grid")
        tower_length = num_tokens + tower_offset
        source = torch.arange(num_images)[:, None] * tower_length + tower_offset + torch.arange(num_tokens)
        return [ImageBatch(
            features=features,
            vision_features=vision_features,
            layout=TokenLayout.single_grid(grid, prefix),
            source=source.to(features.device),
            tower_length=tower_length,
            project=base.multi_modal_projector,
        )]


class ProjectorInput:
    """Context manager keeping the input of the projector's forward (the vision-space features)."""

    def __init__(self, projector: nn.Module):
        self.projector = projector
        self.value: torch.Tensor | None = None

    def __enter__(self) -> "ProjectorInput":
        self._handle = self.projector.register_forward_pre_hook(self._store)
        return self

    def _store(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

"""LLaVA-1.5 structure (``LlavaForConditionalGeneration``): one patch grid per image, CLS optionally kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Adapter, ImageBatch


class LlavaAdapter(Adapter):
    model_class_names = ("LlavaForConditionalGeneration",)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def _tower(self) -> nn.Module:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_attention(self, layer: int) -> nn.Module:
        layers = self._tower.encoder.layers
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"vision layer {layer} out of range: the tower has {len(layers)} layers")
        return layers[layer].self_attn

    def num_vision_layers(self) -> int:
        return len(self._tower.encoder.layers)

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> ImageBatch:
        """Run the stock ``get_image_features`` and keep the projector's input as the vision-space features."""
        base = self.model.model
        captured: list[torch.Tensor] = []
        handle = base.multi_modal_projector.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
        try:
            out = base.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
        finally:
            handle.remove()
        feats = out.pooler_output
        features = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        vision_features = captured[0].reshape(*features.shape[:2], -1)

        strategy = image_kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        patch = self.model.config.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        tower_offset = 1 if strategy == "default" else 0
        prefix = features.shape[1] - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"{features.shape[1]} visual tokens per image do not fill a {grid[0]}×{grid[1]} patch grid")
        return ImageBatch(
            features=features,
            vision_features=vision_features,
            grid=grid,
            prefix=prefix,
            tower_offset=tower_offset,
            project=base.multi_modal_projector,
        )

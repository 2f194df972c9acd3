"""What a model family tells the stages: where the vision tower, projector and image placeholders are."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn


@dataclasses.dataclass
class ImageBatch:
    """Visual tokens of the images of one call, in the order their placeholders appear (flattened batch).

    features: ``[I, N, D]`` projected (LLM-space) tokens, exactly what the stock model would scatter.
    vision_features: ``[I, N, Dv]`` the same tokens before the projector.
    grid: ``(h, w)`` patch grid; ``prefix`` tokens (e.g. CLS under ``vision_feature_select_strategy="full"``)
    precede the ``h·w`` grid tokens in raster order. ``tower_offset``: index in the tower's token sequence of
    feature token 0 (1 when CLS is dropped), used to align attention columns with features.
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    grid: tuple[int, int]
    prefix: int
    tower_offset: int
    project: Callable[[torch.Tensor], torch.Tensor]


class Adapter:
    """Base class: one subclass per model family, registered in ``adapters/__init__.py``."""

    model_class_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def text_config(self) -> Any:
        raise NotImplementedError

    def vision_attention(self, layer: int) -> nn.Module:
        """The self-attention module of vision-tower layer ``layer`` (negative indices count from the end)."""
        raise NotImplementedError

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> ImageBatch:
        raise NotImplementedError

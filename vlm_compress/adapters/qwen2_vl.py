"""Qwen2-VL and Qwen2.5-VL structure (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Images and videos come at their own resolution: the processor cuts each into ``t×h×w`` patches (``t`` temporal
slices of two frames for a video, 1 for an image), the ViT runs all of a call's patches as one packed sequence,
and the merger turns every 2×2 patch group into one visual token, so an image gives ``h/2 × w/2`` tokens in raster
order and a video ``t`` such grids (its "frames" here), one placeholder each (``<|image_pad|>``/``<|video_pad|>``).
Each visual token is one :class:`~.base.ImageBatch` row entry whose tower quantities are the mean over its four
patches (``source_span = 4``); Qwen2.5-VL's ViT runs the groups in window order, undone after the merger, and
``source`` points into that order (:func:`vlm_compress.compat.merge_group_positions`). The vision-space features are
the merger's input, the four patches concatenated (``[4·Dv]``); ``project`` is the merger, so merging methods
average there, as they average before LLaVA's projector.

Positions (3-D M-RoPE): the stock model gives every visual token a (t, h, w) position and continues text after an
image at ``start + max(h, w)/2``. A compressed prompt keeps, for every token it keeps, that token's position in the
uncompressed prompt (``prompt_positions``), passed as explicit 4-row ``position_ids`` through the stock
``generate``; ``rope_deltas`` are set so that cached steps without position ids continue where the uncompressed
prompt would. Row 0 holds contiguous text positions (what ``generate`` builds itself).

The towers have no CLS token: CLS-based methods score with the attention each token receives, averaged over the
queries of its image or frame, computed in query blocks (:class:`vlm_compress.scoring.PackedAttentionCapture`).

Qwen3-VL is refused: its DeepStack features (ViT hidden states of several layers added to the first LLM layers
at every visual position) would have to be selected, merged and positioned with the kept tokens, which its
``mm_encoder_outputs`` path does not let us do consistently.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import nn

from .. import compat
from ..scoring import AttentionCapture, PackedAttentionCapture
from .base import Adapter, ImageBatch, TokenLayout, VideoBatch
from .llava import ProjectorInput

IMAGE_TYPE, VIDEO_TYPE = 1, 2  # mm_token_type_ids values of the stock processor


class Qwen2VLAdapter(Adapter):
    model_class_names = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    video = True
    native_resolution = True
    image_input_names = ("image_grid_thw",)
    video_input_names = ("video_grid_thw", "second_per_grid_ts")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def tower_has_cls(self) -> bool:
        return False

    @property
    def vision_feature_size(self) -> int:
        """The merger's input: ``m²`` patches of the ViT's width (Qwen2-VL: ``embed_dim``; Qwen2.5-VL: ``hidden_size``)."""
        config = self.model.config.vision_config
        width = getattr(config, "embed_dim", None) or config.hidden_size
        return width * self.merge * self.merge

    @property
    def merge(self) -> int:
        return self.vision_tower.spatial_merge_size

    def encoder_layers(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layer(layer).attn

    def capture(self, attention: dict[int, nn.Module], all_query_rows: bool,
                layers: dict[int, nn.Module]) -> AttentionCapture:
        return PackedAttentionCapture(attention, self.vision_tower, all_query_rows, layers)

    # -- features ------------------------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The merger on concatenated patch groups: ``[..., m²·Dv] → [..., D]``."""
        merger = self.vision_tower.merger
        dv = x.shape[-1] // (self.merge * self.merge)
        return merger(x.reshape(-1, dv)).view(*x.shape[:-1], -1)

    def _encode(self, features: Sequence[torch.Tensor], grids: torch.Tensor,
                merger_input: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], int]]:
        """Per image/video: (features [t, n, D], vision features [t, n, m²·Dv], source [t, n], grid, frames)."""
        m2 = self.merge * self.merge
        groups = merger_input.reshape(merger_input.shape[0] // m2, -1)  # [S/m², m²·Dv], block order
        block_position = compat.merge_group_positions(self.vision_tower, grids).to(groups.device)
        out, offset = [], 0
        for feats, (t, h, w) in zip(features, grids.tolist()):
            grid = (h // self.merge, w // self.merge)
            n = grid[0] * grid[1]
            where = block_position[offset: offset + t * n]
            out.append((feats.view(t, n, -1), groups[where].view(t, n, -1), (where * m2).view(t, n), grid, t))
            offset += t * n
        return out

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> list[ImageBatch]:
        """One single-grid :class:`ImageBatch` per image (grids differ with each image's resolution)."""
        grids = image_kwargs.get("image_grid_thw")
        if grids is None:
            raise ValueError("Qwen2-VL image inputs need image_grid_thw; pass everything the processor returns")
        base = self.model.model
        with ProjectorInput(self.vision_tower.merger) as captured:
            features = list(compat.image_features(base, pixel_values, image_grid_thw=grids))
        tower_length = captured.value.shape[0]
        return [ImageBatch(features=f, vision_features=v, layout=TokenLayout.single_grid(grid), source=s,
                           tower_length=tower_length, project=self._project, source_span=self.merge ** 2)
                for f, v, s, grid, _ in self._encode(features, grids, captured.value)]

    def encode_videos(self, pixel_values_videos: torch.Tensor, **video_kwargs: Any) -> list[VideoBatch]:
        """One :class:`VideoBatch` per video: its ``t`` temporal slices as frames, no suffix."""
        grids = video_kwargs.get("video_grid_thw")
        if grids is None:
            raise ValueError("Qwen2-VL video inputs need video_grid_thw; pass everything the processor returns")
        base = self.model.model
        with ProjectorInput(self.vision_tower.merger) as captured:
            features = list(compat.video_features(base, pixel_values_videos, video_grid_thw=grids))
        tower_length = captured.value.shape[0]
        videos, start = [], 0
        for (f, v, s, grid, t), thw in zip(self._encode(features, grids, captured.value), grids):
            patches = t * grid[0] * grid[1] * self.merge ** 2
            frames = pixel_values_videos[start: start + patches].view(t, patches // t, -1)  # [t, h·w, C·T·p²]
            videos.append(VideoBatch(
                frames=ImageBatch(features=f, vision_features=v, layout=TokenLayout.single_grid(grid), source=s,
                                  tower_length=tower_length, project=self._project, source_span=self.merge ** 2),
                suffix=f.new_zeros(0, f.shape[-1]),
                pixel_values=frames,
                frame_inputs=functools.partial(self._one_frame_videos, frames, thw),
            ))
            start += patches
        return videos

    def _one_frame_videos(self, frames: torch.Tensor, grid_thw: torch.Tensor, start: int, stop: int,
                          input_ids: torch.Tensor) -> dict[str, Any]:
        """Temporal slices ``start:stop`` of one video (patches ``[t, h·w, C·T·p²]``) as one-slice videos."""
        one = grid_thw.clone()
        one[0] = 1
        return {"pixel_values_videos": frames[start:stop].flatten(0, 1),
                "video_grid_thw": one[None].expand(stop - start, -1).contiguous(),
                "mm_token_type_ids": self.token_types(input_ids)}

    def encoded_inputs(self, images: Sequence[torch.Tensor], videos: Sequence[torch.Tensor]) -> dict[str, Any]:
        return compat.encoded_media(images, videos, videos_as_list=True)

    # -- positions -----------------------------------------------------------------------------------------------
    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` the processor's ``mm_token_type_ids``: 0 text, 1 image, 2 video placeholders."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        types[input_ids == self.image_token_id] = IMAGE_TYPE
        types[input_ids == self.video_token_id] = VIDEO_TYPE
        return types

    def prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         media: dict[str, Any]) -> torch.Tensor:
        """``[3, B, L]`` the stock M-RoPE positions of the uncompressed prompt (``get_rope_index``)."""
        grids = {k: media.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        positions, _ = compat.rope_index(self.model.model, input_ids, self.token_types(input_ids), attention_mask,
                                         **grids)
        return positions

    def prompt_rewritten(self, position_ids: torch.Tensor | None, attention_mask: torch.Tensor) -> None:
        if position_ids is None:
            return
        last = position_ids[1:].masked_fill(attention_mask[None] == 0, -1).amax(dim=(0, 2))  # [B]
        compat.set_rope_deltas(self.model.model, (last + 1 - attention_mask.sum(dim=1)).unsqueeze(1))

    def step_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """4-row position ids of a cached step: text positions, then the three M-RoPE rows shifted by the deltas."""
        deltas = compat.rope_deltas(self.model.model)
        shifted = positions if deltas is None else positions + deltas.to(positions.device)
        return torch.stack([positions, shifted, shifted, shifted])

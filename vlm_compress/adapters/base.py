"""What a model family tells the stages: where the vision tower, projector and image placeholders are, and how
each image's visual tokens are laid out (one grid; or a thumbnail, crops and newlines)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

from ..scoring import AttentionCapture

OUTSIDE = -1  # partition/cell/crop value of tokens outside any grid (CLS prefix, newline)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each of an image's ``N`` visual tokens sits; shared by all images of an :class:`ImageBatch`.

    partition: ``[N]`` 0 for the base grid (LLaVA-1.5's only grid, LLaVA-NeXT's thumbnail), 1 for the
        high-resolution grid tiled from crops (LLaVA-NeXT, unpadded), -1 outside any grid (CLS prefix, newline).
    cell: ``[N, 2]`` (row, col) in the token's partition grid; -1 outside.
    crop: ``[N]`` index of the crop a high-resolution token comes from (row-major over ``crop_layout``); -1 otherwise.
    newline: ``[N]`` bool, LLaVA-NeXT's ``image_newline`` tokens (one after each high-resolution row).
    grids: ``{partition: (rows, cols)}``. crop_layout: crops as (rows, cols); ``(0, 0)`` without AnyRes.
    """

    partition: torch.Tensor
    cell: torch.Tensor
    crop: torch.Tensor
    newline: torch.Tensor
    grids: dict[int, tuple[int, int]]
    crop_layout: tuple[int, int] = (0, 0)

    @classmethod
    def single_grid(cls, grid: tuple[int, int], prefix: int = 0) -> "TokenLayout":
        """``prefix`` tokens outside the grid, then an ``h×w`` grid in raster order (LLaVA-1.5)."""
        h, w = grid
        rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
        outside = torch.full((prefix,), OUTSIDE)
        return cls(
            partition=torch.cat([outside, torch.zeros(h * w, dtype=torch.long)]),
            cell=torch.cat([torch.full((prefix, 2), OUTSIDE), torch.stack([rows, cols], 1)]),
            crop=torch.full((prefix + h * w,), OUTSIDE),
            newline=torch.zeros(prefix + h * w, dtype=torch.bool),
            grids={0: (h, w)},
        )

    @property
    def num_tokens(self) -> int:
        return self.partition.shape[0]

    @property
    def num_newlines(self) -> int:
        return int(self.newline.sum())

    @property
    def is_anyres(self) -> bool:
        return 1 in self.grids

    def tokens_of(self, partition: int) -> torch.Tensor:
        """``[n_p]`` token indices of ``partition`` in raster order of its grid."""
        index = (self.partition == partition).nonzero().squeeze(1)
        cols = self.grids[partition][1]
        order = (self.cell[index, 0] * cols + self.cell[index, 1]).argsort()
        return index[order]

    def sub_images(self) -> list[torch.Tensor]:
        """Ascending token indices of each part selected on its own by per-sub-image methods (VisionZip, CDPruner),
        newlines excluded: under AnyRes any prefix outside the grids, the thumbnail, then each crop (row-major; a crop
        of padding only is absent); otherwise all the image's tokens as one part."""
        content = (~self.newline).nonzero().squeeze(1)
        if not self.is_anyres:
            return [content]
        key = self.partition[content] * (int(self.crop.max()) + 2) + self.crop[content]
        return [content[key == value] for value in torch.unique(key).tolist()]

    def crop_extents(self) -> dict[int, tuple[int, int, int, int]]:
        """``{crop: (row0, row1, col0, col1)}``: the half-open block of the unpadded high-resolution grid each crop
        covers (edge crops lose what unpadding removed; a crop of padding only is absent)."""
        out = {}
        for c in self.crop.unique().tolist():
            if c == OUTSIDE:
                continue
            cells = self.cell[self.crop == c]
            out[c] = (int(cells[:, 0].min()), int(cells[:, 0].max()) + 1, int(cells[:, 1].min()), int(cells[:, 1].max()) + 1)
        return out

    def key(self) -> Hashable:
        """Images whose layouts have equal keys have identical layouts (the stage batches them together)."""
        return self.num_tokens, tuple(sorted(self.grids.items())), self.crop_layout, self.num_newlines


@dataclasses.dataclass
class ImageBatch:
    """Visual tokens of ``I`` images that share one :class:`TokenLayout`, in placeholder order.

    features: ``[I, N, D]`` projected (LLM-space) tokens, exactly what the stock model would scatter.
    vision_features: ``[I, N, Dv]`` the same tokens before the projector (zeros where there is none: newlines).
    source: ``[I, N]`` index of each token in the tower's flattened output ``[tower_images · T]`` (CLS included),
        so attention columns can be read for it; -1 for tokens the tower did not produce (newlines). For pooled
        tokens (``pooled_from``), the tower token at the top-left of the token's window.
    tower_length: ``T``, tokens per tower image (CLS included).
    project: the projector, ``[..., Dv] → [..., D]``.
    pooled_from: the tower's ``(h, w)`` patch grid when the model bilinearly pooled it down to ``grid`` (OneVision's
        video frames, ``apply_pooling``); per-token tower quantities (scores, keys, hidden states) are then pooled
        the same way rather than read at ``source``. ``None``: tokens map one-to-one to tower tokens.
    source_span: tower tokens behind each visual token: ``source_span`` consecutive ones from ``source`` (Qwen2-VL's
        2×2 patch merger: 4); per-token tower quantities are their mean. The tokens then sit on their own merged
        grid (``layout.cell``), one tower image per row (``tower_length`` is the whole packed tower sequence).
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    layout: TokenLayout
    source: torch.Tensor
    tower_length: int
    project: Callable[[torch.Tensor], torch.Tensor]
    pooled_from: tuple[int, int] | None = None
    source_span: int = 1

    @property
    def num_images(self) -> int:
        return self.features.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """The base grid (LLaVA-1.5's grid, LLaVA-NeXT's thumbnail)."""
        return self.layout.grids[0]

    def rows(self, index: Sequence[int]) -> "ImageBatch":
        index = list(index)
        return dataclasses.replace(
            self, features=self.features[index], vision_features=self.vision_features[index], source=self.source[index]
        )

    @staticmethod
    def cat(batches: Sequence["ImageBatch"]) -> "ImageBatch":
        """Stack batches that share a layout (equal :meth:`TokenLayout.key`)."""
        first = batches[0]
        return dataclasses.replace(
            first,
            features=torch.cat([b.features for b in batches]),
            vision_features=torch.cat([b.vision_features for b in batches]),
            source=torch.cat([b.source for b in batches]),
        )


@dataclasses.dataclass
class VideoBatch:
    """One video of a call: its frames as images of one layout, and the tokens the model adds around them.

    frames: ``[F, n, D]`` frame tokens (an :class:`ImageBatch`, one row per frame, in temporal order).
    suffix: ``[s, D]`` tokens after the last frame (OneVision: one ``image_newline``), kept as they are.
    pixel_values: ``[F, C, H, W]`` the frames as the processor gave them (what frame scorers such as QuoTA read).
    The video's placeholders hold ``F·n + s`` tokens: frame 0's, frame 1's, ..., then the suffix.
    frame_inputs: ``(start, stop, input_ids [b, L]) → forward keywords`` showing frames ``start:stop`` to the model as
        ``b = stop − start`` one-frame videos (scoring passes such as QuoTA's); ``None``: ``pixel_values_videos`` of
        ``pixel_values[start:stop, None]`` (OneVision's layout).
    """

    frames: ImageBatch
    suffix: torch.Tensor
    pixel_values: torch.Tensor
    frame_inputs: Callable[[int, int, torch.Tensor], dict[str, Any]] | None = None

    def one_frame_videos(self, start: int, stop: int, input_ids: torch.Tensor) -> dict[str, Any]:
        """Forward keywords for frames ``start:stop`` as one-frame videos (see ``frame_inputs``)."""
        if self.frame_inputs is not None:
            return self.frame_inputs(start, stop, input_ids)
        return {"pixel_values_videos": self.pixel_values[start:stop, None]}

    @property
    def num_frames(self) -> int:
        return self.frames.num_images

    @property
    def num_tokens(self) -> int:
        return self.frames.num_images * self.frames.layout.num_tokens + self.suffix.shape[0]


def attention_of(block: nn.Module) -> nn.Module | None:
    """The first submodule of a transformer block with ``q_proj`` and ``k_proj``, or a fused ``qkv_proj`` (vLLM's
    towers), as its self-attention."""
    for module in block.modules():
        if module is not block and ((hasattr(module, "q_proj") and hasattr(module, "k_proj"))
                                    or hasattr(module, "qkv_proj")):
            return module
    return None


def find_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a vision tower, found by structure rather than one family's attribute names: the
    longest ``ModuleList`` whose every block holds a self-attention with ``q_proj``/``k_proj`` projections (CLIP's
    ``vision_model.encoder.layers``, SigLIP's, ...). The score hooks read those projections."""
    best = None
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(attention_of(b) is not None for b in module):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise TypeError(
            f"cannot find the transformer blocks of the vision tower {type(tower).__name__}: no list of blocks with "
            "q_proj/k_proj attention projections (the score hooks need them)"
        )
    return best


def has_class_token(tower: nn.Module) -> bool:
    """Whether the tower prepends a CLS token (CLIP's ``class_embedding``); SigLIP has none."""
    return any(name.split(".")[-1] in ("class_embedding", "cls_token") for name, _ in tower.named_parameters())


class Adapter:
    """Base class: one subclass per model family, registered in ``adapters/__init__.py``."""

    model_class_names: tuple[str, ...] = ()
    anyres: bool = False  # images come as thumbnail + crops + newlines (LLaVA-NeXT)
    video: bool = False  # takes videos (``pixel_values_videos``; OneVision)
    native_resolution: bool = False  # each image is one grid at its own resolution, no thumbnail (Qwen2-VL)
    # processor outputs that describe the images / videos (passed to encode_*, dropped after compression)
    image_input_names: tuple[str, ...] = ("image_sizes", "batch_num_images", "vision_aspect_ratio")
    video_input_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def text_config(self) -> Any:
        raise NotImplementedError

    def decoder_layers(self) -> Sequence[nn.Module]:
        """The LLM's decoder layers, in order (where the in-LLM stage wraps its per-layer plans)."""
        layers = getattr(getattr(self.model.model, "language_model", None), "layers", None)
        if layers is None:
            raise TypeError(f"cannot find the decoder layers of {type(self.model).__name__}.model.language_model")
        return layers

    def final_norm(self) -> nn.Module:
        """The LLM's final norm, between its last decoder layer and the LM head (``language_model.norm``: the
        attribute every transformers 5.x text model of the supported families uses; DART reads hidden states
        through it)."""
        norm = getattr(getattr(self.model.model, "language_model", None), "norm", None)
        if norm is None:
            raise TypeError(f"cannot find the final norm of {type(self.model).__name__}.model.language_model")
        return norm

    @property
    def video_token_id(self) -> int | None:
        return None

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids of every visual modality (image, video)."""
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: image or video placeholders."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.visual_token_ids:
            mask |= input_ids == token
        return mask

    def images_per_sample(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] images and videos in each prompt: runs of consecutive placeholders of one kind."""
        total = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        for token in self.visual_token_ids:
            visual = input_ids == token
            total += (visual[:, 1:] & ~visual[:, :-1]).sum(dim=1) + visual[:, 0].long()
        return total

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_feature_size(self) -> int:
        """``Dv``: the width of :attr:`ImageBatch.vision_features` (the projector's input)."""
        return self.model.config.vision_config.hidden_size

    @property
    def tower_has_cls(self) -> bool:
        """Whether the tower's first token is a CLS (else CLS-based scores use the documented substitute,
        :meth:`vlm_compress.scoring.AttentionCapture.first_row_attention`)."""
        return has_class_token(self.vision_tower)

    def encoder_layers(self) -> nn.ModuleList:
        return find_encoder_layers(self.vision_tower)

    def num_vision_layers(self) -> int:
        return len(self.encoder_layers())

    def vision_layer(self, layer: int) -> nn.Module:
        """Encoder layer ``layer`` of the vision tower (negative indices count from the end)."""
        layers = self.encoder_layers()
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"vision layer {layer} out of range: the tower has {len(layers)} layers")
        return layers[layer]

    def vision_attention(self, layer: int) -> nn.Module:
        """The self-attention module of vision-tower layer ``layer`` (negative indices count from the end)."""
        return attention_of(self.vision_layer(layer))

    def capture(self, attention: dict[int, nn.Module], all_query_rows: bool,
                layers: dict[int, nn.Module]) -> AttentionCapture:
        """The score hooks for one tower forward (:class:`~vlm_compress.scoring.AttentionCapture`)."""
        if "_has_cls" not in self.__dict__:  # walks the tower's parameters: once, not per call
            self.__dict__["_has_cls"] = self.tower_has_cls
        return AttentionCapture(attention, all_query_rows, layers, has_cls=self.__dict__["_has_cls"])

    def prompt_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         media: dict[str, Any]) -> torch.Tensor | None:
        """``[R, B, L]`` position ids of the *uncompressed* prompt that compressed prompts must keep per token
        (``R = 3``: Qwen2-VL's M-RoPE rows), or ``None`` where positions are simply contiguous (LLaVA)."""
        return None

    def encoded_inputs(self, images: Sequence[torch.Tensor], videos: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Forward keywords that fill the placeholders with these features (per image / per video ``[k, D]``)."""
        from .. import compat

        return compat.encoded_media(images, videos)

    def prompt_rewritten(self, position_ids: torch.Tensor | None, attention_mask: torch.Tensor) -> None:
        """Called after a prompt was shortened, with its new ``position_ids`` (model state that later cached steps
        read, such as Qwen2-VL's ``rope_deltas``, is set here)."""

    def step_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids for a cached step at sequence indices ``positions`` [B, n] when the caller gave none."""
        return positions

    def encode_images(self, pixel_values: torch.Tensor, **image_kwargs: Any) -> list[ImageBatch]:
        """The images of one call as batches of equal layout; images in placeholder order when concatenated."""
        raise NotImplementedError

    def encode_videos(self, pixel_values_videos: torch.Tensor, **video_kwargs: Any) -> list[VideoBatch]:
        """The videos of one call, in placeholder order."""
        raise TypeError(f"{type(self.model).__name__} takes no videos")

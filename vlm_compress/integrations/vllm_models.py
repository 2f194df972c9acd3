"""vLLM model classes of the plugin (imported by vLLM through :func:`vlm_compress.integrations.vllm.register`).

Subclasses of vLLM's ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration`` (vLLM 0.32) whose
image path runs the tower with the toolkit's score hooks (:class:`~vlm_compress.scoring.AttentionCapture` reads the
fused ``qkv_proj`` of vLLM's CLIP attention), builds the same :class:`~vlm_compress.pruners.base.EncoderContext` as
the HF encoder stage and calls the method's own ``select``; the processing infos size each image's placeholders
with :func:`~vlm_compress.pruners.base.kept_count`, and the encoder asserts it returned exactly that many tokens.

Deliberate differences from the HF path: the tower is built only as deep as the feature layer or the deepest layer
the method scores (vLLM truncates it at the feature layer); ``image_index_in_prompt`` is 0 for every image (vLLM's
encoder does not know an image's rank in its prompt; it only seeds ``random``, so multi-image prompts draw other
random selections than HF); image embeddings passed instead of pixels are refused (nothing to score).
``VLM_COMPRESS_VLLM_TRACE=FILE`` appends one JSON line per image (kept indices, counts) for checks and debugging.
"""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import torch
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.base import OUTSIDE, ImageBatch, TokenLayout, attention_of, find_encoder_layers, has_class_token
from ..adapters.llava_next import anyres_layout
from ..pruners.base import EncoderContext, EncoderPruner, kept_count
from ..scoring import AttentionCapture
from .vllm import CONFIG_KEY, pruner_from_spec

# checkpoints saved by recent transformers name the tower `vision_tower.*`; vLLM 0.32 loads `vision_tower.vision_model.*`
_TOWER_KEYS = WeightsMapper(orig_to_new_regex={
    re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model.",
})


def _pruner(config) -> EncoderPruner:
    spec = getattr(config, CONFIG_KEY, None)
    if spec is None:
        raise ValueError(f"the vlm-compress vLLM architectures need a {CONFIG_KEY!r} entry in the model config: "
                         f"LLM(model=path, hf_overrides=vlm_compress.integrations.vllm.vllm_overrides(path, 'cls_attn', "
                         f"0.2)) or `vlm-compress export-vllm SRC DST --method cls_attn --budget 0.2`")
    return pruner_from_spec(spec)


def _single_layout(config, image_width: int, image_height: int) -> TokenLayout:
    """LLaVA-1.5: one patch grid, after the CLS when the feature strategy keeps it (``"full"``)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return TokenLayout.single_grid((side, side), 1 if config.vision_feature_select_strategy == "full" else 0)


def _anyres_where(config, image_height: int, image_width: int, first: int = 0) -> torch.Tensor:
    """``[N]`` for each packed LLaVA-NeXT token, the flat index of the tower token it came from (``-1``: newline),
    towers numbered from ``first``: vLLM's own packing (``_merge_image_patch_embeddings``) run on index values."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = get_anyres_image_grid_shape((image_height, image_width), config.image_grid_pinpoints, vision.image_size)
    towers = 1 + rows * cols
    index = (first * side * side + torch.arange(towers * side * side, dtype=torch.float64)).view(towers, side * side, 1)
    packer = SimpleNamespace(config=config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
    packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        packer, torch.tensor([image_height, image_width]), index, strategy="spatial_unpad")
    return packed[:, 0].long()


def _anyres_layout(config, image_width: int, image_height: int) -> TokenLayout:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    crops = tuple(get_anyres_image_grid_shape((image_height, image_width), config.image_grid_pinpoints,
                                              vision.image_size))
    return anyres_layout(_anyres_where(config, image_height, image_width), side * side, 0, side, crops)


class _KeptCounts:
    """Processing-info mix-in: each image's placeholders are the method's kept count for its layout."""

    layout_of = None  # (config, width, height) -> TokenLayout

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        layout = type(self).layout_of(config, image_width, image_height)
        if layout.num_tokens != full:
            raise RuntimeError(f"vlm-compress derived {layout.num_tokens} visual tokens for a {image_width}×"
                               f"{image_height} image where vLLM counts {full}; please report this")
        return kept_count(_pruner(config), layout)


class VlmCompressLlavaProcessingInfo(_KeptCounts, LlavaProcessingInfo):
    layout_of = staticmethod(_single_layout)


class VlmCompressLlavaNextProcessingInfo(_KeptCounts, LlavaNextProcessingInfo):
    layout_of = staticmethod(_anyres_layout)


class _Compressing:
    """Model mix-in: the tower (deep enough for the method's layers), score hooks, ``select``, count checks."""

    def _setup_compression(self, vllm_config, prefix: str) -> None:
        config = self.config
        self.pruner = _pruner(config)
        if self.pruner.requires_anyres and not isinstance(self, LlavaNextForConditionalGeneration):
            raise ValueError(f"{self.pruner.name!r} needs AnyRes images (thumbnail + crops), which LLaVA-1.5 does not "
                             f"have; serve a LLaVA-NeXT checkpoint, or pick a single-grid method such as 'cls_attn'")
        total = config.vision_config.num_hidden_layers
        wanted = [*self.pruner.attention_layers(), *self.pruner.hidden_state_layers(), config.vision_feature_layer]
        depth = max((layer % total) + 1 for layer in wanted)
        if depth > len(find_encoder_layers(self.vision_tower)):
            with self._mark_tower_model(vllm_config, "image"):
                self.vision_tower = CLIPVisionModel(config.vision_config, quant_config=vllm_config.quant_config,
                                                    num_hidden_layers_override=depth, require_post_norm=False,
                                                    prefix=maybe_prefix(prefix, "vision_tower"))
        blocks = find_encoder_layers(self.vision_tower)
        self._attention = {layer: attention_of(blocks[layer % total]) for layer in self.pruner.attention_layers()}
        self._blocks = {layer: blocks[layer % total] for layer in self.pruner.hidden_state_layers()}
        self._has_cls = has_class_token(self.vision_tower)
        self._trace = os.environ.get("VLM_COMPRESS_VLLM_TRACE")

    def _capture(self) -> AttentionCapture:
        return AttentionCapture(self._attention, self.pruner.needs_all_query_rows(), self._blocks,
                                has_cls=self._has_cls)

    def _tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, T', Dv]`` the feature layer's tokens (the strategy's selection applied)."""
        return self.vision_tower(pixel_values, select_layers=[self.config.vision_feature_layer],
                                 feature_select_strategy=self.config.vision_feature_select_strategy)

    def _select(self, images: ImageBatch, capture: AttentionCapture) -> list[torch.Tensor]:
        """The method's ``select`` on ``images`` (one layout), exactly :func:`kept_count` tokens each."""
        count = kept_count(self.pruner, images.layout)
        ctx = EncoderContext(images=images, keep=[count] * images.num_images,
                             image_index_in_prompt=[0] * images.num_images, capture=capture)
        chosen = self.pruner.select(ctx)
        for features, index in zip(chosen.features, chosen.kept_index):
            if features.shape[0] != count:
                raise RuntimeError(f"{self.pruner.name} returned {features.shape[0]} tokens where the prompt holds "
                                   f"{count} placeholders")
            if self._trace:
                with open(self._trace, "a") as out:
                    out.write(json.dumps({"method": self.pruner.name, "budget": self.pruner.budget,
                                          "num_tokens": images.layout.num_tokens, "count": count,
                                          "kept_index": index.tolist()}) + "\n")
        return list(chosen.features)

    @staticmethod
    def _refuse_embeddings() -> None:
        raise ValueError("vlm-compress cannot compress precomputed image embeddings (there is nothing to score); "
                         "pass images, or serve the model without the plugin")


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=VlmCompressLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VlmCompressLlavaForConditionalGeneration(_Compressing, LlavaForConditionalGeneration):
    hf_to_vllm_mapper = _TOWER_KEYS | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._setup_compression(vllm_config, prefix)

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            self._refuse_embeddings()
        pixel_values = image_input["pixel_values"]
        capture = self._capture()
        with capture:
            vision = self._tower(pixel_values)  # [I, N(+CLS), Dv]
        features = self.multi_modal_projector(vision)
        num_images, num_tokens = features.shape[:2]
        layout = _single_layout(self.config, 0, 0)
        offset = 0 if layout.num_tokens > layout.grids[0][0] * layout.grids[0][1] else 1  # the CLS the features skip
        tower_length = num_tokens + offset
        source = torch.arange(num_images)[:, None] * tower_length + offset + torch.arange(num_tokens)
        images = ImageBatch(features=features, vision_features=vision, layout=layout,
                            source=source.to(features.device), tower_length=tower_length,
                            project=self.multi_modal_projector)
        return tuple(self._select(images, capture))


@MULTIMODAL_REGISTRY.register_processor(LlavaNextMultiModalProcessor, info=VlmCompressLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VlmCompressLlavaNextForConditionalGeneration(_Compressing, LlavaNextForConditionalGeneration):
    hf_to_vllm_mapper = _TOWER_KEYS | LlavaNextForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.config.vision_feature_select_strategy != "default" or self.select_layers is not None:
            raise ValueError("the vlm-compress LLaVA-NeXT model supports vision_feature_select_strategy='default' "
                             "with one feature layer")
        self._setup_compression(vllm_config, prefix)

    def _process_image_input(self, image_input):
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            self._refuse_embeddings()
        pixel_values = image_input["pixel_values"]
        per_image = list(pixel_values.unbind(0)) if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
        sizes = image_input.get("image_sizes")
        if sizes is None:
            side = self.config.vision_config.image_size
            sizes = torch.as_tensor([[side, side]] * len(per_image))
        towers = [p.shape[0] for p in per_image]
        capture = self._capture()
        with capture:
            vision = self._tower(torch.cat(per_image))  # [sum towers, side², Dv]
        projected = self.multi_modal_projector(vision)
        per_tower = vision.shape[1]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        vision_flat = vision.flatten(0, 1)
        out, first = [], 0
        for i, n in enumerate(towers):
            height, width = (int(v) for v in sizes[i].tolist())
            rows, cols = get_anyres_image_grid_shape((height, width), self.config.image_grid_pinpoints,
                                                     self.config.vision_config.image_size)
            features = self._merge_image_patch_embeddings(sizes[i], projected[first: first + n],
                                                          strategy="spatial_unpad")
            where = _anyres_where(self.config, height, width, first).to(features.device)
            layout = anyres_layout(where, per_tower, first, side, (rows, cols))
            source = torch.where(where >= 0, (where // per_tower) * (per_tower + 1) + 1 + where % per_tower,
                                 torch.full_like(where, OUTSIDE))
            vision_features = vision_flat[where.clamp_min(0)] * (where >= 0)[:, None].to(vision_flat.dtype)
            images = ImageBatch(features=features[None], vision_features=vision_features[None], layout=layout,
                                source=source[None], tower_length=per_tower + 1, project=self.multi_modal_projector)
            out.extend(self._select(images, capture))
            first += n  # n counts any batch-padding towers, which the packing ignores
        return out

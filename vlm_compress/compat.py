"""The one door to transformers internals that change between versions.

Every place in vlm-compress that depends on how transformers names or shapes something *inside* a model (rather
than its public ``from_pretrained`` / ``generate`` surface) goes through this module, so that a new transformers
release is fixed here and nowhere else. Each entry says which versions differ and how. The range CI tests is
``TESTED_RANGE`` (also in ``pyproject.toml``); ``make check-latest`` runs the suite on the newest releases.

Entries (dated by the transformers release that changed them):

* **Cache argument name** (5.24.0, 2026-11): models and decoder layers take ``cache=``; before, ``past_key_values=``
  (the old name is still accepted, deprecated until 5.40). Outputs carry ``.cache`` (``.past_key_values`` is a
  deprecated alias from 5.24). :func:`cache_of_call`, :func:`cache_of_output`.
* **Cache layers** (5.x): a ``Cache`` holds ``cache.layers[i]`` with ``keys`` / ``values`` tensors
  ``[B, H_kv, T, hd]``; ``get_seq_length()`` is layer 0's length. 5.24 dropped the layer's ``dtype`` attribute (read
  the tensors' dtype instead). Static caches preallocate ``max_cache_len`` slots and cannot be re-shaped per layer.
  :func:`layer_keys`, :func:`replace_layer_entries`, :func:`cache_length`, :func:`is_static_cache`.
* **Pre-encoded images** (5.18.0): ``generate()`` calls ``model.model.get_image_features`` once and passes the
  result to forward as ``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[...])}``; forward
  accepts the same keyword from a caller. Before 5.18 neither existed (this is the floor). ``get_image_features``
  returns a ``BaseModelOutputWithPooling`` with ``return_dict=True`` (per-image features in ``pooler_output``).
  :data:`MM_ENCODER_OUTPUTS`, :func:`encoded_images`, :func:`image_features`.
* **AnyRes packing** (5.x): LLaVA-NeXT's ``pack_image_features(features, image_sizes, strategy, image_newline=)``
  returns ``(packed per image, lengths)``. :func:`pack_anyres`.
* **Gradient checkpointing of a layer** (5.x): ``gradient_checkpointing_enable()`` (``activation_checkpointing_enable``
  from 5.24) sets ``layer.gradient_checkpointing = True`` and ``layer._gradient_checkpointing_func`` on each
  ``GradientCheckpointingLayer``; 5.18–5.23 check the flag in the layer's ``__call__``, 5.24 in its class
  ``forward``. :func:`layer_checkpointing`, :func:`set_layer_checkpointing`.
* **Generation options** (5.x): ``cache_implementation`` is a ``generate`` keyword or a ``generation_config`` field
  (``"static"`` preallocates). :func:`requests_static_cache`.
* **Decoder-layer keywords** (5.x): a decoder layer (and its attention) receives ``position_embeddings=(cos, sin)``
  and a prepared ``attention_mask`` by keyword; Llama's ``apply_rotary_pos_emb`` applies the tables.
  :func:`rotary_tables`, :func:`with_rotary_tables`, :func:`apply_rotary_pos_emb`.
* **AnyRes helpers** (5.x): ``get_anyres_image_grid_shape`` and ``image_size_to_num_patches`` live in
  ``models.llava_next.modeling_llava_next``. :func:`anyres_helpers`.
* **Qwen2-VL / Qwen2.5-VL M-RoPE** (5.18–5.24): ``model.model.get_rope_index(input_ids, mm_token_type_ids,
  image_grid_thw=, video_grid_thw=, [second_per_grid_ts=,] attention_mask=)`` gives ``(positions [3, B, L], deltas
  [B, 1])``; the text rotary embedding mixes the three rows by ``mrope_section`` *before* the decoder layers, which
  receive ordinary ``(cos, sin)`` ``[B, S, hd]`` and row 0 of 4-row ``position_ids`` as text positions.
  ``model.model.rope_deltas`` positions later cached steps that come without position ids. Qwen2.5-VL's ViT
  permutes 2×2 merge groups into windows (``vision_utils.get_vision_window_index``) and un-permutes after the merger.
  :func:`rope_index`, :func:`set_rope_deltas`, :func:`rope_deltas`, :func:`merge_group_positions`.
* **PIL image processors** (5.x): the torchvision-free processors are ``CLIPImageProcessorPil`` and
  ``LlavaNextImageProcessorPil`` in ``image_processing_pil_*`` modules. :func:`pil_image_processor`.
"""

from __future__ import annotations

from typing import Any, Sequence

import importlib.metadata

import torch
from packaging.version import Version

# from the installed metadata, so importing vlm_compress does not import transformers
TRANSFORMERS_VERSION = Version(importlib.metadata.version("transformers").split("+")[0])
TESTED_RANGE = ("5.18.0", "5.24.0")  # the oldest and newest transformers CI runs the suite on (pyproject.toml)

# -- the cache argument --------------------------------------------------------------------------------------
CACHE_ARGUMENT = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0") else "past_key_values"
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the new name first; callers may pass either on 5.24+


def cache_of_call(kwargs: dict[str, Any]) -> Any:
    """The ``Cache`` passed to a model's or a decoder layer's forward under either name (``None`` if none).

    5.24+ calls layers with ``cache=``; 5.18–5.23 with ``past_key_values=``; a user may pass either to the model.
    """
    for name in CACHE_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_of_output(output: Any) -> Any:
    """The ``Cache`` a model output carries: ``.cache`` on 5.24+, ``.past_key_values`` before (no deprecation
    warning is triggered on 5.24+)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return getattr(output, "past_key_values", None)


# -- cache layers --------------------------------------------------------------------------------------------
def cache_length(cache: Any) -> int:
    """Tokens already in ``cache`` (layer 0's length; 0 for ``None`` or an empty cache)."""
    return int(cache.get_seq_length()) if cache is not None else 0


def has_layer_entries(cache: Any) -> bool:
    """Whether ``cache`` exposes per-layer ``keys``/``values`` tensors (``DynamicCache`` and friends)."""
    return getattr(cache, "layers", None) is not None


def layer_keys(cache: Any, layer: int) -> torch.Tensor:
    """Keys cached by decoder layer ``layer``, RoPE applied: [B, H_kv, T_l, hd]."""
    return cache.layers[layer].keys


def replace_layer_entries(cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace layer ``layer``'s cached keys and values (any length: the per-layer engine re-shapes caches)."""
    entry = cache.layers[layer]
    entry.keys, entry.values = keys, values


def layer_entries(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of decoder layer ``layer``: [B, H_kv, T_l, hd] each."""
    entry = cache.layers[layer]
    return entry.keys, entry.values


def is_static_cache(cache: Any) -> bool:
    """A preallocated cache (``StaticCache`` or its layers), whose slots cannot be dropped per layer."""
    from transformers import cache_utils

    static_types = tuple(
        getattr(cache_utils, name) for name in ("StaticCache", "StaticLayer") if hasattr(cache_utils, name)
    )
    if isinstance(cache, static_types):
        return True
    return any(isinstance(layer, static_types) for layer in getattr(cache, "layers", None) or ())


# -- pre-encoded images --------------------------------------------------------------------------------------
MM_ENCODER_OUTPUTS = "mm_encoder_outputs"


def encoded_images(features: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Forward/generate keywords that make the model scatter ``features`` (per image ``[k_i, D]``) into its image
    placeholders instead of running the vision tower: ``{"mm_encoder_outputs": {"image": ...}}``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {MM_ENCODER_OUTPUTS: {"image": BaseModelOutputWithPooling(pooler_output=list(features))}}


def encoded_media(images: Sequence[torch.Tensor], videos: Sequence[torch.Tensor],
                  videos_as_list: bool = False) -> dict[str, Any]:
    """Like :func:`encoded_images` for images (per image ``[k_i, D]``) and videos (per video ``[k_v, D]``), either
    possibly empty. OneVision (5.18–5.24) flattens the video output's first two dims, so all videos go in one row;
    Qwen2-VL concatenates a list of per-video tensors (``videos_as_list``)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = encoded_images(images)[MM_ENCODER_OUTPUTS] if len(images) else {}
    if len(videos):
        pooled = list(videos) if videos_as_list else torch.cat(list(videos))[None]
        out["video"] = BaseModelOutputWithPooling(pooler_output=pooled)
    return {MM_ENCODER_OUTPUTS: out}


def video_features(base_model: Any, pixel_values_videos: torch.Tensor, **video_kwargs: Any) -> torch.Tensor:
    """The stock video features of ``base_model``: ``[B, F·n + 1, D]`` (OneVision: pooled frames, one newline);
    Qwen2-VL: per video ``[t·h·w/4, D]``."""
    out = base_model.get_video_features(pixel_values_videos=pixel_values_videos, return_dict=True, **video_kwargs)
    return out.pooler_output


def image_features(base_model: Any, pixel_values: torch.Tensor, **image_kwargs: Any) -> list[torch.Tensor] | torch.Tensor:
    """The stock image features of ``base_model`` (``model.model``): per image ``[N_i, D]`` (a list, or a stacked
    tensor where all images have the same count)."""
    out = base_model.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
    return out.pooler_output


def pack_anyres(base_model: Any, features: list[torch.Tensor], image_sizes: Any, strategy: str,
                image_newline: torch.Tensor) -> list[torch.Tensor]:
    """LLaVA-NeXT's packing of per-crop features (unpadding, one newline per high-resolution row), per image."""
    packed, _ = base_model.pack_image_features(features, image_sizes, strategy, image_newline=image_newline)
    return packed


def pack_onevision(base_model: Any, features: list[torch.Tensor], image_sizes: Any, image_newline: torch.Tensor,
                   vision_aspect_ratio: str) -> list[torch.Tensor]:
    """LLaVA-OneVision's packing (unpadding, the anyres_max bilinear shrink, one newline per high-resolution row;
    a lone base grid gets one newline), per image."""
    packed, _ = base_model.pack_image_features(features, image_sizes, image_newline=image_newline,
                                               vision_aspect_ratio=vision_aspect_ratio)
    return packed


def requests_static_cache(generation_config: Any, generate_kwargs: dict[str, Any]) -> bool:
    """Whether a ``generate`` call would use a preallocated (static) cache."""
    implementation = generate_kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    return implementation == "static" or is_static_cache(cache_of_call(generate_kwargs))


def layer_checkpointing(layer: Any) -> Any:
    """The checkpointing function of a decoder layer whose gradient checkpointing is on (and training), else None."""
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        return getattr(layer, "_gradient_checkpointing_func", None)
    return None


def set_layer_checkpointing(layer: Any, on: bool) -> None:
    """Switch a decoder layer's own gradient checkpointing flag (its checkpointing function stays set)."""
    layer.gradient_checkpointing = on


def check_supported() -> None:
    """Raise an ``ImportError`` naming the fix when the installed transformers predates the floor."""
    if TRANSFORMERS_VERSION < Version(TESTED_RANGE[0]):
        raise ImportError(
            f"vlm-compress needs transformers>={TESTED_RANGE[0]} (pre-encoded image features, "
            f"`mm_encoder_outputs`); found {TRANSFORMERS_VERSION}. Run: pip install 'transformers>={TESTED_RANGE[0]}'"
        )


# -- decoder-layer keywords ----------------------------------------------------------------------------------
def rotary_tables(layer_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary ``(cos, sin)`` [B or 1, S, hd] a decoder layer received (``position_embeddings=``)."""
    tables = layer_kwargs.get("position_embeddings")
    if tables is None:
        raise TypeError(
            "the decoder layer was called without position_embeddings=(cos, sin); in-LLM methods support "
            "transformers' Llama-style layers (transformers>=" + TESTED_RANGE[0] + ")"
        )
    return tables


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Llama's rotary embedding of ``q`` and ``k`` [B, H, S, hd] with ``cos``/``sin`` [B, S, hd]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def with_rotary_tables(layer_kwargs: dict[str, Any], cos: torch.Tensor, sin: torch.Tensor) -> dict[str, Any]:
    """A copy of ``layer_kwargs`` whose rotary tables are ``(cos, sin)``."""
    return {**layer_kwargs, "position_embeddings": (cos, sin)}


# -- Qwen2-VL / Qwen2.5-VL M-RoPE -----------------------------------------------------------------------------
def rope_index(base_model: Any, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
               attention_mask: torch.Tensor | None, **grids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock M-RoPE positions of an *uncompressed* prompt: ``(positions [3, B, L], deltas [B, 1])``.

    ``grids``: ``image_grid_thw``, ``video_grid_thw`` and (Qwen2.5-VL) ``second_per_grid_ts``; ones the installed
    model's ``get_rope_index`` does not take are left out."""
    import inspect

    accepted = inspect.signature(base_model.get_rope_index).parameters
    kwargs = {k: v for k, v in grids.items() if k in accepted and v is not None}
    return base_model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                     attention_mask=attention_mask, **kwargs)


def set_rope_deltas(base_model: Any, deltas: torch.Tensor) -> None:
    """What the model adds to ``cumsum(attention_mask) - 1`` for cached steps called without position ids (the
    stock forward sets it at every multimodal prompt, so a later uncompressed prompt overwrites it as usual)."""
    base_model.rope_deltas = deltas


def rope_deltas(base_model: Any) -> torch.Tensor | None:
    return getattr(base_model, "rope_deltas", None)


def merge_group_positions(visual: Any, grid_thw: torch.Tensor) -> torch.Tensor:
    """``[S / m²]``: for each merged visual token, in the order the model emits them, the position of its ``m×m``
    patch group in the sequence the ViT blocks see. Qwen2-VL: the identity; Qwen2.5-VL: groups are permuted into
    attention windows, so this is ``argsort(window_index)`` (the un-permutation applied after the merger)."""
    merge = visual.spatial_merge_size
    groups = int((grid_thw.prod(-1) // (merge * merge)).sum())
    if not hasattr(visual, "fullatt_block_indexes"):
        return torch.arange(groups, device=grid_thw.device)
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge, window_size=visual.window_size,
                                              patch_size=visual.patch_size)
    return torch.argsort(window_index.to(grid_thw.device))


# -- model-family helpers ------------------------------------------------------------------------------------
def anyres_helpers(family: str = "llava_next"):
    """``(get_anyres_image_grid_shape, image_size_to_num_patches)`` of ``family`` (``"llava_next"`` or
    ``"llava_onevision"``)."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return module.get_anyres_image_grid_shape, module.image_size_to_num_patches


def pil_image_processor(family: str):
    """The torchvision-free image processor class of ``family`` (``"clip"``, ``"llava_next"``, ``"onevision"``)."""
    if family == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    if family == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil
    if family == "onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil
    raise ValueError(f"no PIL image processor known for {family!r}")

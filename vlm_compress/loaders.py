"""Weights in the original LLaVA codebase's format (haotian-liu/LLaVA), as the official M3 and MQT checkpoints ship.

``mucai/llava-v1.5-7b-m3`` and ``mucai/llava-next-vicuna-7b-m3`` are original-format LLaVA checkpoints; M3 changes
only the weights, so after renaming they load into the stock ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` and run with the ``m3`` method. ``gordonhu/MQT-LLaVA-7b`` is the same format
with a query-transformer resampler in place of the MLP projector; its weights map onto
:class:`vlm_compress.modules.resampler.QueryResampler`, whose parameter names mirror the official module.

Only names change here; nothing is downloaded. The original checkpoints have no ``<image>`` token in their
vocabulary (the code splices features at index -200): the stock model needs one added to the tokenizer and the
embeddings resized to match (transformers' own LLaVA conversion does the same), and a config built from the
original ``config.json`` (``llava_config_from_original``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

# original prefix → transformers 5.x prefix, first match wins
ORIGINAL_TO_HF = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)
RESAMPLER_PREFIX = "model.mm_projector."


def convert_original_llava(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an original-format state dict into ``(transformers LLaVA state dict, resampler state dict)``.

    The second is empty for MLP-projector checkpoints (LLaVA-1.5, LLaVA-NeXT, M3); for MQT it holds the
    resampler's weights under :class:`QueryResampler`'s names. Unknown keys raise a ``ValueError``.
    """
    hf, resampler = {}, {}
    for key, value in state_dict.items():
        if key.startswith(RESAMPLER_PREFIX) and not key.startswith(("model.mm_projector.0.", "model.mm_projector.2.")):
            resampler[key[len(RESAMPLER_PREFIX):]] = value
            continue
        for old, new in ORIGINAL_TO_HF:
            if key.startswith(old):
                hf[new + key[len(old):]] = value
                break
        else:
            raise ValueError(f"{key!r} is not an original-LLaVA weight name; is this checkpoint already in HF format?")
    return hf, resampler


def llava_config_from_original(config: Mapping[str, Any], vision_config: Any, image_token_id: int):
    """A transformers ``LlavaConfig`` (``LlavaNextConfig`` when the original config has ``image_grid_pinpoints``)
    from an original LLaVA ``config.json`` dict, a ``CLIPVisionConfig`` for its tower, and the id of the
    ``<image>`` token added to the tokenizer."""
    from transformers import LlamaConfig, LlavaConfig, LlavaNextConfig

    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "bos_token_id",
                 "eos_token_id", "pad_token_id", "tie_word_embeddings")
    text = LlamaConfig(**{k: config[k] for k in text_keys if k in config})
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"projector {config['mm_projector_type']!r} has no stock equivalent (MQT: use the resampler)")
    common = dict(
        text_config=text,
        vision_config=vision_config,
        image_token_id=image_token_id,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="full" if config.get("mm_vision_select_feature") == "cls_patch" else "default",
    )
    if config.get("image_grid_pinpoints"):
        return LlavaNextConfig(**common, image_grid_pinpoints=config["image_grid_pinpoints"])
    return LlavaConfig(**common)

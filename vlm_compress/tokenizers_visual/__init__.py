"""Discrete image tokenizers under the toolkit's budget language: FlexTok (1..K coarse-to-fine tokens) and SEED
(32 causal Q-Former codes). ``tokenizer.encode(images, budget=...)`` with an int (tokens) or a float (share of
``max_tokens``); ``decode``, ``embed``, ``codebook_size``, ``max_tokens``. See :mod:`.base`."""

from .base import ImageTokenizer, psnr, to_pixels, to_uint8
from .flextok import FlexTokConfig, FlexTokTokenizer
from .quantizers import FSQ, QuantizerOutput, VectorQuantizer
from .seed import (
    SeedConfig,
    SeedTokenizer,
    build_clip_target,
    load_clip_target,
    tiny_clip_config,
)

__all__ = [
    "FSQ",
    "FlexTokConfig",
    "FlexTokTokenizer",
    "ImageTokenizer",
    "QuantizerOutput",
    "SeedConfig",
    "SeedTokenizer",
    "VectorQuantizer",
    "build_clip_target",
    "load_clip_target",
    "psnr",
    "tiny_clip_config",
    "to_pixels",
    "to_uint8",
]

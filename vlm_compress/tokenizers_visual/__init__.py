"""Discrete image tokenizers under the toolkit's budget language: FlexTok (1..K coarse-to-fine tokens), SEED
(32 causal Q-Former codes) and a LlamaGen-style grid VQ (the codes :mod:`vlm_compress.speculative` generates). ``tokenizer.encode(images, budget=...)`` with an int (tokens) or a float (share of
``max_tokens``); ``decode``, ``embed``, ``codebook_size``, ``max_tokens``. See :mod:`.base`.

>>> tok = load_tokenizer("tiny-flextok")                 # or a save_pretrained folder; official: load_*_official
>>> ids = tok.encode(images, budget=16)                  # [B, 16] ids in [0, 64000)
>>> tok.decode(ids, steps=25, generator=g)               # [B, 3, 64, 64] in [0, 1]
"""

from .base import ImageTokenizer, psnr, to_pixels, to_uint8
from .checkpoints import CheckpointError, load_flextok_official, load_seed_official, load_tokenizer
from .flextok import FlexTokConfig, FlexTokTokenizer
from .quantizers import FSQ, QuantizerOutput, VectorQuantizer
from .seed import (
    SeedConfig,
    SeedTokenizer,
    build_clip_target,
    load_clip_target,
    tiny_clip_config,
)
from .unclip import UnclipDecoder
from .vqgan import VQGANConfig, VQGANTokenizer

__all__ = [
    "FSQ",
    "CheckpointError",
    "FlexTokConfig",
    "FlexTokTokenizer",
    "ImageTokenizer",
    "QuantizerOutput",
    "SeedConfig",
    "SeedTokenizer",
    "UnclipDecoder",
    "VQGANConfig",
    "VQGANTokenizer",
    "VectorQuantizer",
    "build_clip_target",
    "load_clip_target",
    "load_flextok_official",
    "load_seed_official",
    "load_tokenizer",
    "psnr",
    "tiny_clip_config",
    "to_pixels",
    "to_uint8",
]

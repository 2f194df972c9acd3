"""Speculative decoding for visual autoregressive generators, with LANTERN's relaxed acceptance.

>>> target, drafter = load_generator("tiny-imagegpt"), load_generator("tiny-imagegpt-drafter")
>>> vq = load_tokenizer("tiny-vq")                                   # vlm_compress.tokenizers_visual
>>> rule = LanternRule(latent_neighbors(vq.codebook(), k=32), delta=0.1)
>>> codes, stats = speculative_generate(target, drafter, classes=[3], gamma=4, rule=rule, generator=g)
>>> images = vq.decode(codes); stats.mean_accepted_length

Modules: :mod:`.gpt` (the class-conditional LlamaGen-style generator and its KV cache), :mod:`.sampling` (warps and
samplers), :mod:`.acceptance` (the standard rule), :mod:`.lantern` (LANTERN / LANTERN++), :mod:`.streams` (models
behind one protocol, classifier-free guidance), :mod:`.decoding` (plain and speculative loops).
"""

from .acceptance import AcceptanceRule
from .decoding import GenerationStats, generate, speculative_generate
from .gpt import ImageGPT, ImageGPTConfig, KVCache
from .lantern import LanternRule, latent_neighbors
from .sampling import Sampler, TorchSampler, Warp
from .streams import ModelStream, Stream
from .checkpoints import EMBEDDED, load_generator

__all__ = [
    "EMBEDDED",
    "AcceptanceRule",
    "GenerationStats",
    "ImageGPT",
    "ImageGPTConfig",
    "KVCache",
    "LanternRule",
    "ModelStream",
    "Sampler",
    "Stream",
    "TorchSampler",
    "Warp",
    "generate",
    "latent_neighbors",
    "load_generator",
    "speculative_generate",
]

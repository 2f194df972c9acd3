"""vlm-compress: drop-in, reversible visual-token compression for Hugging Face vision-language models.

>>> compress(model, budget=0.2, method="cls_attn")   # in place; returns the model
>>> model.generate(**processor(images=img, text=prompt, return_tensors="pt"))
>>> model.compression.stats                          # tokens kept, FLOPs, KV bytes, selection time
>>> restore(model)                                   # the untouched model again
"""

from . import compat

compat.check_supported()  # transformers older than the tested floor: an ImportError naming the fix

from .api import CompressionState, compress, compressed, restore  # noqa: E402
from .config import MethodConfig  # noqa: E402
from .registry import get_method, list_methods, register_method  # noqa: E402
from .stats import CompressionStats  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CompressionState",
    "CompressionStats",
    "MethodConfig",
    "compress",
    "compressed",
    "get_method",
    "list_methods",
    "register_method",
    "restore",
]

"""Model-family adapters and the lookup from a model instance to its adapter."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageBatch, TokenLayout, VideoBatch
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .onevision import OnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, OnevisionAdapter, Qwen2VLAdapter)

# Model classes we know and refuse, with the reason (a clearer message than "not supported").
REFUSED = {
    name: ("its DeepStack features (ViT hidden states of several layers, added to the first LLM layers at every "
           "visual position) would have to be selected and positioned with the kept tokens, which the "
           "pre-encoded-features path does not carry")
    for name in ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
}


def supported_model_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_class_names]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``: the first class in its MRO that an adapter names, so subclasses of a supported
    class work (PEFT wrappers are unwrapped by ``compress`` first); a ``TypeError`` naming the supported classes
    otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress() expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    for cls in type(model).__mro__:
        for adapter in ADAPTERS:
            if cls.__name__ in adapter.model_class_names and cls.__module__.startswith("transformers."):
                return adapter(model)
    name = type(model).__name__
    if name in REFUSED:
        raise TypeError(f"{name} is not supported: {REFUSED[name]}. Supported model classes: "
                        f"{', '.join(supported_model_classes())}.")
    hint = ""
    if name.endswith("Model") and hasattr(model, "language_model"):
        hint = " Pass the *ForConditionalGeneration model (the one with the LM head), not its base model."
    raise TypeError(
        f"{name} is not supported yet. Supported model classes: {', '.join(supported_model_classes())}.{hint}"
    )


__all__ = ["Adapter", "ImageBatch", "TokenLayout", "VideoBatch", "get_adapter", "supported_model_classes"]

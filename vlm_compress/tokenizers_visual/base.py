"""The interface every discrete image tokenizer shares, and its image and budget handling.

``encode(images, budget=None) -> LongTensor [B, T]``, ``decode(tokens) -> FloatTensor [B, 3, H, W]`` in [0, 1],
``embed(tokens) -> [B, T, D]`` (the code vectors an LLM consumes), ``codebook_size``, ``max_tokens``. ``budget``
speaks the toolkit's language (docs/architecture.md, "The budget convention"): an int is a token count, a float
the share of ``max_tokens``.

Weights live in a folder: ``config.json`` (with ``"tokenizer": "<kind>"``) and ``model.safetensors``;
:func:`vlm_compress.tokenizers_visual.load_tokenizer` reads one.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .. import model_folder
from ..budget import tokens_to_keep, validate_budget


class ImageTokenizer(nn.Module, abc.ABC):
    """Base class: subclasses set ``kind``, ``config_class`` and implement ``_encode``/``_decode``/``embed``."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    # ---- the interface ----------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def codebook_size(self) -> int:
        """Token ids lie in ``[0, codebook_size)``."""

    @property
    @abc.abstractmethod
    def max_tokens(self) -> int:
        """Tokens of a full encoding."""

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def tokens_for(self, budget: float | None) -> int:
        """Tokens an encoding at ``budget`` has: all for ``None``, else the toolkit's rule on ``max_tokens``."""
        if budget is None:
            return self.max_tokens
        return tokens_to_keep(validate_budget(budget), self.max_tokens)

    @torch.no_grad()
    def encode(self, images: Any, budget: float | None = None, **kwargs) -> torch.LongTensor:
        """Images → token ids ``[B, T]`` with ``T = tokens_for(budget)``. ``images``: see :meth:`preprocess`."""
        pixels = self.preprocess(images)
        return self._encode(pixels, self.tokens_for(budget), **kwargs)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Token ids ``[B, T]`` → images ``[B, 3, H, W]`` in [0, 1]."""
        tokens = self._check_tokens(tokens)
        return self._decode(tokens, **kwargs).clamp(0, 1)

    @abc.abstractmethod
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` → code vectors ``[B, T, D]``."""

    @abc.abstractmethod
    def _encode(self, pixels: torch.Tensor, num_tokens: int, **kwargs) -> torch.LongTensor: ...

    @abc.abstractmethod
    def _decode(self, tokens: torch.LongTensor, **kwargs) -> torch.Tensor: ...

    def after_step(self, step: int) -> None:
        """Training hook run after each optimiser step (VQ dead-code restarts); nothing by default."""

    # ---- inputs -----------------------------------------------------------------------------------------
    def preprocess(self, images: Any, resize: bool = False) -> torch.Tensor:
        """Images → ``[B, 3, S, S]`` float in [0, 1] on the model's device, ``S = image_size``.

        Accepts a float tensor ``[B, 3, H, W]`` / ``[3, H, W]`` in [0, 1], a uint8 tensor or array ``[B, H, W, 3]`` /
        ``[H, W, 3]``, a PIL image, or a list of those. Another size raises unless ``resize=True`` (bicubic)."""
        pixels = to_pixels(images)
        size = self.image_size
        if pixels.shape[-2:] != (size, size):
            if not resize:
                raise ValueError(
                    f"{type(self).__name__} takes {size}×{size} images, got {pixels.shape[-2]}×{pixels.shape[-1]}; "
                    f"resize them first, e.g. tokenizer.encode(tokenizer.preprocess(images, resize=True))"
                )
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
            pixels = pixels.clamp(0, 1)
        param = self._reference_parameter()
        return pixels.to(device=param.device, dtype=param.dtype)

    def _reference_parameter(self) -> torch.Tensor:
        """A parameter that holds real data (a SEED loaded without its ViT keeps that ViT on the meta device)."""
        return next(p for p in self.parameters() if not p.is_meta)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.LongTensor:
        from .quantizers import check_indices

        if isinstance(tokens, torch.Tensor) and tokens.dim() == 1:
            tokens = tokens[None]
        check_indices(tokens, self.codebook_size)
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.max_tokens:
            raise ValueError(
                f"token ids must be [batch, T] with 1 <= T <= {self.max_tokens}, got shape {tuple(tokens.shape)}"
            )
        return tokens.long().to(self._reference_parameter().device)

    # ---- weights ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, extra: dict | None = None, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``path``; floating tensors in ``dtype`` if given (the
        shipped models are stored in float16 and load back into float32 modules)."""
        config = {"tokenizer": self.kind, **dataclasses.asdict(self.config), **(extra or {})}
        state = {k: v for k, v in self.state_dict().items() if not self._skip_saving(k)}
        model_folder.write(path, config, state, dtype)

    def _skip_saving(self, key: str) -> bool:
        """Parameters that live elsewhere (e.g. a frozen target model saved in its own format)."""
        return False

    @classmethod
    def config_from_dict(cls, spec: dict) -> Any:
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(spec) - fields - {"tokenizer"})
        if unknown:
            raise ValueError(f"unknown {cls.kind} config keys {unknown}; known: {sorted(fields)}")
        return cls.config_class(**{k: v for k, v in spec.items() if k in fields})


def to_pixels(images: Any) -> torch.Tensor:
    """See :meth:`ImageTokenizer.preprocess`: anything image-like → ``[B, 3, H, W]`` float in [0, 1]."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        parts = [to_pixels(image) for image in images]
        if len({p.shape[-2:] for p in parts}) > 1:
            raise ValueError(f"images of different sizes {sorted({tuple(p.shape[-2:]) for p in parts})}; "
                             f"resize them to one size first")
        return torch.cat(parts)
    if hasattr(images, "convert") and hasattr(images, "size"):  # PIL
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be tensors, arrays, PIL images or a list of them, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [H, W, 3] or [B, H, W, 3], got {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be [3, H, W] or [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
    return images.float()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] → ``[B, H, W, 3]`` uint8."""
    return (pixels.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], ``[B, 3, H, W] → [B]``."""
    mse = (reference.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))

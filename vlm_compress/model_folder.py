"""The on-disk form of the toolkit's own small models (image tokenizers, image generators, the scene classifier): a
folder holding ``config.json`` and ``model.safetensors``. The shipped ones store float16 weights; loaders read them
back into float32 modules."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def resolve(name_or_path: str | Path, embedded: Iterable[str], assets: Path) -> Path:
    """``name_or_path`` as a path, or ``assets / name`` for an embedded name that is not also a local path."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in set(embedded):
        return assets / str(name_or_path)
    return path


def write(path: str | Path, config: Mapping, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """``config`` as ``config.json`` and ``state`` as ``model.safetensors`` under ``path`` (created); floating tensors
    in ``dtype`` when given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(dict(config), indent=1) + "\n")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
             for k, v in state.items()}
    save_file(state, str(path / WEIGHTS_NAME))


def read_weights(path: str | Path, error: type[Exception] = ValueError) -> dict[str, torch.Tensor]:
    """The tensors of ``path / model.safetensors``; a damaged or truncated file raises ``error`` naming the fix."""
    from safetensors.torch import load_file

    file = Path(path) / WEIGHTS_NAME
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise error(f"{file} is not a readable safetensors file ({err}); save or copy the folder again") from err

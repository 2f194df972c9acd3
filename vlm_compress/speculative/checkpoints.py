"""The embedded generators by name, or any ``ImageGPT.save_pretrained`` folder."""

from __future__ import annotations

from pathlib import Path

from .. import model_folder
from .gpt import ImageGPT

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = ("tiny-imagegpt", "tiny-imagegpt-drafter")


def load_generator(name_or_path: str | Path) -> ImageGPT:
    """An :class:`ImageGPT` in eval mode from a folder or an embedded name (``"tiny-imagegpt"``: the target trained on
    ``tiny-vq`` codes of the class scenes; ``"tiny-imagegpt-drafter"``: its drafter, distilled from it)."""
    path = model_folder.resolve(name_or_path, EMBEDDED, ASSETS)
    if not path.is_dir():
        raise FileNotFoundError(f"{name_or_path} is neither a folder nor an embedded generator {list(EMBEDDED)}")
    return ImageGPT.from_pretrained(path)

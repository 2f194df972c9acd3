"""Example images that need no network: ShapesVQA scenes (what the embedded models know) and, when scikit-image
is installed, a few of its bundled photographs."""

from __future__ import annotations

from PIL import Image

from ..bench.task import ShapesTask

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def example_images(scenes: int = 3) -> dict[str, Image.Image]:
    """``{label: image}``: ShapesVQA test scenes first, then scikit-image photos if available."""
    task = ShapesTask()
    out = {f"ShapesVQA scene {i + 1}": Image.fromarray(s.image) for i, s in enumerate(task.iterate("test", scenes))}
    try:
        from skimage import data
    except ImportError:
        return out
    for name in PHOTOS:
        out[f"photo: {name}"] = Image.fromarray(getattr(data, name)())
    return out

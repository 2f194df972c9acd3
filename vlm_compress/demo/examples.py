"""Examples that need no network: ShapesVQA scenes (what the embedded models know) and, when scikit-image is
installed, a few of its bundled photographs; ShapesVideo clips for the video tab."""

from __future__ import annotations

from PIL import Image

from ..bench.task import ShapesTask
from ..bench.video_task import ShapesVideoTask, VideoSample

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


def example_clips(clips: int = 3) -> dict[str, VideoSample]:
    """``{label: sample}``: ShapesVideo test clips (``.frames`` [8, 96, 96, 3] uint8, ``.question``)."""
    return {f"ShapesVideo clip {i + 1}": s for i, s in enumerate(ShapesVideoTask().iterate("test", clips))}

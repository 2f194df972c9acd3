"""ShapesVideo: clips of ShapesVQA scenes whose answer sits in one frame, or two consecutive ones.

Every frame is an independent ShapesVQA scene (its own textured background, 3–5 objects, see :mod:`.task`); the
question is one of ShapesVQA's local types, with its wording, about an object that appears only in the *key
frames*:

- ``color_of_shape`` — "what color is the {shape} ?": that shape is in the key frame(s) only (one object, of one
  colour and size, in the same cell when it lasts two frames); every other object has one of the other shapes.
- ``shape_of_color`` — "what shape is the {color} object ?": that colour is in the key frame(s) only.
- ``presence`` — "is there a {color} {shape} ?": "yes", the pair is in the key frame(s) only; "no", it is nowhere
  (no key frames).

Answers are balanced (colour, shape, yes/no drawn uniformly). Besides the clip and its answer, a sample carries
what a frame-selection method (QuoTA, :mod:`vlm_compress.pruners.quota`) needs as targets: which frames hold the
answer, the physical entities the question is about, and the three-step decoupling text of
:data:`~vlm_compress.pruners.quota.DECOUPLE_TEMPLATE`. Every sample is a pure function of (split, index), from the
seed streams of :data:`.task.SPLIT_SEEDS` (offset, so that clip and image samples differ).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from ..pruners.quota import PROMPT_FORMAT
from .task import COLORS, SHAPES, SPLIT_SEEDS, SceneObject, ShapesTask

VIDEO_QUESTION_TYPES = ("color_of_shape", "shape_of_color", "presence")
VIDEO_SEED = 100  # added to SPLIT_SEEDS: the clip streams are not the image task's


@dataclasses.dataclass
class VideoSample:
    frames: np.ndarray  # [F, H, W, 3] uint8
    question: str
    answer: str
    qtype: str
    key_frames: list[int]  # the frames that hold the answer ([] for a "no" presence question)
    frame_objects: list[list[SceneObject]]
    entities: list[str]  # the physical entities the question asks about (decoupling's step 3)
    mentioned: list[str]  # everything the question mentions (decoupling's step 2)

    @property
    def prompt(self) -> str:
        return PROMPT_FORMAT.format(visual="<video>", text=self.question)

    def window(self, start: int, stop: int) -> "VideoSample":
        """Frames ``[start, stop)`` as a clip of their own: key frames re-indexed, a presence answer following them
        (a colour or shape question needs a key frame in the window)."""
        keys = [k - start for k in self.key_frames if start <= k < stop]
        if self.qtype != "presence" and not keys:
            raise ValueError(f"frames [{start}, {stop}) hold no key frame of {self.key_frames}: no answer")
        answer = ("yes" if keys else "no") if self.qtype == "presence" else self.answer
        return dataclasses.replace(self, frames=self.frames[start:stop], answer=answer, key_frames=keys,
                                   frame_objects=self.frame_objects[start:stop])


def frame_relevance(sample: VideoSample, frame: int) -> str:
    """"yes" when ``frame`` holds the answer (it is a key frame), else "no" (both relevance prompts' target)."""
    return "yes" if frame in sample.key_frames else "no"


def decoupled(sample: VideoSample) -> str:
    """The target of the text-only decoupling prompt, in the format of DECOUPLE_TEMPLATE's example."""
    return f"step 1: yes step 2: [{', '.join(sample.mentioned)}] step 3: [{', '.join(sample.entities)}]"


class ShapesVideoTask:
    """Generator of :class:`VideoSample`: ``frames`` scenes of ``canvas`` pixels, ``cell``-pixel grid cells and
    ``objects`` (min, max) objects per frame."""

    def __init__(self, frames: int = 8, canvas: int = 96, cell: int = 8, objects: tuple[int, int] = (3, 5)):
        if frames < 1:
            raise ValueError(f"frames must be at least 1, got {frames}")
        self.frames = frames
        self.scene = ShapesTask(canvas=canvas, cell=cell, objects=objects, question_types=VIDEO_QUESTION_TYPES)

    def describe(self) -> dict:
        """The constructor arguments as JSON-able values (saved beside a model trained on this task)."""
        s = self.scene
        return dict(frames=self.frames, canvas=s.height, cell=s.cell, objects=[s.min_objects, s.max_objects])

    @classmethod
    def from_description(cls, spec: dict) -> "ShapesVideoTask":
        return cls(frames=spec["frames"], canvas=spec["canvas"], cell=spec["cell"], objects=tuple(spec["objects"]))

    # ---- splits ---------------------------------------------------------------------------------------
    def sample_at(self, split: str, index: int) -> VideoSample:
        """The ``index``-th clip of ``split`` ("train", "val" or "test"): deterministic."""
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
        return self.sample(np.random.default_rng([VIDEO_SEED + SPLIT_SEEDS[split], index]))

    def iterate(self, split: str, count: int, start: int = 0) -> Iterator[VideoSample]:
        for i in range(start, start + count):
            yield self.sample_at(split, i)

    # ---- one clip ---------------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> VideoSample:
        qtype = VIDEO_QUESTION_TYPES[rng.integers(len(VIDEO_QUESTION_TYPES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        if qtype == "presence" and rng.random() < 0.5:
            keys = []
        else:
            length = int(rng.integers(1, min(2, self.frames) + 1))  # one frame, or two consecutive ("appears briefly")
            first = int(rng.integers(0, self.frames - length + 1))
            keys = list(range(first, first + length))
        if qtype == "color_of_shape":
            other_shapes, other_colors = tuple(s for s in SHAPES if s != shape), tuple(COLORS)
            question, answer, entities, mentioned = f"what color is the {shape} ?", color, [shape], [shape, "color"]
        elif qtype == "shape_of_color":
            other_shapes, other_colors = SHAPES, tuple(c for c in COLORS if c != color)
            question, answer = f"what shape is the {color} object ?", shape
            entities, mentioned = [f"{color} object"], [f"{color} object", "shape"]
        else:
            other_shapes, other_colors = SHAPES, tuple(COLORS)
            question, answer = f"is there a {color} {shape} ?", "yes" if keys else "no"
            entities = mentioned = [f"{color} {shape}"]
        key_object, frame_objects = None, []
        for f in range(self.frames):
            objects = self._frame(rng, (shape, color), f in keys, key_object, other_shapes, other_colors)
            if f in keys:
                key_object = objects[0]
            frame_objects.append(objects)
        frames = np.stack([self.scene._render(objects, rng) for objects in frame_objects])
        return VideoSample(frames, question, answer, qtype, keys, frame_objects, entities, mentioned)

    def _frame(self, rng, pair, is_key: bool, key_object, shapes, colors) -> list[SceneObject]:
        """One scene's objects: the (shape, colour) ``pair`` first in a key frame (in ``key_object``'s cell and of
        its size when it continues from the previous frame), then others drawn from ``shapes`` × ``colors``, never
        ``pair`` itself."""
        count = self.scene._count(rng)
        for _ in range(100):
            specs = self.scene._random_objects(rng, count - is_key, shapes, colors)
            if pair in specs:
                continue
            objects = self.scene._place(rng, [pair] * is_key + specs)
            if not objects:
                continue
            if is_key and key_object is not None:  # the same object as in the previous frame: keep its cell and size
                objects[0] = key_object
                if any(abs(o.row - key_object.row) <= 1 and abs(o.col - key_object.col) <= 1 for o in objects[1:]):
                    continue
            return objects
        raise RuntimeError(f"could not place {count} objects on a {self.scene.rows}×{self.scene.cols} grid")

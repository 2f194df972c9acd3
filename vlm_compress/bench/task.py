"""ShapesVQA: a procedural visual-question task whose answers hinge on small, local details.

Scenes are canvases of textured noise with a few small objects (3 shapes × 6 colours × 2 sizes). Every object
lies inside one cell of the patch grid, so its identity is carried by a single visual token: a method that drops
that token loses the answer. Six question types: the colour of the object of a given shape, the shape of the
object of a given colour, presence of a (colour, shape), the count of a shape, the colour of the object in a
named quadrant, and left/right relations. Every sample is a pure function of (split, index): the train and
held-out splits draw from disjoint seed streams.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = (5, 7)  # pixels; both fit in an 8-pixel cell
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("color_of_shape", "shape_of_color", "presence", "count", "region", "relative")
COUNTS = ("0", "1", "2", "3")
ANSWERS = (*COLORS, *SHAPES, "yes", "no", *COUNTS)
SPLIT_SEEDS = {"train": 1, "test": 2, "val": 3}
PROMPT = "USER: <image>\n{question} ASSISTANT:"


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: int
    row: int  # grid cell
    col: int


@dataclasses.dataclass
class Sample:
    image: np.ndarray | None  # [H, W, 3] uint8 (None when not rendered)
    question: str
    answer: str
    qtype: str
    objects: list[SceneObject]

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)


def _stamp(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        c = size / 2
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2 + 0.25
    if shape == "triangle":  # apex up
        return np.abs(xx - size / 2) <= yy / 2 + 0.25
    raise ValueError(shape)


_STAMPS = {(s, z): _stamp(s, z) for s in SHAPES for z in SIZES}


class ShapesTask:
    """Generator of :class:`Sample` for a canvas of ``canvas`` pixels and ``cell``-pixel grid cells.

    ``canvas`` may be ``(height, width)``; objects never share or touch (8-neighbour) cells. ``question_types``
    restricts the questions asked (default: all six).
    """

    def __init__(self, canvas: int | tuple[int, int] = 96, cell: int = 8, objects: tuple[int, int] = (3, 6),
                 question_types: tuple[str, ...] = QUESTION_TYPES):
        self.height, self.width = (canvas, canvas) if isinstance(canvas, int) else canvas
        self.cell = cell
        self.rows, self.cols = self.height // cell, self.width // cell
        self.min_objects, self.max_objects = objects
        unknown = sorted(set(question_types) - set(QUESTION_TYPES))
        if unknown or not question_types:
            raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}, got {question_types}")
        self.question_types = tuple(question_types)

    def describe(self) -> dict:
        """The constructor arguments as JSON-able values (saved beside a model trained on this task)."""
        return dict(canvas=[self.height, self.width], cell=self.cell, objects=[self.min_objects, self.max_objects],
                    question_types=list(self.question_types))

    @classmethod
    def from_description(cls, spec: dict) -> "ShapesTask":
        return cls(canvas=tuple(spec["canvas"]), cell=spec["cell"], objects=tuple(spec["objects"]),
                   question_types=tuple(spec["question_types"]))

    # ---- splits ---------------------------------------------------------------------------------------
    def sample_at(self, split: str, index: int, render: bool = True) -> Sample:
        """The ``index``-th sample of ``split`` ("train", "val" or "test"): deterministic. ``render=False`` skips
        drawing the image (``image`` is ``None``; question, answer and objects are the same)."""
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
        return self.sample(np.random.default_rng([SPLIT_SEEDS[split], index]), render)

    def iterate(self, split: str, count: int, start: int = 0, render: bool = True) -> Iterator[Sample]:
        for i in range(start, start + count):
            yield self.sample_at(split, i, render)

    # ---- one sample -----------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, render: bool = True) -> Sample:
        qtype = self.question_types[rng.integers(len(self.question_types))]
        for _ in range(100):
            made = getattr(self, f"_q_{qtype}")(rng)
            if made is not None:
                objects, question, answer = made
                return Sample(self._render(objects, rng) if render else None, question, answer, qtype, objects)
        raise RuntimeError(f"could not build a {qtype} question on a {self.rows}×{self.cols} grid")

    def render_scene(self, specs: list[tuple[str, str]], rng: np.random.Generator
                     ) -> tuple[np.ndarray, list[SceneObject]] | None:
        """Place ``(shape, colour)`` specs in free, non-touching cells and render them (sizes drawn as for the
        questions): ``(image [H, W, 3] uint8, objects)``, or ``None`` when they do not fit."""
        objects = self._place(rng, specs)
        return (self._render(objects, rng), objects) if objects else None

    def _random_objects(self, rng, count, shapes=SHAPES, colors=tuple(COLORS)) -> list[tuple[str, str]]:
        return [(shapes[rng.integers(len(shapes))], colors[rng.integers(len(colors))]) for _ in range(count)]

    def _count(self, rng) -> int:
        return int(rng.integers(self.min_objects, self.max_objects + 1))

    def _place(self, rng, specs, regions=None) -> list[SceneObject] | None:
        """Put each (shape, colour) in a free, non-touching cell; ``regions[i]`` restricts object i to a quadrant."""
        taken = np.zeros((self.rows + 2, self.cols + 2), bool)
        placed = []
        for i, (shape, color) in enumerate(specs):
            region = regions[i] if regions is not None else None
            free = [
                (r, c)
                for r in range(self.rows)
                for c in range(self.cols)
                if not taken[r : r + 3, c : c + 3].any() and (region is None or self._quadrant(r, c) == region)
            ]
            if not free:
                return None
            r, c = free[rng.integers(len(free))]
            taken[r + 1, c + 1] = True
            placed.append(SceneObject(shape, color, SIZES[rng.integers(len(SIZES))], r, c))
        return placed

    def _quadrant(self, row: int, col: int) -> str | None:
        half_r, half_c = self.rows / 2, self.cols / 2
        if row + 0.5 == half_r or col + 0.5 == half_c:
            return None  # a cell on an odd grid's middle line belongs to no quadrant
        return f"{'top' if row < half_r else 'bottom'} {'left' if col < half_c else 'right'}"

    # ---- question builders: (objects, question, answer) or None to retry --------------------------------
    def _q_color_of_shape(self, rng):
        shape = SHAPES[rng.integers(3)]
        others = [s for s in SHAPES if s != shape]
        color = list(COLORS)[rng.integers(len(COLORS))]
        objects = self._place(rng, [(shape, color)] + self._random_objects(rng, self._count(rng) - 1, shapes=others))
        return objects and (objects, f"what color is the {shape} ?", color)

    def _q_shape_of_color(self, rng):
        color = list(COLORS)[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(3)]
        others = tuple(c for c in COLORS if c != color)
        objects = self._place(rng, [(shape, color)] + self._random_objects(rng, self._count(rng) - 1, colors=others))
        return objects and (objects, f"what shape is the {color} object ?", shape)

    def _q_presence(self, rng):
        specs = self._random_objects(rng, self._count(rng))
        if rng.random() < 0.5:
            shape, color = specs[rng.integers(len(specs))]
            answer = "yes"
        else:
            absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in specs]
            shape, color = absent[rng.integers(len(absent))]
            answer = "no"
        objects = self._place(rng, specs)
        return objects and (objects, f"is there a {color} {shape} ?", answer)

    def _q_count(self, rng):
        shape = SHAPES[rng.integers(3)]
        k = int(rng.integers(len(COUNTS)))
        others = [s for s in SHAPES if s != shape]
        rest = max(self._count(rng) - k, 1 if k == 0 else 0)
        specs = self._random_objects(rng, k, shapes=(shape,)) + self._random_objects(rng, rest, shapes=others)
        objects = self._place(rng, specs)
        return objects and (objects, f"how many {shape} are there ?", str(k))

    def _q_region(self, rng):
        quadrant = QUADRANTS[rng.integers(4)]
        specs = self._random_objects(rng, self._count(rng))
        elsewhere = [q for q in QUADRANTS if q != quadrant]
        regions = [quadrant] + [elsewhere[rng.integers(3)] for _ in specs[1:]]
        objects = self._place(rng, specs, regions)
        return objects and (objects, f"what color is the object at the {quadrant} ?", specs[0][1])

    def _q_relative(self, rng):
        first, second = rng.choice(len(SHAPES), 2, replace=False)
        s1, s2 = SHAPES[first], SHAPES[second]
        third = [s for s in SHAPES if s not in (s1, s2)]
        specs = self._random_objects(rng, 1, shapes=(s1,)) + self._random_objects(rng, 1, shapes=(s2,))
        specs += self._random_objects(rng, self._count(rng) - 2, shapes=third)
        objects = self._place(rng, specs)
        if not objects or abs(objects[0].col - objects[1].col) < 2:
            return None
        answer = "yes" if objects[0].col < objects[1].col else "no"
        return objects, f"is the {s1} left of the {s2} ?", answer

    # ---- further questions about a given scene (multi-turn training) -----------------------------------
    def questions_about(self, objects: list[SceneObject], rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
        """Up to ``count`` extra ``(question, answer, qtype)`` that are valid for ``objects``, types drawn uniformly
        among those the scene supports. Used to train on several turns per image; the held-out splits stay
        single-question (:meth:`sample_at`)."""
        shapes = [o.shape for o in objects]
        colors = [o.color for o in objects]
        unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
        unique_colors = [c for c in COLORS if colors.count(c) == 1]
        by_quadrant = {q: [o for o in objects if self._quadrant(o.row, o.col) == q] for q in QUADRANTS}
        lone_quadrants = [q for q, objs in by_quadrant.items() if len(objs) == 1]
        pairs = [(a, b) for a in objects for b in objects if a is not b and a.shape in unique_shapes
                 and b.shape in unique_shapes and abs(a.col - b.col) >= 2]
        countable = [s for s in SHAPES if shapes.count(s) < len(COUNTS)]
        makers = {
            "color_of_shape": unique_shapes and (lambda: (lambda s: (f"what color is the {s} ?", colors[shapes.index(s)]))(
                unique_shapes[rng.integers(len(unique_shapes))])),
            "shape_of_color": unique_colors and (lambda: (lambda c: (f"what shape is the {c} object ?", shapes[colors.index(c)]))(
                unique_colors[rng.integers(len(unique_colors))])),
            "presence": lambda: self._presence_about(objects, rng),
            "count": countable and (lambda: (lambda s: (f"how many {s} are there ?", str(shapes.count(s))))(
                countable[rng.integers(len(countable))])),
            "region": lone_quadrants and (lambda: (lambda q: (f"what color is the object at the {q} ?", by_quadrant[q][0].color))(
                lone_quadrants[rng.integers(len(lone_quadrants))])),
            "relative": pairs and (lambda: (lambda a, b: (f"is the {a.shape} left of the {b.shape} ?", "yes" if a.col < b.col else "no"))(
                *pairs[rng.integers(len(pairs))])),
        }
        valid = [t for t, make in makers.items() if make and t in self.question_types]
        out = []
        for _ in range(count):
            qtype = valid[rng.integers(len(valid))]
            out.append((*makers[qtype](), qtype))
        return out

    def _presence_about(self, objects, rng):
        present = sorted({(o.color, o.shape) for o in objects})
        if rng.random() < 0.5:
            color, shape = present[rng.integers(len(present))]
            return f"is there a {color} {shape} ?", "yes"
        absent = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]
        color, shape = absent[rng.integers(len(absent))]
        return f"is there a {color} {shape} ?", "no"

    # ---- rendering --------------------------------------------------------------------------------------
    def _render(self, objects: list[SceneObject], rng: np.random.Generator) -> np.ndarray:
        h, w = self.height, self.width
        base = rng.uniform(80, 170)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        ay, ax, phase = rng.uniform(-30, 30), rng.uniform(-30, 30), rng.uniform(0, 2 * np.pi)
        field = base + ay * yy + ax * xx + 12 * np.sin(2 * np.pi * (yy * rng.uniform(1, 4) + xx * rng.uniform(1, 4)) + phase)
        img = field[..., None] + rng.normal(0, 14, (h, w, 3))
        for obj in objects:
            stamp = _STAMPS[(obj.shape, obj.size)]
            oy = obj.row * self.cell + int(rng.integers(0, self.cell - obj.size + 1))
            ox = obj.col * self.cell + int(rng.integers(0, self.cell - obj.size + 1))
            patch = img[oy : oy + obj.size, ox : ox + obj.size]
            colour = np.array(COLORS[obj.color], float) + rng.normal(0, 8, 3)
            patch[stamp] = colour
        return np.clip(img, 0, 255).astype(np.uint8)


def vocabulary() -> list[str]:
    """Every word a prompt or answer of the task uses (for a word-level tokenizer)."""
    words = set("USER: ASSISTANT: what color is the shape object there a how many are at of left".split())
    for q in QUADRANTS:
        words.update(q.split())
    words.update(["?", *ANSWERS])
    return sorted(words)

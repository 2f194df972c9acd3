"""The demo's image-tokenizer work, free of any UI: load a tokenizer, read an input image, encode and decode it.

An input (a bundled 64×64 test scene, or an upload of any size and aspect) is center-cropped to a square and
resized to :data:`INPUT_SIZE` (:func:`load_input`); each tokenizer then takes it through its own ``preprocess``
(a no-op at its native 64×64). :func:`reconstruct` encodes it at a token count, decodes it with a seeded generator
(seed 0: the page is reproducible) and measures the PSNR of the reconstruction against the input, both as the
page shows them (uint8), and the bits the encoding spends: ``tokens × log2(codebook_size)``.

FlexTok takes any count from 1 to its ``max_tokens`` and a number of decode steps; SEED always decodes all of its
codes (32 for the embedded model). Every check raises a :class:`~.compare.DemoInputError` whose message the page
shows as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..tokenizers_visual import psnr, to_uint8
from ..tokenizers_visual.checkpoints import ASSETS, EMBEDDED, load_tokenizer
from ..tokenizers_visual.flextok import FlexTokConfig
from .compare import DemoInputError, read_image

DEFAULT_FLEXTOK = "tiny-flextok"
DEFAULT_SEED = "tiny-seed"
INPUT_SIZE = 64  # the embedded tokenizers' input side
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DISPLAY_SCALE = 4  # the page upscales 64×64 images ×4 (nearest) for visibility
SEED = 0
NAMES = {"flextok": "FlexTok", "seed": "SEED"}


@dataclasses.dataclass
class Reconstruction:
    image: Image.Image  # the decoded image, at the tokenizer's size
    input: Image.Image  # the input as the tokenizer saw it (after its preprocess), at the same size
    psnr: float  # dB, of ``image`` against ``input`` (both uint8, as shown)
    tokens: int
    codebook_size: int
    bits: float  # tokens × log2(codebook_size)
    ms: float  # encode + decode, wall clock
    steps: int | None = None  # FlexTok's decode steps; None for a decoder without steps

    @property
    def count(self) -> str:
        """``"1 token"``, ``"16 tokens"``."""
        return f"{self.tokens} token{'' if self.tokens == 1 else 's'}"

    def summary(self, name: str) -> str:
        """One markdown line for the page, e.g. ``**FlexTok**: 16 tokens × log2(64000) = 255.4 bits, …``."""
        steps = f", {self.steps} decode steps" if self.steps is not None else ""
        return (f"**{name}**: {self.count} × log2({self.codebook_size}) = {self.bits:.1f} bits; "
                f"PSNR {self.psnr:.2f} dB; encode + decode {self.ms:.0f} ms{steps}")


def example_scenes(count: int = 4) -> dict[str, np.ndarray]:
    """``{label: [64, 64, 3] uint8}``: the first ``count`` test-split scenes the embedded tokenizers are measured
    on."""
    from ..bench.tokenizer_data import scene_images

    return {f"Test scene {i + 1}": image for i, image in enumerate(scene_images("test", 0, count))}


def resolve(name_or_path: str | Path) -> Path:
    """The folder ``load_tokenizer`` reads for ``name_or_path`` (an embedded name resolves under the assets)."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and str(name_or_path) in EMBEDDED:
        return ASSETS / str(name_or_path)
    return path


@functools.lru_cache(maxsize=4)
def load_visual_tokenizer(name_or_path: str, kind: str | None = None):
    """A tokenizer (eval mode, CPU) from a ``save_pretrained`` folder or an embedded name; ``kind`` (``"flextok"``,
    ``"seed"``): the kind it must be."""
    path = resolve(name_or_path)
    if not (path / "config.json").is_file() and str(name_or_path) in EMBEDDED:
        raise DemoInputError(f"the embedded {name_or_path} is not installed (nothing at {path}); give a local "
                             "tokenizer folder written by save_pretrained")
    if not (path / "config.json").is_file():
        raise DemoInputError(f"no tokenizer at {path}: give a local folder written by save_pretrained, or one of the "
                             f"embedded names {', '.join(EMBEDDED)}")
    from safetensors import SafetensorError

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:
        raise DemoInputError(f"the tokenizer at {path} did not load: {err}") from None
    if kind is not None and tokenizer.kind != kind:
        raise DemoInputError(f"the tokenizer at {path} is a {NAMES.get(tokenizer.kind, tokenizer.kind)}, not a "
                             f"{NAMES.get(kind, kind)}: give a {NAMES.get(kind, kind)} folder")
    return tokenizer


def default_steps(name_or_path: str | Path | None = DEFAULT_FLEXTOK) -> int:
    """A FlexTok folder's default decode steps (its config's ``timesteps``), read from ``config.json`` without
    loading weights; FlexTok's default when the folder cannot be read (e.g. not there yet)."""
    try:
        spec = json.loads((resolve(name_or_path or DEFAULT_FLEXTOK) / "config.json").read_text())
        return int(spec["timesteps"])
    except (OSError, ValueError, KeyError, TypeError):
        return FlexTokConfig().timesteps


def load_input(source, size: int = INPUT_SIZE) -> np.ndarray:
    """``[size, size, 3]`` uint8: ``source`` (an image file's path, a PIL image or a uint8 ``[H, W]`` / ``[H, W, 3|4]``
    array) center-cropped to a square and resized (bicubic, antialiased when shrinking)."""
    if source is None:
        raise DemoInputError("choose a bundled scene or upload an image")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (source.ndim == 2 or (source.ndim == 3 and source.shape[-1] in (3, 4))) \
                or not source.size:
            raise DemoInputError(f"an image array must be [H, W, 3] uint8, got {source.shape} {source.dtype}")
        source = Image.fromarray(source)
    elif not isinstance(source, Image.Image):
        name = Path(str(source)).name
        if not Path(str(source)).is_file():
            raise DemoInputError(f"{name} is no longer on the server; upload it again")
    try:
        image, _ = read_image(source)
    except Image.DecompressionBombError:
        raise DemoInputError(f"{Path(str(source)).name} has too many pixels for this demo; upload a smaller PNG or "
                             "JPEG") from None
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def whole_number(value) -> int | None:
    """``value`` (an int, an integral float from a slider, or a string from a radio) as an int; None if it is not
    a whole number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value)
        except ValueError:
            return None
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return count if count == value else None


def token_count(tokenizer, tokens) -> int:
    """``tokens`` (from a radio, slider or number box; ``None``: all) as a count the tokenizer can encode and
    decode: 1..``max_tokens`` for FlexTok, exactly ``max_tokens`` for SEED."""
    name = NAMES.get(tokenizer.kind, type(tokenizer).__name__)
    top = tokenizer.max_tokens
    if tokens is None:
        return top
    count = whole_number(tokens)
    if count is None or not 1 <= count <= top:
        raise DemoInputError(f"{name} encodes 1 to {top} tokens an image; got {tokens!r}")
    if tokenizer.kind == "seed" and count != top:
        raise DemoInputError(f"SEED decodes all {top} of its tokens at once; got {count}")
    return count


def decode_steps(tokenizer, steps) -> int | None:
    """``steps`` (``None``: the model's default) as FlexTok decode steps >= 1; ``None`` for a tokenizer without."""
    if tokenizer.kind != "flextok":
        return None
    if steps is None:
        return int(tokenizer.config.timesteps)
    count = whole_number(steps)
    if count is None or count < 1:
        raise DemoInputError(f"decode steps must be a whole number >= 1, got {steps!r}")
    return count


def upscale(image: Image.Image, factor: int = DISPLAY_SCALE) -> Image.Image:
    """``image`` enlarged ``factor``× with nearest-neighbour sampling (each pixel a visible square)."""
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def reconstruct(tokenizer, image, tokens: int | None = None, steps: int | None = None,
                seed: int = SEED) -> Reconstruction:
    """Encode ``image`` (anything :func:`load_input` takes: center-cropped, resized to :data:`INPUT_SIZE`, then to
    the tokenizer's input by its ``preprocess``) at ``tokens`` tokens (``None``: all), decode it (``steps``:
    FlexTok's, ``None``: its default; the generator seeded with ``seed``) and measure it."""
    count = token_count(tokenizer, tokens)
    steps = decode_steps(tokenizer, steps)
    pixels = tokenizer.preprocess(load_input(image), resize=True)
    kwargs = {"steps": steps} if steps is not None else {}
    started = time.perf_counter()
    with torch.no_grad():
        ids = tokenizer.encode(pixels, budget=count)
        decoded = tokenizer.decode(ids, generator=torch.Generator(device=pixels.device).manual_seed(seed), **kwargs)
    ms = (time.perf_counter() - started) * 1e3
    if ids.shape[1] != count:  # the tokenizer's own budget rule disagrees with the page's count
        raise RuntimeError(f"asked for {count} tokens, the tokenizer gave {ids.shape[1]}")
    shown_in, shown_out = to_uint8(pixels)[0], to_uint8(decoded)[0]
    as_float = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    value = float(psnr(as_float(shown_in), as_float(shown_out))[0])
    return Reconstruction(image=Image.fromarray(shown_out), input=Image.fromarray(shown_in), psnr=value, tokens=count,
                          codebook_size=int(tokenizer.codebook_size), bits=count * math.log2(tokenizer.codebook_size),
                          ms=ms, steps=steps)

"""The demo's work, free of any UI: load a model, check inputs, answer at several (method, budget) pairs.

Every check raises a :class:`DemoInputError` whose message the page shows as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from .. import compress, restore
from ..adapters import get_adapter
from ..bench.data import ASSETS, BUILT_MODELS, prompt_for, resolve_model
from ..bench.run import method_arg
from .overlay import render_overlay, token_states

DEFAULT_MODEL = ASSETS / "tiny-llava"
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # unless the checkpoint's task.json names its own (prompt_for)
MAX_SIDE = 1024  # larger images are downscaled first (the processors resize anyway; this bounds decode time)


class DemoInputError(ValueError):
    """Bad input from the page: the message is shown to the user."""


@dataclasses.dataclass
class Outcome:
    method: str
    budget: float
    answer: str
    prefill_ms: float
    visual_tokens: int  # per image, layer-averaged (for encoder methods: those entering the LLM)
    visual_tokens_full: int
    flops_percent: float  # LLM prefill FLOPs relative to the uncompressed model
    overlay: Image.Image | None


@functools.lru_cache(maxsize=2)
def load_model(path: str | None = None):
    """(model, processor) from a local checkpoint directory or a model's name (default: the embedded tiny-llava;
    ``tiny-real-llava`` is built and cached on first use), left padding.

    Any checkpoint ``AutoModelForImageTextToText`` loads and an adapter supports: LLaVA-1.5, LLaVA-NeXT,
    LLaVA-OneVision (the video tab's)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        path = resolve_model(path or DEFAULT_MODEL)
    except (ModuleNotFoundError, FileNotFoundError) as err:  # a built model's source package is missing
        raise DemoInputError(str(err)) from None
    if not (path / "config.json").exists():
        raise DemoInputError(f"no model at {path}: give a local LLaVA / LLaVA-NeXT / LLaVA-OneVision checkpoint "
                             f"directory or a model's name ({', '.join(('tiny-llava', *BUILT_MODELS))})")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(path)
        get_adapter(model)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DemoInputError(f"the model at {path} did not load: {err}") from None
    processor.tokenizer.padding_side = "left"
    return model, processor


def read_image(source) -> tuple[Image.Image, str]:
    """An RGB image from a path or PIL image, downscaled to at most :data:`MAX_SIDE` pixels; and a note."""
    if source is None:
        raise DemoInputError("choose an example image or upload one")
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES  # lmms-eval sets it for the whole process on import
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut upload is an error here, never half an image
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        name = Path(str(source)).name
        raise DemoInputError(
            f"{name} is not an image this demo can read ({type(err).__name__}); upload a PNG or JPEG"
        ) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    image = image.convert("RGB")
    if max(image.size) <= MAX_SIDE:
        return image, ""
    original = image.size
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image, f"The image ({original[0]}×{original[1]}) was downscaled to {image.size[0]}×{image.size[1]}."


def _inputs(model, processor, image: Image.Image, question: str):
    prompt = prompt_for(model.name_or_path) or PROMPT
    return processor(images=[image], text=[prompt.format(question=question)], return_tensors="pt")


def _answer(model, processor, inputs, max_new_tokens: int) -> tuple[str, float]:
    with torch.no_grad():
        started = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        prefill_ms = (time.perf_counter() - started) * 1e3
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), prefill_ms


def compressed_answer(model, processor, inputs, method: str, budget: float, max_new_tokens: int):
    """``(answer, prefill ms, stats, kept indices, merged_into)`` of ``inputs`` under ``method`` (a bench spec) at
    ``budget``; the model is restored after."""
    name, options = method_arg(method, budget)
    compress(model, method=name, **options)
    try:
        answer, prefill_ms = _answer(model, processor, inputs, max_new_tokens)
        stats = model.compression.stats
        kept, merged = kept_tokens(model)
    finally:
        restore(model)
    return answer, prefill_ms, stats, kept, merged


def kept_tokens(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last call's kept token indices of its first image (and where merged ones went), for the overlay.

    Encoder methods: their selection. In-LLM methods: the visual tokens still alive after the last layer.
    """
    state = model.compression
    if state.last is not None:
        selection = state.last.selection
        merged = selection.merged_into[0] if selection.merged_into is not None else None
        return selection.kept_index[0], merged
    ctx = state.prefill.ctx
    visual = ctx.visual[0]
    return (ctx.alive[0] & visual)[visual].nonzero().squeeze(1), None


def image_layout(model, processor, image: Image.Image):
    """The :class:`~vlm_compress.adapters.base.TokenLayout` of ``image``'s visual tokens (one tower run)."""
    inputs = _inputs(model, processor, image, "")
    image_kwargs = {k: inputs[k] for k in ("image_sizes",) if k in inputs}
    return get_adapter(model).encode_images(inputs["pixel_values"], **image_kwargs)[0].layout


def run(model, processor, image: Image.Image, question: str, method: str, budget: float,
        max_new_tokens: int = 8, layout=None) -> Outcome:
    """Answer ``question`` about ``image`` with ``method`` (a bench spec such as ``fastv:layer=1``; ``"none"``:
    uncompressed) at ``budget``. ``layout``: the image's token layout, if already known (else computed)."""
    inputs = _inputs(model, processor, image, question)
    full = int((inputs["input_ids"] == get_adapter(model).image_token_id).sum())
    if method == "none":
        answer, prefill_ms = _answer(model, processor, inputs, max_new_tokens)
        return Outcome(method, 1.0, answer, prefill_ms, full, full, 100.0, None)
    answer, prefill_ms, stats, kept, merged = compressed_answer(model, processor, inputs, method, budget,
                                                                max_new_tokens)
    layout = layout if layout is not None else image_layout(model, processor, image)
    overlay = render_overlay(image, token_states(layout, kept, merged))
    return Outcome(method, budget, answer, prefill_ms, round(stats.layer_avg_visual_tokens), full,
                   100 * stats.flops_ratio, overlay)


def compare(model, processor, image, question: str, methods: list[str], budgets: list[float]
            ) -> tuple[Outcome, list[Outcome], str]:
    """The uncompressed answer, one :class:`Outcome` per (method, budget), and a note for the page."""
    image, note = read_image(image)
    question = (question or "").strip()
    if not question:
        raise DemoInputError("type a question about the image")
    if not methods or not budgets:
        raise DemoInputError("choose at least one method and one budget")
    reference = run(model, processor, image, question, "none", 1.0)
    layout = image_layout(model, processor, image)
    outcomes, skipped = [], []
    for method in methods:
        for budget in budgets:
            try:
                outcomes.append(run(model, processor, image, question, method, float(budget), layout=layout))
            except ValueError as err:  # e.g. a budget FastV cannot reach on this LLM
                skipped.append(f"{method} @ {budget}: {err}")
    notes = [note] + [f"Skipped {s}" for s in skipped]
    return reference, outcomes, "\n\n".join(n for n in notes if n)

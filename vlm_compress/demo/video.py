"""The demo's video work, free of any UI: read a clip's frames, answer at several (method, budget) pairs, draw each
run's kept tokens as a strip of frame thumbnails.

A LLaVA-OneVision video is ``F`` frames of ``n = g×g`` pooled tokens and one closing newline: frame ``f``'s token
``j`` is video token ``f·n + j``, the newline is ``F·n``. :func:`frame_states` cuts a run's kept indices (and, for
merging methods, where the other tokens went) into one grid per frame; :func:`render_strip` paints them over the
frames as :mod:`.overlay` does for images (kept as they are, merged tinted blue, dropped dark), side by side, with
each frame's token count underneath and, when the method scored frames (QuoTA), its relevance score.

The model's video processor resizes every frame to its square input itself (e.g. 96×96 for the embedded
``tiny-onevision``), so uploads of any size and aspect go in as they are decoded; the thumbnails show them squashed
to that square, as the model sees them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..adapters import get_adapter
from ..bench.data import ASSETS
from ..video import INSTALL_HINT, VideoReadError, read_video
from .compare import DemoInputError, _answer, compressed_answer
from .overlay import render_overlay, token_states

DEFAULT_VIDEO_MODEL = ASSETS / "tiny-onevision"
VIDEO_PROMPT = "USER: <video>\n{question} ASSISTANT:"
MAX_FRAMES = 32
FORMATS = "an MP4, WebM or AVI file"


@dataclasses.dataclass
class VideoOutcome:
    method: str
    budget: float
    answer: str
    prefill_ms: float  # QuoTA's scoring passes included
    visual_tokens: int  # the video's tokens entering the LLM (layer-averaged), newline included
    visual_tokens_full: int  # F·n + 1
    kept_per_frame: list[int]  # [F]
    frame_scores: list[float] | None  # [F] a frame-scoring method's relevance per frame (QuoTA), else None
    scoring_ms: float  # the method's own scoring passes (inside prefill_ms)
    strip: Image.Image | None

    @property
    def per_frame(self) -> str:
        """The kept tokens per frame, e.g. ``"0·0·20·4"``."""
        return "·".join(map(str, self.kept_per_frame))


def frame_count(value) -> int:
    """``value`` (from a slider or a number box) as a frame count in [1, :data:`MAX_FRAMES`]."""
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        count = 0
    if count != value or not 1 <= count <= MAX_FRAMES:
        raise DemoInputError(f"frames to sample must be a whole number from 1 to {MAX_FRAMES}, got {value!r}")
    return count


def read_clip(source, num_frames: int = 8) -> tuple[np.ndarray, str]:
    """Frames [F, H, W, 3] uint8 and a note for the page. ``source``: a bundled clip's frames (used as they are) or
    a video file's path (``num_frames`` sampled uniformly, first and last frame included)."""
    if source is None:
        raise DemoInputError("choose a bundled clip or upload a video")
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8 or not len(source):
            raise DemoInputError(f"a clip must be [F, H, W, 3] uint8 frames, got {source.shape} {source.dtype}")
        return source, ""
    count = frame_count(num_frames)
    name = Path(str(source)).name
    try:
        clip = read_video(str(source), count)
    except FileNotFoundError:
        raise DemoInputError(f"{name} is no longer on the server; upload it again") from None
    except VideoReadError as err:  # the decoder's reason, without its own advice and the server's upload path
        reason = str(err).split("; ")[0].replace(repr(str(source)), name).replace(str(source), name)
        reason = reason if len(reason) <= 200 else reason[:199] + "…"
        raise DemoInputError(f"{name} is not a video this demo can read ({reason}); upload {FORMATS}") from None
    except ImportError:
        raise DemoInputError(f"this server has no video decoder: {INSTALL_HINT} (decord or PyAV), then restart the "
                             "demo") from None
    times = ", ".join(f"{t:.1f}" for t in clip.timestamps)
    return clip.frames, f"{name}: {len(clip)} of its {clip.num_source_frames} frames, at {times} s."


def check_video_model(model, processor) -> None:
    """A :class:`DemoInputError` unless ``model`` and ``processor`` take videos (LLaVA-OneVision)."""
    if get_adapter(model).video_token_id is None or getattr(processor, "video_processor", None) is None:
        raise DemoInputError(f"this model ({type(model).__name__}) takes no videos: give a LLaVA-OneVision "
                             f"checkpoint directory, such as {DEFAULT_VIDEO_MODEL}")


def _inputs(processor, frames: np.ndarray, question: str):
    return processor(videos=[frames], text=[VIDEO_PROMPT.format(question=question)], return_tensors="pt")


def video_layout(model, processor, frames: np.ndarray):
    """The single-grid :class:`~vlm_compress.adapters.base.TokenLayout` of one frame's pooled tokens (one tower
    run over ``frames`` [F, H, W, 3])."""
    inputs = _inputs(processor, frames, "")
    with torch.no_grad():
        return get_adapter(model).encode_videos(inputs["pixel_values_videos"])[0].frames.layout


def frame_states(layout, frames: int, kept_index: torch.Tensor, merged_into: torch.Tensor | None = None
                 ) -> list[np.ndarray]:
    """``[rows, cols]`` uint8 states (see :func:`~.overlay.token_states`) of each of ``frames`` frames.

    ``kept_index`` [k]: indices over the video's ``frames·n + 1`` tokens (the newline ``frames·n`` has no cell);
    ``merged_into`` [frames·n + 1]: per token the output slot it went to (-1: dropped), or None."""
    n = layout.num_tokens
    kept_index = torch.as_tensor(kept_index, dtype=torch.long).cpu()
    out = []
    for f in range(frames):
        mine = kept_index[(kept_index >= f * n) & (kept_index < (f + 1) * n)] - f * n
        merged = None if merged_into is None else torch.as_tensor(merged_into).cpu()[f * n:(f + 1) * n]
        out.append(token_states(layout, mine, merged)[0])
    return out


def render_strip(frames: np.ndarray, states: list[np.ndarray], counts: list[int], scores: list[float] | None = None,
                 thumb: int = 144, gap: int = 4) -> Image.Image:
    """``frames`` [F, H, W, 3] as ``thumb``-pixel squares side by side, each with its ``states`` painted over it
    and, underneath, its token count (``counts`` [F]) and relevance score (``scores`` [F], if any).
    Width ``F·thumb + (F-1)·gap``."""
    font = ImageFont.load_default(size=13)
    label = 36 if scores is not None else 20
    width = len(frames) * thumb + (len(frames) - 1) * gap
    canvas = Image.new("RGB", (width, thumb + label), "white")
    draw = ImageDraw.Draw(canvas)
    for f, (frame, grid) in enumerate(zip(frames, states)):
        x = f * (thumb + gap)
        image = Image.fromarray(frame).convert("RGB").resize((thumb, thumb), Image.BILINEAR)
        canvas.paste(render_overlay(image, {0: grid}, min_side=0), (x, 0))
        lines = [f"#{f + 1}: {counts[f]} tok"] + ([f"score {scores[f]:.2f}"] if scores is not None else [])
        for i, line in enumerate(lines):
            draw.text((x + thumb / 2, thumb + 3 + 16 * i), line, fill="black", font=font, anchor="mt")
    return canvas


def _counts(layout, frames: int, kept_index: torch.Tensor) -> list[int]:
    n = layout.num_tokens
    kept_index = torch.as_tensor(kept_index).cpu()
    return [int(((kept_index >= f * n) & (kept_index < (f + 1) * n)).sum()) for f in range(frames)]


def run_video(model, processor, frames: np.ndarray, question: str, method: str, budget: float,
              max_new_tokens: int = 8, layout=None) -> VideoOutcome:
    """Answer ``question`` about ``frames`` [F, H, W, 3] with ``method`` (a bench spec such as
    ``quota:assign=uniform``; ``"none"``: uncompressed) at ``budget``. ``layout``: the frames' token layout, if
    already known (else computed)."""
    inputs = _inputs(processor, frames, question)
    full = int((inputs["input_ids"] == get_adapter(model).video_token_id).sum())
    if method == "none":
        answer, prefill_ms = _answer(model, processor, inputs, max_new_tokens)
        layout = layout if layout is not None else video_layout(model, processor, frames)
        return VideoOutcome(method, 1.0, answer, prefill_ms, full, full, [layout.num_tokens] * len(frames), None,
                            0.0, None)
    answer, prefill_ms, stats, kept, merged = compressed_answer(model, processor, inputs, method, budget,
                                                                max_new_tokens)
    layout = layout if layout is not None else video_layout(model, processor, frames)
    counts = stats.kept_per_frame[0] if stats.kept_per_frame else _counts(layout, len(frames), kept)
    scores = stats.frame_scores[0] if stats.frame_scores else None
    strip = render_strip(frames, frame_states(layout, len(frames), kept, merged), counts, scores)
    return VideoOutcome(method, budget, answer, prefill_ms, round(stats.layer_avg_visual_tokens), full, list(counts),
                        None if scores is None else list(scores), stats.scoring_ms, strip)


def compare_video(model, processor, source, question: str, methods: list[str], budgets: list[float],
                  num_frames: int = 8) -> tuple[VideoOutcome, list[VideoOutcome], str]:
    """The uncompressed answer, one :class:`VideoOutcome` per (method, budget), and a note for the page.
    ``source``: a bundled clip's frames [F, H, W, 3] uint8 or a video file's path (``num_frames`` sampled)."""
    question = (question or "").strip()
    if not question:
        raise DemoInputError("type a question about the video")
    if not methods or not budgets:
        raise DemoInputError("choose at least one method and one budget")
    check_video_model(model, processor)
    frames, note = read_clip(source, num_frames)
    layout = video_layout(model, processor, frames)
    reference = run_video(model, processor, frames, question, "none", 1.0, layout=layout)
    outcomes, skipped = [], []
    for method in methods:
        for budget in budgets:
            try:
                outcomes.append(run_video(model, processor, frames, question, method, float(budget), layout=layout))
            except ValueError as err:  # e.g. an option this method does not take
                skipped.append(f"{method} @ {budget}: {err}")
    notes = [note] + [f"Skipped {s}" for s in skipped]
    return reference, outcomes, "\n\n".join(n for n in notes if n)

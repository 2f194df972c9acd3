"""The Gradio page, three tabs: an image or a video and a question, several methods × budgets side by side with the
uncompressed answer; and an image through two discrete image tokenizers.

    vlm-compress demo                       # the embedded tiny-llava / tiny-onevision on http://127.0.0.1:7860
    vlm-compress demo --model PATH --video-model PATH --port 7861
    vlm-compress demo --model tiny-real-llava   # DINOv2-S + SmolLM2-135M (also offered in the image tab's model list)
    vlm-compress demo --flextok PATH --seed-tokenizer PATH   # the Tokenizers tab's models (save_pretrained folders)

Image: one overlay per (method, budget) with the kept patches. Video: a bundled ShapesVideo clip or an upload
(``--video-model``: a LLaVA-OneVision checkpoint), one strip of frame thumbnails per (method, budget) with each
frame's kept patches, token count and, for QuoTA, relevance score. Tokenizers: a bundled 64×64 scene or an upload
(center-cropped, resized to 64×64), FlexTok's reconstruction at a chosen token count and SEED's from its 32 tokens,
each with its PSNR, bits and time (decoding seeded: the page is reproducible). Binds to 127.0.0.1 unless told
otherwise; Gradio's analytics are off.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from ..bench.data import BUILT_MODELS, built_model_available  # noqa: E402
from .compare import DEFAULT_MODEL, DemoInputError, compare, load_model  # noqa: E402
from .examples import example_clips, example_images  # noqa: E402
from .tokenize import (  # noqa: E402
    DEFAULT_FLEXTOK,
    DEFAULT_SEED,
    DISPLAY_SCALE,
    INPUT_SIZE,
    NAMES,
    TOKEN_COUNTS,
    default_steps,
    example_scenes,
    load_input,
    load_visual_tokenizer,
    reconstruct,
    upscale,
)
from .video import DEFAULT_VIDEO_MODEL, MAX_FRAMES, compare_video  # noqa: E402

METHODS = ["random", "cls_attn", "fopru", "mustdrop", "visionzip", "fastv:layer=1", "mustdrop_llm", "atp"]
BUDGETS = ["0.5", "0.33", "0.22", "0.11"]
COLUMNS = ["method", "budget", "answer", "prefill ms", "visual tokens", "of", "LLM FLOPs %"]
VIDEO_METHODS = ["quota", "quota:assign=uniform", "quota:within=cls_attn", "cls_attn", "random", "pool"]
VIDEO_BUDGETS = ["0.5", "0.25", "0.1"]
VIDEO_COLUMNS = ["method", "budget", "answer", "prefill ms", "visual tokens", "of", "tokens per frame", "scoring ms"]
# the gallery crops its thumbnails to squares and lays label and captions over them: show each wide frame strip
# whole, below the label, with its caption under it
CSS = """
#video-strips .grid-wrap { padding-top: var(--size-8); }
#video-strips .thumbnail-item { aspect-ratio: auto; height: auto; }
#video-strips .thumbnail-item img { height: auto; object-fit: contain; }
#video-strips .caption-label { position: static; max-width: none; opacity: 1; border: none; }
"""


def bench_plots() -> list[str]:
    """The recorded bench curves (accuracy and prefill time vs budget) found under ``eval/results``."""
    roots = [Path.cwd() / "eval" / "results", Path(__file__).resolve().parents[2] / "eval" / "results"]
    for root in roots:
        plots = sorted(str(p) for p in root.glob("bench_tiny-llava*_*.png")) if root.is_dir() else []
        if plots:
            return plots
    return []


def _failure(err: Exception, label: str = "Error") -> str:
    """The status line for a failed run: the input error as it is, anything else as a failed run (logged)."""
    if isinstance(err, DemoInputError):
        return f"**{label}:** {err}"
    logging.getLogger(__name__).exception("demo run failed", exc_info=err)
    return f"**{label}:** the run failed ({type(err).__name__}: {err})"


def image_models(model_path: str | None = None) -> list[str]:
    """The image tab's model choices: the embedded tiny-llava, the built models whose packages are installed
    (tiny-real-llava: built and cached on first use), and ``model_path`` if given."""
    names = [DEFAULT_MODEL.name, *(m for m in BUILT_MODELS if built_model_available(m))]
    return names + ([str(model_path)] if model_path and str(model_path) not in names else [])


def image_tab(gr, model_path: str | None) -> None:
    """The image tab: an example or uploaded image, one overlay per (method, budget)."""
    examples = example_images()

    def answer(example, upload, question, methods, budgets, path):
        try:
            model, processor = load_model(path or model_path)
            source = upload if upload is not None else examples.get(example)
            reference, outcomes, note = compare(model, processor, source, question, list(methods or []),
                                                [float(b) for b in budgets or []])
        except Exception as err:  # a bug or an odd checkpoint: say so in the page, keep the server up
            return _failure(err), "", [], []
        rows = [[o.method, o.budget, o.answer, round(o.prefill_ms, 1), o.visual_tokens, o.visual_tokens_full,
                 round(o.flops_percent, 1)] for o in outcomes]
        gallery = [(o.overlay, f"{o.method} @ {o.budget}: {o.answer}") for o in outcomes]
        full = f"**Uncompressed answer:** {reference.answer} ({reference.prefill_ms:.1f} ms prefill, " \
               f"{reference.visual_tokens} visual tokens)"
        return note, full, rows, gallery

    with gr.Row():
        with gr.Column():
            example = gr.Radio(list(examples), value=next(iter(examples), None), label="Example image")
            upload = gr.File(label="…or upload an image", file_types=None, type="filepath", elem_id="upload")
            question = gr.Textbox(label="Question", value="what color is the circle ?")
            methods = gr.CheckboxGroup(METHODS, value=["cls_attn"], label="Methods")
            budgets = gr.CheckboxGroup(BUDGETS, value=["0.5", "0.22"], label="Budgets (share of visual tokens)")
            path = gr.Dropdown(image_models(model_path), value=str(model_path or DEFAULT_MODEL.name),
                               allow_custom_value=True, label="Model (a name, or a local checkpoint directory)")
            run = gr.Button("Run", variant="primary", elem_id="run")
        with gr.Column():
            status = gr.Markdown(elem_id="status")
            reference = gr.Markdown(elem_id="reference")
            table = gr.Dataframe(headers=COLUMNS, elem_id="results", interactive=False)
            gallery = gr.Gallery(label="Overlays", elem_id="overlays", columns=2, height="auto")
    run.click(answer, [example, upload, question, methods, budgets, path], [status, reference, table, gallery])


def clip_note(label: str, sample) -> str:
    """What a bundled clip should be answered with, and where its answer is (ShapesVideo's key frames)."""
    keys = ", ".join(f"#{f + 1}" for f in sample.key_frames) or "none"
    return f"{label}: the expected answer is **{sample.answer}** (frames holding it: {keys})."


def video_tab(gr, model_path: str | None) -> None:
    """The video tab: a bundled clip or an uploaded video, one strip of frame thumbnails per (method, budget)."""
    clips = example_clips()
    first = next(iter(clips.values()), None)

    def answer(clip, upload, question, methods, budgets, frames, path):
        try:
            model, processor = load_model(path or model_path or str(DEFAULT_VIDEO_MODEL))
            source = upload if upload is not None else getattr(clips.get(clip), "frames", None)
            reference, outcomes, note = compare_video(model, processor, source, question, list(methods or []),
                                                      [float(b) for b in budgets or []], frames)
        except Exception as err:  # a bug or an odd checkpoint: say so in the page, keep the server up
            return _failure(err), "", [], []
        if upload is None:
            note = "\n\n".join(n for n in (clip_note(clip, clips[clip]), note) if n)
        rows = [[o.method, o.budget, o.answer, round(o.prefill_ms, 1), o.visual_tokens, o.visual_tokens_full,
                 o.per_frame, round(o.scoring_ms, 1)] for o in outcomes]
        gallery = [(o.strip, f"{o.method} @ {o.budget}: {o.answer}") for o in outcomes]
        full = f"**Uncompressed answer:** {reference.answer} ({reference.prefill_ms:.1f} ms prefill, " \
               f"{len(reference.kept_per_frame)} frames × {reference.kept_per_frame[0]} + 1 = " \
               f"{reference.visual_tokens} visual tokens)"
        return note, full, rows, gallery

    with gr.Row():
        with gr.Column(scale=2):
            clip = gr.Radio(list(clips), value=next(iter(clips), None), label="Bundled clip", elem_id="video-clip")
            upload = gr.File(label="…or upload a video (MP4, WebM, AVI)", file_types=None, type="filepath",
                             elem_id="video-upload")
            question = gr.Textbox(label="Question about the video", value=first.question if first else "",
                                  elem_id="video-question")
            methods = gr.CheckboxGroup(VIDEO_METHODS, value=VIDEO_METHODS[:2], label="Methods",
                                       elem_id="video-methods")
            budgets = gr.CheckboxGroup(VIDEO_BUDGETS, value=["0.25", "0.1"], label="Budgets (share of visual tokens)",
                                       elem_id="video-budgets")
            frames = gr.Slider(1, MAX_FRAMES, value=8, step=1, label="Frames to sample from an upload",
                               elem_id="video-frames")
            path = gr.Textbox(label="Video model (local LLaVA-OneVision checkpoint directory)",
                              value=str(model_path or DEFAULT_VIDEO_MODEL), elem_id="video-model")
            run = gr.Button("Run", variant="primary", elem_id="video-run")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id="video-status")
            reference = gr.Markdown(elem_id="video-reference")
    table = gr.Dataframe(headers=VIDEO_COLUMNS, elem_id="video-results", interactive=False)
    gallery = gr.Gallery(label="Kept tokens per frame (under each frame: its tokens and, for QuoTA, its relevance)",
                         elem_id="video-strips", columns=1, height="auto", object_fit="contain")
    clip.change(lambda label: clips[label].question if label in clips else gr.skip(), clip, question)
    run.click(answer, [clip, upload, question, methods, budgets, frames, path], [status, reference, table, gallery])


def tokenizer_tab(gr, flextok_path: str | None, seed_path: str | None) -> None:
    """The tokenizers tab: a bundled scene or an upload, FlexTok at a chosen token count and SEED side by side."""
    scenes = example_scenes()
    flextok_path, seed_path = str(flextok_path or DEFAULT_FLEXTOK), str(seed_path or DEFAULT_SEED)
    steps_default = default_steps(flextok_path)
    labels = {"flextok": "FlexTok reconstruction", "seed": "SEED reconstruction"}

    def answer(scene, upload, tokens, steps, flex_path, seed_path_):
        empty = [gr.update(value=None, label=labels[k]) for k in labels]
        try:
            image = load_input(upload if upload is not None else scenes.get(scene))
        except Exception as err:  # a bug or an odd file: say so in the page, keep the server up
            return _failure(err), None, *empty, ""
        shown, images, lines, errors = None, [], [], []
        runs = (("flextok", flex_path or flextok_path, tokens, steps), ("seed", seed_path_ or seed_path, None, None))
        for kind, path, count, decode_steps in runs:
            try:
                result = reconstruct(load_visual_tokenizer(str(path), kind), image, count, decode_steps)
            except Exception as err:  # one model failing leaves the other on the page
                errors.append(_failure(err, f"{NAMES[kind]}: error"))
                images.append(gr.update(value=None, label=labels[kind]))
                continue
            shown = result.input if shown is None else shown
            images.append(gr.update(value=upscale(result.image),
                                    label=f"{NAMES[kind]}, {result.count}: {result.psnr:.2f} dB"))
            lines.append(result.summary(NAMES[kind]))
        shown = upscale(Image.fromarray(image) if shown is None else shown)
        return "\n\n".join(errors), shown, *images, "\n\n".join(lines)

    with gr.Row():
        with gr.Column(scale=1):
            scene = gr.Radio(list(scenes), value=next(iter(scenes), None), label="Bundled scene (test split)",
                             elem_id="tok-scene")
            upload = gr.File(label="…or upload an image", file_types=None, type="filepath", elem_id="tok-upload")
            gr.Markdown(f"Uploads of any size are center-cropped to a square and resized to "
                        f"{INPUT_SIZE}×{INPUT_SIZE}, the tokenizers' input. Images are shown enlarged "
                        f"×{DISPLAY_SCALE} (nearest neighbour). "
                        "Decoding is seeded (seed 0), so a run always gives the same page.")
            tokens = gr.Radio([str(c) for c in TOKEN_COUNTS], value="16", label="FlexTok tokens (SEED always "
                              "decodes all of its tokens: 32 for tiny-seed)", elem_id="tok-count")
            steps = gr.Slider(1, max(100, steps_default), value=steps_default, step=1,
                              label=f"FlexTok decode steps (the model's default: {steps_default})", elem_id="tok-steps")
            flex_path = gr.Textbox(label="FlexTok (local tokenizer folder or embedded name)", value=flextok_path,
                                   elem_id="tok-flextok-path")
            seed_path_box = gr.Textbox(label="SEED (local tokenizer folder or embedded name)", value=seed_path,
                                       elem_id="tok-seed-path")
            run = gr.Button("Run", variant="primary", elem_id="tok-run")
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id="tok-status")
            with gr.Row():
                shown = gr.Image(label=f"Input, as the tokenizers see it (×{DISPLAY_SCALE})", type="pil", format="png",
                                 interactive=False, elem_id="tok-input")
                flex_image = gr.Image(label=labels["flextok"], type="pil", format="png", interactive=False,
                                      elem_id="tok-flextok")
                seed_image = gr.Image(label=labels["seed"], type="pil", format="png", interactive=False,
                                      elem_id="tok-seed")
            summary = gr.Markdown(elem_id="tok-summary")
    run.click(answer, [scene, upload, tokens, steps, flex_path, seed_path_box],
              [status, shown, flex_image, seed_image, summary])


def build(model_path: str | None = None, video_model_path: str | None = None, flextok_path: str | None = None,
          seed_path: str | None = None):
    """The ``gr.Blocks`` app: an Image tab (``model_path``, default tiny-llava), a Video tab (``video_model_path``,
    default tiny-onevision) and a Tokenizers tab (``flextok_path`` / ``seed_path``: tokenizer folders, default the
    embedded tiny-flextok / tiny-seed; loaded on the first run)."""
    import gradio as gr

    with gr.Blocks(title="vlm-compress", analytics_enabled=False) as app:
        gr.Markdown("# vlm-compress: visual-token compression, side by side\nKept patches as they are, merged ones "
                    "blue, dropped ones dark. In-LLM methods show the tokens alive after the last layer.")
        with gr.Tab("Image", elem_id="image-tab"):
            image_tab(gr, model_path)
        with gr.Tab("Video", elem_id="video-tab"):
            video_tab(gr, video_model_path)
        with gr.Tab("Tokenizers", elem_id="tokenizers-tab"):
            tokenizer_tab(gr, flextok_path, seed_path)
        plots = bench_plots()
        if plots:
            with gr.Accordion("Recorded benchmark curves (eval/results)", open=False):
                gr.Gallery(plots, columns=2, height="auto", show_label=False)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-compress demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the image tab's model: a local checkpoint directory or a name (default: the "
                                        "embedded tiny-llava; tiny-real-llava is offered beside it)")
    parser.add_argument("--video-model", help="the video tab's local LLaVA-OneVision checkpoint directory "
                                              "(default: the embedded tiny-onevision)")
    parser.add_argument("--flextok", help="the tokenizers tab's FlexTok: a local tokenizer folder (save_pretrained) "
                                          "or an embedded name (default: tiny-flextok)")
    parser.add_argument("--seed-tokenizer", help="the tokenizers tab's SEED: a local tokenizer folder "
                                                 "(save_pretrained) or an embedded name (default: tiny-seed)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build(args.model, args.video_model, args.flextok, args.seed_tokenizer).launch(
        server_name=args.host, server_port=args.port, show_error=True, css=CSS)


if __name__ == "__main__":
    main()

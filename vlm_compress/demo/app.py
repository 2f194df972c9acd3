"""The Gradio page: one image and question, several methods × budgets side by side with the uncompressed answer.

    vlm-compress demo                       # the embedded tiny-llava on http://127.0.0.1:7860
    vlm-compress demo --model PATH --port 7861

Binds to 127.0.0.1 unless told otherwise; Gradio's analytics are off.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from .compare import DEFAULT_MODEL, DemoInputError, compare, load_model  # noqa: E402
from .examples import example_images  # noqa: E402

METHODS = ["random", "cls_attn", "fopru", "mustdrop", "visionzip", "fastv:layer=1", "mustdrop_llm", "atp"]
BUDGETS = ["0.5", "0.33", "0.22", "0.11"]
COLUMNS = ["method", "budget", "answer", "prefill ms", "visual tokens", "of", "LLM FLOPs %"]


def bench_plots() -> list[str]:
    """The recorded bench curves (accuracy and prefill time vs budget) found under ``eval/results``."""
    roots = [Path.cwd() / "eval" / "results", Path(__file__).resolve().parents[2] / "eval" / "results"]
    for root in roots:
        plots = sorted(str(p) for p in root.glob("bench_tiny-llava*_*.png")) if root.is_dir() else []
        if plots:
            return plots
    return []


def build(model_path: str | None = None):
    """The ``gr.Blocks`` app."""
    import gradio as gr

    examples = example_images()

    def answer(example, upload, question, methods, budgets, path):
        try:
            model, processor = load_model(path or model_path)
            source = upload if upload is not None else examples.get(example)
            reference, outcomes, note = compare(model, processor, source, question, list(methods or []),
                                                [float(b) for b in budgets or []])
        except DemoInputError as err:
            return f"**Error:** {err}", "", [], []
        except Exception as err:  # a bug or an odd checkpoint: say so in the page, keep the server up
            logging.getLogger(__name__).exception("demo run failed")
            return f"**Error:** the run failed ({type(err).__name__}: {err})", "", [], []
        rows = [[o.method, o.budget, o.answer, round(o.prefill_ms, 1), o.visual_tokens, o.visual_tokens_full,
                 round(o.flops_percent, 1)] for o in outcomes]
        gallery = [(o.overlay, f"{o.method} @ {o.budget}: {o.answer}") for o in outcomes]
        full = f"**Uncompressed answer:** {reference.answer} ({reference.prefill_ms:.1f} ms prefill, " \
               f"{reference.visual_tokens} visual tokens)"
        return note, full, rows, gallery

    with gr.Blocks(title="vlm-compress", analytics_enabled=False) as app:
        gr.Markdown("# vlm-compress: visual-token compression, side by side\nKept patches as they are, merged ones "
                    "blue, dropped ones dark. In-LLM methods show the tokens alive after the last layer.")
        with gr.Row():
            with gr.Column():
                example = gr.Radio(list(examples), value=next(iter(examples), None), label="Example image")
                upload = gr.File(label="…or upload an image", file_types=None, type="filepath", elem_id="upload")
                question = gr.Textbox(label="Question", value="what color is the circle ?")
                methods = gr.CheckboxGroup(METHODS, value=["cls_attn"], label="Methods")
                budgets = gr.CheckboxGroup(BUDGETS, value=["0.5", "0.22"], label="Budgets (share of visual tokens)")
                path = gr.Textbox(label="Model (local checkpoint directory)", value=str(model_path or DEFAULT_MODEL))
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                reference = gr.Markdown(elem_id="reference")
                table = gr.Dataframe(headers=COLUMNS, elem_id="results", interactive=False)
                gallery = gr.Gallery(label="Overlays", elem_id="overlays", columns=2, height="auto")
        plots = bench_plots()
        if plots:
            with gr.Accordion("Recorded benchmark curves (eval/results)", open=False):
                gr.Gallery(plots, columns=2, height="auto", show_label=False)
        run.click(answer, [example, upload, question, methods, budgets, path], [status, reference, table, gallery])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlm-compress demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local checkpoint directory (default: the embedded tiny-llava)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    build(args.model).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()

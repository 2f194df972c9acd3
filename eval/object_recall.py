"""How many of a scene's object patches an encoder method keeps: its selection against the scene's ground truth.

    python eval/object_recall.py                                  # tiny-real-llava (DINOv2-S), budget 0.2
    python eval/object_recall.py --model tiny-llava --budget 0.2 0.11 --methods cls_attn random

On ShapesVQA each object fills one cell of the scene grid; a visual token shows an object when its patch overlaps
that cell (``bench.oracle.tokens_showing``, the oracle row's rule). Per method and budget, over ``--samples`` held-out
scenes: ``recall`` = object tokens kept / object tokens (all objects of the scene), ``asked_recall`` = the same for
the objects the question names (``bench.oracle.asked_objects``), and ``all_kept`` = the share of scenes whose every
object token was kept. ``random`` keeps a uniform draw, so its expected recall is the kept share itself; DINOv2's CLS
attention is reported to be object-centric (Caron et al., arXiv 2104.14294, §4.2; Oquab et al., arXiv 2304.07193).
The selection does not depend on the trained part of tiny-real-llava (the tower is frozen), only on the tower.

Writes ``eval/results/object_recall_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlm_compress import compress, restore
from vlm_compress.adapters import get_adapter
from vlm_compress.bench.data import prompt_for, resolve_model, shapes_items, task_for
from vlm_compress.bench.oracle import asked_objects, object_boxes, tokens_showing
from vlm_compress.bench.run import load_model, method_arg

RESULTS = Path(__file__).resolve().parent / "results"


def object_tokens(layout, items) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per item ``[N]`` bool masks of the tokens showing any object, and those showing the asked objects."""
    every, asked = [], []
    for item in items:
        every.append(tokens_showing(layout, object_boxes(item.objects, item.grid)))
        asked.append(tokens_showing(layout, object_boxes(asked_objects(item.question, item.objects, item.grid),
                                                         item.grid)))
    return every, asked


@torch.no_grad()
def recall(model, processor, items, prompt: str, method: str, budget: float, batch_size: int) -> dict:
    """Recall of ``method`` at ``budget`` over ``items`` (one prefill forward per batch; nothing generated)."""
    name, options = method_arg(method, budget)
    kept_objects = objects = kept_asked = asked_total = complete = kept_tokens = tokens = 0
    compress(model, method=name, **options)
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            inputs = processor(images=[i.image for i in batch], text=[prompt.format(question=i.question) for i in batch],
                               return_tensors="pt", padding=True)
            model(**inputs, logits_to_keep=1)
            selection = model.compression.last.selection
            layout = get_adapter(model).encode_images(inputs["pixel_values"][:1])[0].layout
            every, asked = object_tokens(layout, batch)
            for row, (obj, ask) in enumerate(zip(every, asked)):
                keep = torch.zeros(layout.num_tokens, dtype=torch.bool)
                keep[selection.kept_index[row]] = True
                kept_objects += int((keep & obj).sum())
                objects += int(obj.sum())
                kept_asked += int((keep & ask).sum())
                asked_total += int(ask.sum())
                complete += bool((keep | ~obj).all())
                kept_tokens += int(keep.sum())
                tokens += layout.num_tokens
    finally:
        restore(model)
    return dict(method=method, budget=budget, recall=kept_objects / objects, asked_recall=kept_asked / max(asked_total, 1),
                all_kept=complete / len(items), kept_share=kept_tokens / tokens, object_share=objects / tokens)


def to_markdown(result: dict) -> str:
    lines = [f"# Object-patch recall: {result['model']}", "",
             f"`{result['command']}` — {result['samples']} held-out ShapesVQA scenes, {result['seconds']} s.", "",
             "| method | budget | kept share | recall (all objects) | recall (asked objects) | scenes with every object kept |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['budget']} | {r['kept_share']:.3f} | {r['recall']:.3f} | "
                     f"{r['asked_recall']:.3f} | {r['all_kept']:.3f} |")
    lines += ["", f"Object tokens are {result['rows'][0]['object_share']:.3f} of the visual tokens."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-real-llava", help="a checkpoint directory or a model's name")
    parser.add_argument("--methods", nargs="+", default=["cls_attn", "random", "visionzip", "fopru", "hired"])
    parser.add_argument("--budget", type=float, nargs="+", default=[0.2])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="output stem (default: eval/results/object_recall_<model>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    path = resolve_model(args.model)
    model, processor = load_model(path, torch.device("cpu"), torch.float32)
    items = shapes_items(args.samples, "test", task_for(path, model.config))
    prompt = prompt_for(path) or "USER: <image>\n{question} ASSISTANT:"
    rows = [recall(model, processor, items, prompt, m, b, args.batch_size) for b in args.budget for m in args.methods]
    label = args.model if not Path(args.model).exists() else path.name
    result = dict(command="python eval/object_recall.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                  model=label, samples=len(items), seconds=round(time.time() - started, 1), rows=rows)
    stem = Path(args.out) if args.out else RESULTS / f"object_recall_{label}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()

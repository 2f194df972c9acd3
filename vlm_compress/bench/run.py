"""The benchmark: every method × budget on the embedded model and held-out set, accuracy beside speed and cost.

    python -m vlm_compress.bench                  # the embedded models: every method, budgets 1.0 … 0.11
                                                  # (tiny-onevision: the video methods, budgets 1.0 … 0.1)
    python -m vlm_compress.bench --quick          # 1-minute smoke run
    python -m vlm_compress.bench --model tiny-real-llava   # DINOv2-S + SmolLM2-135M, built once from installed packages
    python -m vlm_compress.bench --model PATH --dataset items.jsonl --prompt "USER: <image>\\n{question} ASSISTANT:"

Writes ``<out>.json``, ``<out>.md`` and ``<out>_accuracy.png`` / ``<out>_prefill.png`` under ``eval/results/``.
Each row is appended to ``<out>.rows.jsonl`` the moment it finishes, so an interrupted run keeps what it measured
and ``--resume`` continues it; a row that raises is recorded as an error row, the run goes on, and the command exits
non-zero at the end naming the failed rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .. import compress, get_method, list_methods, restore
from ..adapters import get_adapter
from ..modules.pmod import is_pmod_checkpoint, load_pmod_model, pmod_base
from ..pruners.pmod import EMBEDDED_ROUTERS
from ..stats import prompt_costs
from .video_task import ShapesVideoTask
from .data import (ASSETS, BUILT_MODELS, EMBEDDED_MODELS, Item, answer_prior, built_model_available, jsonl_items,
                   prompt_for, resolve_model, shapes_items, task_for, video_items)
from .oracle import OraclePruner, asked_objects, object_boxes
from .rowlog import RowLog, SettingsMismatch
from .timing import PeakMemory, decode_ms_per_token, machine_description, timed

BUDGETS = (1.0, 0.5, 0.33, 0.22, 0.11)
# every encoder method, then the in-LLM and decode ones (MustDrop also as its three stages stacked); FastV also at
# K=1, which the 4-layer embedded LLMs need to reach budgets below 0.5 (budgets a method cannot reach are skipped,
# with the reason, in the JSON)
IN_LLM_METHODS = ("fastv", "fastv:layer=1", "dart", "dart:layer=1", "mustdrop_llm", "mustdrop+mustdrop_llm", "atp",
                  "atp:heads=None", "h2o")
# the oracle ceiling first (bench/oracle.py: the tokens showing the objects a question names, then CLS attention)
DEFAULT_METHODS = ["oracle", *(m for m in list_methods("encoder") if m != "quota"), *IN_LLM_METHODS]
# budget="auto" (each image's count from the method's own scores) is one more row of every score-based method,
# plotted at the mean budget it chose
AUTO_BUDGET = "auto"
# a video model: QuoTA against the uniform split of the same within-frame reduction (bilinear; cls_attn), the
# baselines, QuoTA without its decoupling pass, and QuoTA with a separate image scorer as in the reference (the
# embedded tiny-llava, asked in the presence wording it was trained on)
TINY_LLAVA_SCORER = "scorer=tiny-llava,entity_template=is there a {entities} ?"
VIDEO_METHODS = ["quota", "quota:assign=uniform", "quota:within=cls_attn", "cls_attn", "random", "pool",
                 "quota:decouple=False", f"quota:{TINY_LLAVA_SCORER}",
                 f"quota:within=cls_attn,{TINY_LLAVA_SCORER}"]
VIDEO_BUDGETS = (1.0, 0.5, 0.25, 0.1)
RESULTS = Path.cwd() / "eval" / "results"


@dataclasses.dataclass
class Row:
    method: str
    budget: float | str  # "auto": the method chose each image's count (layer_avg_visual_tokens holds the mean)
    accuracy: float
    accuracy_retained: float
    agreement: float
    llm_visual_tokens: float  # per image, entering the LLM
    layer_avg_visual_tokens: float
    prefill_ms: float
    decode_ms_per_token: float
    prefill_gflops: float  # per sample
    kv_cache_mb: float  # per sample
    select_ms: float  # per image
    peak_mem_mb: float
    per_type: dict[str, float]
    scoring_ms: float = 0.0  # per sample: a method's own scoring passes (QuoTA), inside prefill_ms and select_ms
    scoring_gflops: float = 0.0  # per sample


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype):
    """A local image-text-to-text checkpoint (LLaVA, LLaVA-NeXT, …) and its processor, padding on the left."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if is_pmod_checkpoint(path):  # routers + decoder deltas over a base checkpoint
        model = load_pmod_model(path, dtype=dtype).to(device)
        processor = AutoProcessor.from_pretrained(pmod_base(path))
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cls_attn:layer=-1,kind=logits"`` → ``("cls_attn", {"layer": -1, "kind": "logits"})``."""
    import ast

    name, _, options = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method option {item!r} in {spec!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name, kwargs


def method_arg(spec: str, budget: float | int) -> tuple[str | list, dict[str, Any]]:
    """``compress``'s ``method`` and keyword options for a bench spec at ``budget``.

    ``"a+b:opt=1"`` stacks stages, each part with its own options (``"mustdrop+mustdrop_llm"`` is MustDrop's three
    stages). Each of ``k`` stacked stages keeps ``budget^(1/k)`` of what reaches it, so a float budget stays the
    layer-averaged share of the whole stack (an int budget goes to every stage as it is).
    """
    if "+" not in spec:
        name, options = parse_method(spec)
        if name == "oracle":
            return OraclePruner(budget=budget, **options), {}
        return name, {"budget": budget, **options}
    parts = spec.split("+")
    share = budget ** (1 / len(parts)) if isinstance(budget, float) else budget
    stack: list = []
    for part in parts:
        name, options = parse_method(part)
        stack.append(get_method(name).create(budget=share, **options))
    return stack, {}


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after normalising, on as many leading words as the answer has (generation may run on)."""
    words = normalise(answer).split()
    return prediction.split()[: len(words)] == words


class Runner:
    def __init__(self, model, processor, items: list[Item], prompt: str, batch_size: int, max_new_tokens: int):
        self.model, self.processor, self.items = model, processor, items
        self.prompt, self.batch_size, self.max_new_tokens = prompt, batch_size, max_new_tokens
        self.device = next(model.parameters()).device
        self.batches = [self._encode(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]

    def _encode(self, items: list[Item]):
        text = [self.prompt.format(question=i.question) for i in items]
        if items[0].video is not None:
            inputs = self.processor(videos=[i.video for i in items], text=text, return_tensors="pt", padding=True)
        else:
            inputs = self.processor(images=[i.image for i in items], text=text, return_tensors="pt", padding=True)
        return inputs.to(self.device)

    def one_by_one(self) -> "Runner":
        """The same items at batch size 1 (the oracle's boxes are set per call)."""
        return Runner(self.model, self.processor, self.items, self.prompt, 1, self.max_new_tokens)

    def answers(self, before: Any = None) -> tuple[list[str], dict[str, float]]:
        """Greedy answers for all items, and the compression stats summed over batches (empty if uncompressed).
        ``before(items)`` runs before each batch with that batch's items."""
        out, totals = [], {}
        for start, inputs in zip(range(0, len(self.items), self.batch_size), self.batches):
            if before is not None:
                before(self.items[start : start + self.batch_size])
            width = inputs["input_ids"].shape[1]
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            out += [normalise(t) for t in self.processor.batch_decode(ids[:, width:], skip_special_tokens=True)]
            state = getattr(self.model, "compression", None)
            batch = state.stats if state is not None and state.stats is not None else self._uncompressed(inputs)
            for key in ("images", "visual_tokens_kept", "prefill_flops", "kv_cache_bytes", "select_ms", "scoring_ms",
                        "scoring_flops"):
                totals[key] = totals.get(key, 0) + getattr(batch, key, 0)
            totals["layer_avg"] = totals.get("layer_avg", 0) + batch.layer_avg_visual_tokens * batch.images
        return out, totals

    def _uncompressed(self, inputs) -> SimpleNamespace:
        """The cost fields of :class:`CompressionStats` for a batch the stock model runs whole."""
        visual = int(get_adapter(self.model).visual_mask(inputs["input_ids"]).sum())
        images = inputs["input_ids"].shape[0]  # one image or video per item
        element = torch.finfo(self.model.dtype).bits // 8
        flops, kv = prompt_costs(inputs["attention_mask"].sum(dim=1).tolist(), self.model.config.text_config, element)
        return SimpleNamespace(images=images, visual_tokens_kept=visual, layer_avg_visual_tokens=visual / images,
                               prefill_flops=flops, kv_cache_bytes=kv, select_ms=0.0)

    def speed(self, repeats: int, new_tokens: int = 16) -> tuple[float, float, float]:
        """(prefill ms, decode ms/token, peak MB) for the first item alone (batch 1)."""
        one = self._encode(self.items[:1])

        def prefill():
            with torch.no_grad():
                self.model(**one, use_cache=True, logits_to_keep=1)

        def gen(n, logits_processor):
            self.model.generate(**one, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                logits_processor=logits_processor)

        prefill()
        with PeakMemory(self.device) as mem:
            prefill()
        t_prefill = timed(prefill, self.device, repeats)
        return t_prefill * 1e3, decode_ms_per_token(gen, self.device, new_tokens, repeats), mem.peak / 2**20


def _settings(args: argparse.Namespace, model_path: Path, samples: int, prompt: str) -> dict[str, Any]:
    """What must match for rows of two runs to sit in one table (``--resume``)."""
    return {
        "model": str(Path(model_path).resolve()), "dataset": args.dataset, "samples": samples, "prompt": prompt,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "device": args.device, "dtype": args.dtype, "threads": args.threads,
    }


def _uncompress(model) -> None:
    """Undo whatever a failed row left attached, so the next row starts from the untouched model."""
    if "compression" in model.__dict__:
        restore(model)


def measure(runner: Runner, method: str, budget: float, repeats: int) -> dict[str, Any]:
    """One (method, budget): answers, summed costs and timings, as a JSON-able record."""
    model, before = runner.model, None
    if method != "none":
        stack, options = method_arg(method, budget)
        compress(model, method=stack, **options)
        if isinstance(stack, OraclePruner):  # the attached copy reads the scene of each item, one at a time
            oracle = model.compression.configs[0]

            def before(items: list[Item]) -> None:
                oracle.boxes = [object_boxes(asked_objects(i.question, i.objects, i.grid), i.grid) for i in items]

            runner = runner.one_by_one()
    try:
        answers, totals = runner.answers(before)
        if before is not None:
            before(runner.items[:1])  # speed() runs the first item
        prefill_ms, decode_ms, peak = runner.speed(repeats)
    finally:
        _uncompress(model)
    return {"method": method, "budget": budget, "answers": answers, "totals": totals, "prefill_ms": prefill_ms,
            "decode_ms_per_token": decode_ms, "peak_mem_mb": peak}


def to_row(record: dict[str, Any], reference: dict[str, Any], items: list[Item]) -> Row:
    """The table row of a measured record, scored against the items and the uncompressed ``reference``."""
    answers, totals, n = record["answers"], record["totals"], len(items)
    correct = [is_correct(a, i.answer) for a, i in zip(answers, items)]
    accuracy = sum(correct) / n
    per_type: dict[str, list[int]] = {}
    for ok, item in zip(correct, items):
        per_type.setdefault(item.qtype, []).append(ok)
    full = sum(is_correct(a, i.answer) for a, i in zip(reference["answers"], items)) / n
    return Row(
        method=record["method"], budget=record["budget"], accuracy=accuracy,
        accuracy_retained=100 * accuracy / full if full else 100.0,
        agreement=sum(a == r for a, r in zip(answers, reference["answers"])) / n,
        llm_visual_tokens=totals["visual_tokens_kept"] / totals["images"],
        layer_avg_visual_tokens=totals["layer_avg"] / totals["images"],
        prefill_ms=record["prefill_ms"], decode_ms_per_token=record["decode_ms_per_token"],
        prefill_gflops=totals["prefill_flops"] / n / 1e9, kv_cache_mb=totals["kv_cache_bytes"] / n / 2**20,
        select_ms=totals["select_ms"] / totals["images"] if record["method"] != "none" else 0.0,
        peak_mem_mb=record["peak_mem_mb"], per_type={k: sum(v) / len(v) for k, v in sorted(per_type.items())},
        scoring_ms=totals.get("scoring_ms", 0.0) / n, scoring_gflops=totals.get("scoring_flops", 0.0) / n / 1e9,
    )


def run(args: argparse.Namespace, model_path: Path, stem: Path) -> dict[str, Any]:
    """Every (method, budget) on one model. Each finished row goes to ``<stem>.rows.jsonl`` at once; a row that
    raises is recorded as an error row and the run goes on (``result["errors"]``)."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, processor = load_model(model_path, device, dtype)
    task = task_for(model_path, model.config)
    video = isinstance(task, ShapesVideoTask) and not args.dataset
    samples = args.samples or (120 if video or get_adapter(model).anyres else 400)
    if args.dataset:
        items = jsonl_items(args.dataset, samples)
        prior = answer_prior(items, items)
        prior_note = "most frequent answer per type in the dataset itself"
    elif video:
        items = video_items(samples, "test", task)
        prior = answer_prior(video_items(1000, "train", task), items)
        prior_note = "most frequent training answer per question type"
    else:
        items = shapes_items(samples, "test", task)
        prior = answer_prior(shapes_items(2000, "train", task, images=False), items)
        prior_note = "most frequent training answer per question type"
    prompt = args.prompt or prompt_for(model_path) or ("USER: <video>\n{question} ASSISTANT:" if video
                                                       else "USER: <image>\n{question} ASSISTANT:")
    log = RowLog(stem.with_suffix(".rows.jsonl"), _settings(args, model_path, samples, prompt), resume=args.resume)
    runner = Runner(model, processor, items, prompt, args.batch_size, args.max_new_tokens)

    methods = list(args.methods or (VIDEO_METHODS if video else DEFAULT_METHODS))
    budgets = list(args.budgets or (VIDEO_BUDGETS if video else BUDGETS))
    if is_pmod_checkpoint(model_path):  # its own routers, first
        own = "pmod" if Path(model_path).resolve() == EMBEDDED_ROUTERS.resolve() else f"pmod:routers={str(model_path)!r}"
        methods = [own, *(m for m in methods if m.split(":")[0] != "pmod")]
    configs, skipped, errors = [("none", 1.0)], {}, []
    for spec in methods:
        name = parse_method(spec.split("+")[0])[0]
        if name == "oracle" and any(i.objects is None for i in items):
            skipped[spec] = {"reason": "the oracle needs the scene's objects (ShapesVQA items)", "budgets": budgets}
            continue
        auto = ([AUTO_BUDGET] if "+" not in spec and name in list_methods("encoder") and get_method(name).supports_auto()
                and not args.no_auto else [])
        for budget in [*budgets, *auto]:
            try:  # e.g. AnyRes-only methods on LLaVA-1.5, weights trained for another model, FastV below K/L
                method, options = method_arg(spec, budget)
                restore(compress(model, method=method, **options))
                configs.append((spec, budget))
            except ValueError as err:
                skipped.setdefault(spec, {"reason": str(err), "budgets": []})["budgets"].append(budget)
            except Exception as err:  # noqa: BLE001 — a broken method is a failed row, not a failed run
                _uncompress(model)
                errors.append(log.add_error(spec, budget, err))
    for spec, why in skipped.items():
        print(f"skipping {spec} @ {why['budgets']} on {Path(model_path).name}: {why['reason']}", file=sys.stderr)
    progress = _progress(len(configs))
    records = {}
    for method, budget in configs:
        record = log.done(method, budget)
        if record is None:
            try:
                record = measure(runner, method, budget, args.repeats)
            except Exception as err:
                if method == "none":
                    raise  # without the uncompressed reference no row can be scored
                traceback.print_exc()
                errors.append(log.add_error(method, budget, err))
                progress(f"{method} @ {budget}: FAILED ({type(err).__name__})")
                continue
            log.add(record)
        records[(method, budget)] = record
        progress(f"{method} @ {budget}: acc {to_row(record, records[('none', 1.0)], items).accuracy:.3f}")
    progress(None)

    reference = records[("none", 1.0)]
    return {
        "command": "python -m vlm_compress.bench " + " ".join(sys.argv[1:]),
        "model": str(model_path), "dataset": args.dataset or ("ShapesVideo test split" if video else "ShapesVQA test split"),
        "samples": len(items), "answer_prior": prior, "answer_prior_note": prior_note,
        "machine": {**machine_description(device), "dtype": args.dtype},
        "rows": [dataclasses.asdict(to_row(r, reference, items)) for r in records.values()],
        "skipped_methods": skipped,
        "errors": errors,
    }


def _progress(total: int):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="config")

        def step(msg):
            if msg is None:
                bar.close()
            else:
                bar.set_postfix_str(msg)
                bar.update(1)

        return step
    except ImportError:
        count = [0]

        def step(msg):
            if msg is not None:
                count[0] += 1
                print(f"[{count[0]}/{total}] {msg}", flush=True)

        return step


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Benchmark: {result.get('label') or Path(result['model']).name} on {result['dataset']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']} ({m['device']}), {m['threads']} threads, torch {m['torch']}, {m['dtype']}.  ",
        f"{result['samples']} held-out samples; greedy answers. Answer prior ({result['answer_prior_note']}): "
        f"**{result['answer_prior']:.3f}**. Prefill/decode timed at batch 1; FLOPs and KV per sample; selection per image.",
        "",
        "| method | budget | accuracy | retained % | agreement | LLM visual tok | layer-avg tok | prefill ms | "
        "decode ms/tok | prefill GFLOPs | KV MB | select ms | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['accuracy']:.3f} | {r['accuracy_retained']:.1f} | {r['agreement']:.3f} | "
            f"{r['llm_visual_tokens']:.1f} | {r['layer_avg_visual_tokens']:.1f} | {r['prefill_ms']:.1f} | "
            f"{r['decode_ms_per_token']:.2f} | {r['prefill_gflops']:.3f} | {r['kv_cache_mb']:.3f} | {r['select_ms']:.2f} | "
            f"{r['peak_mem_mb']:.0f} |"
        )
    if result.get("errors"):
        lines += ["", "Rows that failed (the run went on without them):", ""]
        lines += [f"- {e['method']} @ {e['budget']}: `{e['error']}`" for e in result["errors"]]
    scored = [r for r in result["rows"] if r.get("scoring_ms", 0) > 0]
    if scored:
        lines += ["", "Scoring passes (a method's own model runs, e.g. QuoTA's decoupling and frame relevance), per "
                  "sample in the batched run; the share is of prefill at batch 1, which includes them:", "",
                  "| method | budget | scoring ms | prefill ms | share of prefill | scoring GFLOPs (LLM + tower) | "
                  "prefill GFLOPs (LLM) |",
                  "|---|---|---|---|---|---|---|"]
        for r in scored:
            lines.append(f"| {r['method']} | {r['budget']} | {r['scoring_ms']:.1f} | {r['prefill_ms']:.1f} | "
                         f"{min(r['scoring_ms'] / r['prefill_ms'], 1.0):.0%} | {r['scoring_gflops']:.3f} | "
                         f"{r['prefill_gflops']:.3f} |")
    types = sorted({t for r in result["rows"] for t in r["per_type"]})
    lines += ["", "Accuracy per question type:", "", "| method | budget | " + " | ".join(types) + " |",
              "|---|---|" + "---|" * len(types)]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['budget']} | " + " | ".join(f"{r['per_type'].get(t, 0):.2f}" for t in types) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], stem: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install vlm-compress[bench]): skipping plots", file=sys.stderr)
        return []
    rows = result["rows"]
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    full = rows[0]["layer_avg_visual_tokens"]
    paths = []
    for key, label, name in (("accuracy", "accuracy", "accuracy"), ("prefill_ms", "prefill ms (batch 1)", "prefill")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in methods:
            pts = sorted((r["budget"], r[key]) for r in rows if r["method"] == method and not isinstance(r["budget"], str))
            line = ax.plot(*zip(*pts), marker="o", label=method)[0] if pts else None
            for r in rows:  # budget="auto": one point at the mean share it chose
                if r["method"] == method and isinstance(r["budget"], str):
                    ax.plot(r["layer_avg_visual_tokens"] / full, r[key], marker="*", markersize=11, linestyle="none",
                            color=line.get_color() if line else None, label=f"{method} @ auto" if not line else None)
        ax.axhline(rows[0][key], color="black", linestyle="--", linewidth=1, label="uncompressed")
        if key == "accuracy":
            ax.axhline(result["answer_prior"], color="gray", linestyle=":", linewidth=1, label="answer prior")
        ax.set_xlabel("budget (share of visual tokens, layer-averaged)")
        ax.set_ylabel(label)
        ax.set_title(f"{Path(result['model']).name}: {label} vs budget")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = stem.with_name(f"{stem.name}_{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    paths.append(plot_frontier(result, stem, plt))
    return paths


def plot_frontier(result: dict[str, Any], stem: Path, plt: Any) -> Path:
    """Accuracy against layer-averaged visual tokens per image, every row of every method (``auto`` rows as stars,
    the oracle dashed): where each method stands at equal cost."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]:
        own = [r for r in rows if r["method"] == method]
        pts = sorted((r["layer_avg_visual_tokens"], r["accuracy"]) for r in own if not isinstance(r["budget"], str))
        style = {"linestyle": "--", "color": "black", "linewidth": 1.5} if method == "oracle" else {}
        line = ax.plot(*zip(*pts), marker=".", label=method, **style)[0] if pts else None
        for r in own:
            if isinstance(r["budget"], str):
                ax.plot(r["layer_avg_visual_tokens"], r["accuracy"], marker="*", markersize=11, linestyle="none",
                        color=line.get_color() if line else None)
    ax.axhline(rows[0]["accuracy"], color="gray", linestyle="--", linewidth=1, label="uncompressed")
    ax.axhline(result["answer_prior"], color="gray", linestyle=":", linewidth=1, label="answer prior")
    ax.set_xscale("log")
    ax.set_xlabel("layer-averaged visual tokens per image (log)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{Path(result['model']).name}: accuracy frontier (stars: budget='auto')")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    path = stem.with_name(f"{stem.name}_frontier.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm_compress.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+",
                        help="local LLaVA / LLaVA-NeXT checkpoint directories, or names: an embedded model "
                             f"({', '.join(EMBEDDED_MODELS)}) or {', '.join(BUILT_MODELS)} (built from installed "
                             "pretrained packages once, then cached; default: all of them)")
    parser.add_argument("--dataset", help="local JSONL of image, question, answer (default: ShapesVQA held-out split)")
    parser.add_argument("--prompt", default=None,
                        help="prompt with {question} (default: the model's task.json prompt, else LLaVA's format with "
                             "<image>, or <video> on a video task)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method names, optionally with options: cls_attn:layer=-1,kind=logits (default: every "
                             "method; the video methods on a video model)")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help=f"default: {' '.join(map(str, BUDGETS))} ({' '.join(map(str, VIDEO_BUDGETS))} on video)")
    parser.add_argument("--samples", type=int, default=None,
                        help="held-out samples (default: 400; 120 on AnyRes models, whose 744 visual tokens per image "
                             "cost five times as much, and on video models, whose QuoTA rows run scoring passes)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-auto", action="store_true",
                        help="no budget='auto' row for the score-based encoder methods")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 40 samples (unless --samples), budgets 1.0 and 0.22, random and pool")
    parser.add_argument("--out", help="output stem (default: eval/results/bench_<model name>[_quick])")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already measured in <out>.rows.jsonl (same settings) and run only the rest "
                             "(rows that failed are run again)")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.budgets, args.repeats, args.no_auto = args.samples or 40, [1.0, 0.22], 2, True
        args.methods = [m for m in ("random", "pool") if m in (args.methods or DEFAULT_METHODS)] or args.methods[:2]
    unknown = sorted({parse_method(part)[0] for m in args.methods or [] for part in m.split("+")}
                     - {*list_methods(), "oracle"})
    if unknown:
        parser.error(f"unknown methods {unknown}; available: {list_methods()}")
    names = args.model or [*(m for m in EMBEDDED_MODELS if (ASSETS / m).exists()),
                           *(m for m in BUILT_MODELS if built_model_available(m))]
    labelled = [(str(n) if str(n) in BUILT_MODELS else None, resolve_model(n)) for n in names]
    for _, path in labelled:
        if not (path / "config.json").exists() and not is_pmod_checkpoint(path):
            parser.error(f"no model at {path}: pass --model PATH (a local LLaVA checkpoint directory)")
    if args.out and len(labelled) > 1:
        parser.error("--out names one output stem; pass one --model with it")
    failed = []
    for label, path in labelled:
        start = time.time()
        label = label or path.name  # a built model's cache directory carries its build key; the stem does not
        stem = Path(args.out) if args.out else RESULTS / f"bench_{label}{'_quick' if args.quick else ''}"
        try:
            result = run(args, path, stem)
        except SettingsMismatch as err:
            parser.error(str(err))
        result["label"], result["seconds"] = label, round(time.time() - start, 1)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(to_markdown(result))
        plots = plot(result, stem)
        print(to_markdown(result))
        print(f"wrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in plots) + f" in {result['seconds']} s")
        failed += [f"{label}: {e['method']} @ {e['budget']} ({e['error']})" for e in result["errors"]]
    if failed:
        sys.exit(f"{len(failed)} benchmark row(s) failed (recorded as error rows; rerun with --resume to retry "
                 "only them):\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()

"""A user's workload, end to end: a batch of LLaVA-NeXT prompts generating many tokens, and one long generation.

    python eval/workload_bench.py                                     # CPU, scaled dims (BENCH_DIMS), batch 8 × 128
    python eval/workload_bench.py --dims llava-next-7b --device cuda --dtype bfloat16

Random weights (speed does not depend on them); each prompt one 672×672 image (AnyRes: thumbnail + 2×2 crops,
2928 visual tokens with newlines) and its own question. Two runs per configuration, uncompressed first:

* ``batch``: ``--batch`` prompts (left-padded) generating ``--new-tokens`` tokens each, greedy, forced length;
* ``long``: one prompt generating ``--long-tokens`` tokens, to show where decode savings appear as the cache grows.

Per run: total wall time of ``generate``, time to first token (the first step stamp of a
:class:`~vlm_compress.bench.timing.StepClock`), decode tokens/s over the steps after it (all rows), the median step
(long run: also over its first and last 64 steps), the peak memory the call added (CUDA: allocator peak; CPU:
resident high-water mark) and the KV cache bytes held when generation ended (``nbytes`` of every cached key and
value tensor: what the process really holds, padding slots included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from speed_bench import DIMS, NEXT_PINPOINTS, untrained_routers  # noqa: E402

from vlm_compress import compat, compress, restore  # noqa: E402
from vlm_compress.bench.run import method_arg  # noqa: E402
from vlm_compress.bench.timing import PeakMemory, StepClock, machine_description  # noqa: E402
from vlm_compress.testing import build_llava_next, build_next_processor, build_tokenizer, random_images  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "what color is the square at the top left ?", "how many circles are there ?", "is there a red triangle ?",
    "what shape is in the middle of the image ?", "which object is the largest ?", "are there more squares than circles ?",
    "what color is the object at the bottom right ?", "describe the image .",
]
EDGE = 64  # steps at each end of the long run whose medians are reported


def kv_bytes(cache) -> int:
    """Bytes of every key and value tensor the cache holds now (all layers)."""
    total = 0
    for layer in range(len(cache.layers)):
        keys, values = compat.layer_entries(cache, layer)
        total += keys.nbytes + values.nbytes
    return total


def run_generation(model, inputs, tokens: int, device: torch.device) -> dict:
    """One timed ``generate`` of exactly ``tokens`` new tokens per row: its figures (see the module docstring)."""
    from transformers import LogitsProcessorList

    clock = StepClock(device)
    rows = inputs["input_ids"].shape[0]
    with PeakMemory(device) as mem:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
    steps = clock.step_ms()
    if len(clock.stamps) != tokens:
        raise RuntimeError(f"expected {tokens} tokens, the clock saw {len(clock.stamps)}")
    result = dict(
        total_s=total, ttft_s=clock.stamps[0] - start,
        decode_tok_s=rows * len(steps) / max(clock.stamps[-1] - clock.stamps[0], 1e-9),
        step_ms=statistics.median(steps), peak_mb=mem.peak / 2**20,
        kv_mb=kv_bytes(compat.cache_of_output(out)) / 2**20,
    )
    if len(steps) >= 2 * EDGE:
        result.update(first_steps_ms=statistics.median(steps[:EDGE]), last_steps_ms=statistics.median(steps[-EDGE:]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=[d for d, (_, family) in DIMS.items() if family == "next"],
                        default="cpu-scaled-next")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=["cls_attn", "visionzip", "fastv:layer=1", "mustdrop_llm", "h2o"],
                        help="compared with the uncompressed model, each at --budget")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="output stem under eval/results (default: workload_<dims>_<device>)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dims, _ = DIMS[args.dims]
    tokenizer = build_tokenizer()
    model = build_llava_next(tokenizer, dims, dtype=dtype, pinpoints=NEXT_PINPOINTS).to(device)
    processor = build_next_processor(tokenizer, dims, NEXT_PINPOINTS)
    side = 2 * dims.image_size
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    texts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    images = random_images(args.batch, (side, side))

    def prepare(count: int):
        inputs = processor(images=images[:count], text=texts[:count], return_tensors="pt", padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    batch, single = prepare(args.batch), prepare(1)
    visual = int((single["input_ids"] == model.config.image_token_id).sum())
    routers = untrained_routers(model.config.text_config)

    def apply(spec: str) -> None:
        if spec == "none":
            return
        name, options = method_arg(spec, args.budget)
        if name == "pmod":
            options.setdefault("routers", routers)
        compress(model, method=name, **options)

    rows = []
    for spec in ["none", *args.methods]:
        apply(spec)
        stage = model.compression.configs[0].stage if spec != "none" else "none"
        model.generate(**single, max_new_tokens=2, do_sample=False)  # warm-up
        for run, inputs, tokens in (("batch", batch, args.new_tokens), ("long", single, args.long_tokens)):
            result = run_generation(model, inputs, tokens, device)
            rows.append(dict(method=spec, stage=stage, budget=1.0 if spec == "none" else args.budget, run=run,
                             rows=inputs["input_ids"].shape[0], new_tokens=tokens, **result))
            print(json.dumps(rows[-1]), flush=True)
        if spec != "none":
            restore(model)

    base = {r["run"]: r for r in rows if r["method"] == "none"}
    for r in rows:
        b = base[r["run"]]
        r.update(total_ratio=r["total_s"] / b["total_s"], ttft_ratio=r["ttft_s"] / b["ttft_s"],
                 decode_ratio=r["decode_tok_s"] / b["decode_tok_s"],
                 peak_ratio=r["peak_mb"] / b["peak_mb"] if b["peak_mb"] else float("nan"),
                 kv_ratio=r["kv_mb"] / b["kv_mb"])

    machine = machine_description(device)
    machine.update(dtype=args.dtype, dims=args.dims, dims_values=vars(dims), visual_tokens=visual)
    stem = args.out or f"workload_{args.dims}_{device.type}"
    command = "python eval/workload_bench.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    text = to_markdown(rows, machine, command, args)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


def to_markdown(rows, machine, command, args) -> str:
    d = machine["dims_values"]
    head = (
        f"# A user's workload ({machine['dims']})\n\n"
        f"Command: `{command}`  \nMachine: {machine['cpu']} ({machine['device']}), {machine['threads']} threads, "
        f"torch {machine['torch']}, {machine['dtype']}.  \n"
        f"Model (random weights): CLIP ViT {d['vision_layers']}×{d['vision_hidden']} at {d['image_size']}/"
        f"{d['patch_size']} + Llama {d['text_layers']}×{d['text_hidden']} (MLP {d['text_intermediate']}), LLaVA-NeXT "
        f"AnyRes: each prompt one 672×672 image → {machine['visual_tokens']} visual tokens.\n\n"
        "One run per row (no repeats: a batch-8 run takes minutes on this CPU). `total` = wall time of `generate`; "
        "`TTFT` = time to the first token's logits; `decode tok/s` = new tokens of all rows after the first / their "
        "time; `peak MB` = memory the call added (CPU: resident high-water mark); `KV MB` = bytes of the cached keys "
        "and values when generation ended (padding slots included). Ratios are to the uncompressed row of the same "
        "run.\n\n"
    )
    sections = []
    for run, title in (("batch", f"Batch of {args.batch}, {args.new_tokens} new tokens each"),
                       ("long", f"One prompt, {args.long_tokens} new tokens")):
        subset = [r for r in rows if r["run"] == run]
        edges = run == "long" and "first_steps_ms" in subset[0]
        cols = "| method | stage | total s | ×none | TTFT s | ×none | decode tok/s | ×none | step ms |"
        cols += f" first {EDGE} steps ms | last {EDGE} steps ms |" if edges else ""
        cols += " peak MB | ×none | KV MB | ×none |"
        lines = [f"## {title}\n", cols, "|" + "---|" * (cols.count("|") - 1)]
        for r in subset:
            line = (f"| {r['method']} | {r['stage']} | {r['total_s']:.1f} | {r['total_ratio']:.2f} | {r['ttft_s']:.2f} | "
                    f"{r['ttft_ratio']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} | {r['step_ms']:.1f} |")
            if edges:
                line += f" {r['first_steps_ms']:.1f} | {r['last_steps_ms']:.1f} |"
            line += f" {r['peak_mb']:.0f} | {r['peak_ratio']:.2f} | {r['kv_mb']:.0f} | {r['kv_ratio']:.2f} |"
            lines.append(line)
        sections.append("\n".join(lines))
    return head + "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    main()

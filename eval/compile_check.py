"""Does ``torch.compile(model)`` work after ``compress``, and what does it buy? (issue #21, item 5)

    python eval/compile_check.py                 # CPU, scaled LLaVA-1.5 dims, default inductor backend
    python eval/compile_check.py --backend eager # dynamo tracing only (checks graph capture, no codegen)

For each method: the compiled model's prefill logits against the eager compressed model's, the compile (first
call) time, and the median prefill of eager vs compiled. Writes ``eval/results/compile_<dims>_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_compress import compress, restore  # noqa: E402
from vlm_compress.bench.run import method_arg  # noqa: E402
from vlm_compress.bench.timing import machine_description, timed  # noqa: E402
from vlm_compress.testing import BENCH_DIMS, build_llava, build_processor, build_tokenizer, random_images  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["none", "cls_attn", "visionzip", "pool", "fastv:layer=1", "h2o"])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    tokenizer = build_tokenizer()
    model = build_llava(tokenizer, BENCH_DIMS)
    processor = build_processor(tokenizer, BENCH_DIMS)
    inputs = processor(images=random_images(1, (BENCH_DIMS.image_size,) * 2),
                       text="USER: <image>\nwhat color is the square ? ASSISTANT:", return_tensors="pt")
    rows = []
    for spec in args.methods:
        if spec != "none":
            name, options = method_arg(spec, args.budget)
            compress(model, method=name, **options)
        with torch.no_grad():
            want = model(**inputs).logits
        eager_ms = timed(lambda: model(**inputs, logits_to_keep=1), device, args.repeats) * 1e3
        row = dict(method=spec, budget=args.budget if spec != "none" else 1.0, backend=args.backend, eager_ms=eager_ms)
        torch._dynamo.reset()
        graphs_before = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        compiled = torch.compile(model, backend=args.backend)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                got = compiled(**inputs).logits
            row["compile_s"] = time.perf_counter() - start
            row["max_abs_diff"] = float((got - want).abs().max())
            row["compiled_ms"] = statistics.median(
                timed(lambda c=compiled: c(**inputs, logits_to_keep=1), device, 1) * 1e3 for _ in range(args.repeats))
            gen = compiled.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            ref = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            row["generate_equal"] = bool(torch.equal(gen, ref))
            row["status"] = "works" if row["max_abs_diff"] < 1e-3 and row["generate_equal"] else "wrong output"
        except Exception as err:  # noqa: BLE001 - the point is to record what a user would see
            row["status"] = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
            traceback.print_exc()
        row["graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"]) - graphs_before  # reset() keeps counters
        rows.append(row)
        print(row, flush=True)
        if spec != "none":
            restore(model)
    machine = machine_description(device)
    command = "python eval/compile_check.py " + " ".join(sys.argv[1:])
    stem = f"compile_cpu-scaled_{device.type}" + ("" if args.backend == "inductor" else f"_{args.backend}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    lines = [f"# torch.compile after compress (cpu-scaled LLaVA-1.5 dims, backend {args.backend})", "",
             f"Command: `{command}`  ", f"Machine: {machine['cpu']} ({machine['device']}), {machine['threads']} threads, "
             f"torch {machine['torch']}, float32, batch 1.", "",
             "`max |Δ|` = compiled vs eager compressed prefill logits; `generate` = 4 greedy tokens equal; `graphs` = graphs dynamo compiled for that method.", "",
             "| method | budget | status | compile s | eager ms | compiled ms | max abs diff | generate equal | graphs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['status']} | {r.get('compile_s', float('nan')):.1f} | "
                     f"{r['eager_ms']:.1f} | {r.get('compiled_ms', float('nan')):.1f} | {r.get('max_abs_diff', float('nan')):.2e} | "
                     f"{r.get('generate_equal', '—')} | {r['graphs']} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

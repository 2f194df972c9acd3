"""vLLM offline throughput on tiny-llava-next, uncompressed vs the plugin's ``cls_attn`` / ``hired`` (``make bench-vllm``).

One engine per configuration (in-process, eager, float32, on this machine's CPU), the same ``--requests`` ShapesVQA
prompts submitted as one batch, greedy. Per configuration: requests/s and prompt tokens/s of the whole batch with
``--new-tokens`` new tokens; time to first token of the batch (the same batch with one new token: every request's
prefill, the vision tower and selection included); KV-cache blocks the batch holds at its longest (per request
``ceil((prompt + new) / block_size)``, summed). Medians over ``--repeats``. Writes
``eval/results/vllm_throughput.{md,json}`` with the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch
from transformers import AutoConfig
from vllm import LLM, SamplingParams

from vlm_compress.bench.data import shapes_items, task_for
from vlm_compress.integrations.vllm import copy_for_vllm, vllm_overrides

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "vlm_compress" / "assets" / "tiny-llava-next"
PROMPT = "USER: <image>\n{question} ASSISTANT:"


def run(llm: LLM, requests: list[dict], new_tokens: int, repeats: int) -> dict:
    full, first = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True), \
        SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(requests[:2], first, use_tqdm=False)  # warm-up
    walls, ttfts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(requests, full, use_tqdm=False)
        walls.append(time.perf_counter() - start)
        start = time.perf_counter()
        llm.generate(requests, first, use_tqdm=False)
        ttfts.append(time.perf_counter() - start)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    wall = statistics.median(walls)
    return {
        "requests_per_s": len(requests) / wall,
        "prompt_tokens_per_s": prompt_tokens / wall,
        "ttft_batch_s": statistics.median(ttfts),
        "wall_s": wall,
        "prompt_tokens_per_request": prompt_tokens / len(requests),
        "kv_blocks": sum(math.ceil((len(o.prompt_token_ids) + new_tokens) / block) for o in outs),
        "block_size": block,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    parser.add_argument("--methods", nargs="+", default=["cls_attn", "hired"])
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "vllm_throughput"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    items = shapes_items(args.requests, task=task_for(MODEL, AutoConfig.from_pretrained(MODEL)))
    requests = [{"prompt": PROMPT.format(question=i.question), "multi_modal_data": {"image": i.image}} for i in items]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = copy_for_vllm(MODEL, Path(tmp) / "plain")
        configs = [("none", 1.0, plain, None)] + [(m, b, MODEL, vllm_overrides(MODEL, m, b))
                                                  for m in args.methods for b in args.budgets]
        for method, budget, path, overrides in configs:
            llm = LLM(model=str(path), enforce_eager=True, max_model_len=1024, dtype="float32", seed=0,
                      gpu_memory_utilization=0.15, limit_mm_per_prompt={"image": 1}, hf_overrides=overrides or {},
                      mm_processor_cache_gb=0)
            row = {"method": method, "budget": budget, **run(llm, requests, args.new_tokens, args.repeats)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm
            gc.collect()
    base = rows[0]
    for row in rows:
        row["throughput_ratio"] = row["requests_per_s"] / base["requests_per_s"]
        row["ttft_ratio"] = row["ttft_batch_s"] / base["ttft_batch_s"]
    import vllm

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "vllm": vllm.__version__, "device": "cpu"}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2) + "\n")
    lines = [f"# vLLM offline throughput, tiny-llava-next ({args.requests} requests × {args.new_tokens} new tokens, "
             f"median of {args.repeats})", "", f"Machine: {machine}. Command: `make bench-vllm`.", "",
             "| method | budget | prompt tok/req | req/s | prompt tok/s | TTFT batch (s) | KV blocks | req/s ratio | TTFT ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']:g} | {r['prompt_tokens_per_request']:.0f} | {r['requests_per_s']:.1f} | "
                     f"{r['prompt_tokens_per_s']:.0f} | {r['ttft_batch_s']:.3f} | {r['kv_blocks']} | "
                     f"{r['throughput_ratio']:.2f} | {r['ttft_ratio']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

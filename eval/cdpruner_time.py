"""Time CDPruner's selection (``CDPrunerPruner.select``) per image at LLaVA shapes, on random data.

    python eval/cdpruner_time.py                 # writes eval/results/cdpruner_select_time.{json,md}
    python eval/cdpruner_time.py --repeats 9 --device cuda

Shapes: N = 576 (LLaVA-1.5, one 24×24 grid; k = 64, 128) and N = 2880 (LLaVA-NeXT's 5 × 576; k = 320, 640), projected
features of width D = 4096 (Vicuna-7B), a 24-token instruction embedded by a random table (the default LLM-embedding
relevance). Each row is the median wall time of ``select`` over ``--repeats`` calls after one warm-up: relevance,
the N×N cosine kernel (float32) and the k greedy DPP steps. The N = 2880 rows run one DPP over all 2880 tokens (an
upper bound); the "5×576" rows run what CDPruner does on a LLaVA-NeXT 2×2 image, one DPP per sub-image with k/5
each (the core functions, without the stage's layout). DivPrune's selection at the same shapes is timed for
comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_compress.adapters.base import ImageBatch, TokenLayout  # noqa: E402
from vlm_compress.bench.timing import machine_description  # noqa: E402
from vlm_compress.pruners.base import EncoderContext  # noqa: E402
from vlm_compress.pruners.cdpruner import CDPrunerPruner, dpp_select, relevance_from_cosines, unit  # noqa: E402
from vlm_compress.pruners.divprune import DivPrunePruner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [(576, (24, 24), 64), (576, (24, 24), 128), (2880, (48, 60), 320), (2880, (48, 60), 640)]
DIM, TEXT_TOKENS, VOCAB = 4096, 24, 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def context(n: int, grid: tuple[int, int], keep: int, device: torch.device, seed: int = 0) -> EncoderContext:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, n, DIM, generator=g).to(device)
    table = torch.randn(VOCAB, DIM, generator=g).to(device)
    ids = torch.randint(0, VOCAB, (TEXT_TOKENS,), generator=g).to(device)
    images = ImageBatch(features=features, vision_features=features, layout=TokenLayout.single_grid(grid),
                        source=torch.arange(n, device=device)[None], tower_length=n, project=lambda x: x)
    return EncoderContext(images=images, keep=[keep], image_index_in_prompt=[0], capture=None, instruction_ids=[ids],
                          embed_tokens=lambda t: table[t])


def per_sub_image(ctx: EncoderContext, keep: int, parts: int = 5) -> None:
    """CDPruner on a LLaVA-NeXT 2×2 image: relevance over the whole image, one DPP per 576-token sub-image."""
    with torch.no_grad():
        x = ctx.features[0]
        text = ctx.embed_tokens(ctx.instruction_ids[0])
        rel = relevance_from_cosines(unit(x) @ unit(text).T, negate=False)
        size = x.shape[0] // parts
        for p in range(parts):
            dpp_select(x[p * size:(p + 1) * size], rel[p * size:(p + 1) * size], keep // parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "cdpruner_select_time")
    args = parser.parse_args()
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    rows = []
    for n, grid, keep in CASES:
        ctx = context(n, grid, keep, device)
        for method, fn in (("cdpruner", lambda ctx=ctx, k=keep: CDPrunerPruner(budget=k).select(ctx)),
                           ("divprune", lambda ctx=ctx, k=keep: DivPrunePruner(budget=k).select(ctx))):
            median, best = median_ms(fn, args.repeats, device)
            rows.append({"method": method, "tokens": n, "keep": keep, "layout": f"one grid {grid[0]}×{grid[1]}",
                         "median_ms": round(median, 2), "min_ms": round(best, 2)})
            print(rows[-1], flush=True)
        if n == 2880:
            median, best = median_ms(lambda ctx=ctx, k=keep: per_sub_image(ctx, k), args.repeats, device)
            rows.append({"method": "cdpruner", "tokens": n, "keep": keep, "layout": "5×576 (per sub-image)",
                         "median_ms": round(median, 2), "min_ms": round(best, 2)})
            print(rows[-1], flush=True)
    machine = {**machine_description(device), "cpus": os.cpu_count(), "load_1min_before": round(load_before, 2),
               "load_1min_after": round(os.getloadavg()[0], 2)}
    command = "python eval/cdpruner_time.py" + "".join(
        f" --{k} {v}" for k, v in (("repeats", args.repeats), ("device", args.device)) if str(v) not in ("7", "cpu"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": machine, "dim": DIM, "text_tokens": TEXT_TOKENS, "repeats": args.repeats,
         "rows": rows}, indent=2) + "\n")
    lines = [
        "# CDPruner selection time per image",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']} ({machine['device']}), {machine['cpus']} CPUs, {machine['threads']} torch threads, "
        f"torch {machine['torch']}; 1-minute load average {machine['load_1min_before']} before, "
        f"{machine['load_1min_after']} after (the CPUs are shared).  ",
        f"Data: random projected features of width {DIM}, a {TEXT_TOKENS}-token instruction (LLM-embedding relevance).",
        "",
        "Time of one `select` call for one image (relevance, float32 cosine kernel, k greedy DPP steps), median and "
        f"min of {args.repeats} calls after a warm-up. The 5×576 rows are CDPruner's LLaVA-NeXT split (one DPP per "
        "sub-image, k/5 each); DivPrune's selection is shown for comparison.",
        "",
        "| method | N | k | layout | median ms | min ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['tokens']} | {r['keep']} | {r['layout']} | {r['median_ms']} | {r['min_ms']} |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

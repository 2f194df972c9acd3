"""Time each fused kernel against its torch composite at LLaVA shapes (N = 576 and 2880 visual tokens, D = 4096).

    python eval/kernel_bench.py                       # CUDA; writes eval/results/kernel_bench_<gpu>.{json,md}
    python eval/kernel_bench.py --batches 8 --tokens 2880

The composites are what a method would write without the kernels: ``topk`` + ``sort`` + ``gather`` for selection,
a full ``softmax(q·Kᵀ)`` over the rows for row attention, unfold-style gathers for window merges and a dense
similarity matrix for ToMe's best match. Goal (issue #6): top-k + gather at least 2× faster than the composite at
N = 2880, B = 8. Without a GPU the script records that no timing was possible (the interpreter is not a timing
device) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_compress import kernels  # noqa: E402
from vlm_compress.bench.timing import machine_description  # noqa: E402
from vlm_compress.kernels import reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def composite_topk_gather(scores, features, k):
    index = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    return features.gather(1, index[..., None].expand(-1, -1, features.shape[-1])), index


def cases(batch: int, tokens: int, dim: int, dtype: torch.dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.randn(batch, tokens, device=device, generator=g)
    features = torch.randn(batch, tokens, dim, device=device, dtype=dtype, generator=g)
    k = tokens // 5  # budget 0.2
    q = torch.randn(batch, 32, 8, 128, device=device, dtype=dtype, generator=g)  # 8 text rows, 32 heads
    keys = torch.randn(batch, 32, tokens, 128, device=device, dtype=dtype, generator=g)
    side = int(round(tokens ** 0.5)) if int(round(tokens ** 0.5)) ** 2 == tokens else 24
    windows = kernels.grid_windows(side, tokens // side, 3, device)
    metric = features[..., :1024]
    yield "topk_gather", lambda: kernels.topk_gather(scores, features, k), lambda: composite_topk_gather(scores, features, k)
    yield ("row_attention", lambda: kernels.row_attention(q, keys, 128 ** -0.5),
           lambda: reference.row_attention(q, keys, 128 ** -0.5))
    yield ("window_merge", lambda: kernels.window_merge(features, metric, windows, 0.8),
           lambda: reference.window_merge(features, metric, windows.expand(batch, -1, -1), 0.8))
    yield ("best_match", lambda: kernels.best_match(metric[:, ::2, :64], metric[:, 1::2, :64]),
           lambda: reference.best_match(metric[:, ::2, :64], metric[:, 1::2, :64]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        note = ("# Kernel benchmark\n\nNo CUDA device was available when this was run "
                f"({machine_description(torch.device('cpu'))['cpu']}, torch {torch.__version__}); "
                "the Triton interpreter is not a timing device, so nothing was timed. Run `python eval/kernel_bench.py` "
                "on a GPU machine.\n")
        (RESULTS / "kernel_bench_no-gpu.md").write_text(note)
        print(note)
        return
    os.environ[kernels.ENV] = "auto"  # CUDA tensors: the Triton kernels
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    rows = []
    for tokens in args.tokens:
        for batch in args.batches:
            for name, fused, composite in cases(batch, tokens, args.dim, dtype, device):
                fused_ms, composite_ms = cuda_ms(fused, args.repeats), cuda_ms(composite, args.repeats)
                rows.append(dict(kernel=name, tokens=tokens, batch=batch, dim=args.dim, dtype=args.dtype,
                                 fused_ms=fused_ms, composite_ms=composite_ms, speedup=composite_ms / fused_ms))
                print(rows[-1], flush=True)
    machine = {**machine_description(device), "gpu": torch.cuda.get_device_name()}
    stem = "kernel_bench_" + machine["gpu"].replace(" ", "-").lower()
    command = "python eval/kernel_bench.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    lines = [f"# Kernel benchmark ({machine['gpu']})\n", f"Command: `{command}`; {args.dtype}, D = {args.dim}, "
             "median of CUDA-event timings.\n", "| kernel | N | B | fused ms | torch ms | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['tokens']} | {r['batch']} | {r['fused_ms']:.3f} | {r['composite_ms']:.3f} | "
              f"{r['speedup']:.2f}× |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

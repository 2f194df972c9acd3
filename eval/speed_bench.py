"""Prefill (time to first token) and per-token decode speed, uncompressed vs each method at several budgets.

    python eval/speed_bench.py                                   # CPU, scaled LLaVA-1.5 proportions (BENCH_DIMS)
    python eval/speed_bench.py --dims llava-1.5-7b --device cuda --dtype bfloat16
    python eval/speed_bench.py --dims cpu-scaled-next --repeats 3     # AnyRes: 672×672 → thumbnail + 2×2 crops
    python eval/speed_bench.py --dims llava-next-7b --device cuda --dtype bfloat16
    python eval/speed_bench.py --dims cpu-scaled-qwen2-vl --repeats 3  # Qwen2-VL: 672×672 → 48×48 patches → 576 tokens
    python eval/speed_bench.py --dims qwen2-vl-7b --device cuda --dtype bfloat16

Random weights (speed does not depend on them). Batch of one image (336×336; 672×672 for the LLaVA-NeXT
dims, i.e. 5 tower crops and 2928 visual tokens with newlines; 672×672 at native resolution for Qwen2-VL, 576
visual tokens after the 2×2 merger) and a short question. Reports the
speed-up, its ratio to the FLOPs-ideal speed-up (vision tower + LLM FLOPs, :mod:`vlm_compress.stats`), the
selection overhead, and the peak memory added by the call (CUDA: allocator peak; CPU: the process's resident
high-water mark, reset through /proc/self/clear_refs before each measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_compress import compress, list_methods, restore  # noqa: E402
from vlm_compress.bench.run import method_arg  # noqa: E402
from vlm_compress.bench.timing import PeakMemory, decode_step_ms, machine_description, timed  # noqa: E402
from vlm_compress.stats import decode_flops, kv_entry_bytes, prefill_flops, vision_flops  # noqa: E402
from vlm_compress.testing import (  # noqa: E402
    BENCH_DIMS, LLAVA_7B_DIMS, QWEN2_VL_7B_DIMS, QWEN_BENCH_DIMS, build_llava, build_llava_next, build_next_processor,
    build_processor, build_qwen, build_qwen_processor, build_tokenizer, random_images,
)

# name → (dims, family). LLaVA-NeXT-7B (llava-v1.6-vicuna-7b) is LLaVA-1.5-7B's tower and LLM with AnyRes.
DIMS = {"cpu-scaled": (BENCH_DIMS, "llava"), "llava-1.5-7b": (LLAVA_7B_DIMS, "llava"),
        "cpu-scaled-next": (BENCH_DIMS, "next"), "llava-next-7b": (LLAVA_7B_DIMS, "next"),
        "cpu-scaled-qwen2-vl": (QWEN_BENCH_DIMS, "qwen2_vl"), "qwen2-vl-7b": (QWEN2_VL_7B_DIMS, "qwen2_vl")}
QWEN_SIDE = 672  # pixels: 48×48 patches of 14, 24×24 = 576 visual tokens
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 image_grid_pinpoints
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", choices=sorted(DIMS), default="cpu-scaled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", nargs="+", default=list_methods())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2, 0.1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="output stem under eval/results (default: speed_<dims>_<device>)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dims, family = DIMS[args.dims]
    anyres = family == "next"
    tokenizer = build_tokenizer()
    if family == "qwen2_vl":
        model = build_qwen(tokenizer, dims, dtype=dtype).to(device)
        processor = build_qwen_processor(tokenizer, dims, max_pixels=QWEN_SIDE ** 2, min_pixels=QWEN_SIDE ** 2)
        side = QWEN_SIDE
    elif anyres:
        model = build_llava_next(tokenizer, dims, dtype=dtype, pinpoints=NEXT_PINPOINTS).to(device)
        processor = build_next_processor(tokenizer, dims, NEXT_PINPOINTS)
        side = 2 * dims.image_size
    else:
        model = build_llava(tokenizer, dims, dtype=dtype).to(device)
        processor = build_processor(tokenizer, dims)
        side = dims.image_size
    question = "USER: <image>\nwhat color is the square at the top left ? ASSISTANT:"
    inputs = processor(images=random_images(1, (side, side)), text=question, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    image_kwargs = {k: inputs[k] for k in ("image_sizes", "image_grid_thw") if k in inputs}
    n = args.new_tokens
    cfg = model.config
    element = torch.finfo(dtype).bits // 8
    grid_tokens = int((inputs["input_ids"] == cfg.image_token_id).sum())  # visual tokens (newlines included)
    if family == "qwen2_vl":  # one image at native resolution: t·h·w patches
        tower_images, tower_tokens = 1, int(inputs["image_grid_thw"][0].prod())
    else:
        tower_images = inputs["pixel_values"].shape[1] if anyres else 1
        tower_tokens = (dims.image_size // dims.patch_size) ** 2 + 1

    def prefill():
        with torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)

    def generate(tokens, logits_processor):
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       logits_processor=logits_processor)

    def encode():
        with torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"], **image_kwargs)

    prompt_len = int(inputs["attention_mask"].sum())
    untrained = untrained_routers(cfg.text_config)

    def parse(spec, budget):
        method, options = method_arg(spec, budget)
        if method == "pmod":  # speed does not depend on the routing's quality: zero routers of this model's size
            options.setdefault("routers", untrained)
        return method, options

    configs = [("none", 1.0)]
    for spec in args.methods:
        for budget in args.budgets:
            name, options = parse(spec, budget)
            try:
                restore(compress(model, method=name, **options))
                configs.append((spec, budget))
            except ValueError as err:  # AnyRes-only methods on LLaVA-1.5, trained weights, FastV below K/L
                print(f"skipping {spec} @ {budget}: {err}", file=sys.stderr)

    def apply(method, budget):
        if method != "none":
            name, options = parse(method, budget)
            compress(model, method=name, **options)

    def remove(method):
        if method != "none":
            restore(model)

    # one untimed pass per config: warm-up, peak memory, token counts and per-stage times
    info = {}
    for method, budget in configs:
        apply(method, budget)
        prefill()
        with PeakMemory(device) as mem:
            prefill()
        layers = cfg.text_config.num_hidden_layers
        full_llm = prefill_flops([[prompt_len] * layers], cfg.text_config)
        growth = layers * n / 2  # the cache grows by one entry per layer and step: its mean over the timed steps
        if method == "none":
            info[(method, budget)] = dict(visual_tokens=grid_tokens, llm_tokens=prompt_len, peak=mem.peak,
                                          layer_avg=grid_tokens, flops_llm=full_llm, cache_len=prompt_len,
                                          layer_tokens=[prompt_len] * layers,
                                          flops_decode=decode_flops(layers * prompt_len + growth, cfg.text_config))
        else:
            s = model.compression.stats  # in-LLM methods: FLOPs over their per-layer token counts
            entries = s.kv_cache_bytes / kv_entry_bytes(cfg.text_config, element)  # what decoding starts from
            info[(method, budget)] = dict(visual_tokens=s.visual_tokens_kept, llm_tokens=s.prompt_tokens_llm, peak=mem.peak,
                                          layer_avg=s.layer_avg_visual_tokens, flops_llm=s.prefill_flops,
                                          cache_len=round(entries / layers), layer_tokens=layer_tokens(s, layers),
                                          flops_decode=decode_flops(entries + growth, cfg.text_config))
        remove(method)
    references = sorted({n for v in info.values() for n in v["layer_tokens"]})
    cache_lens = sorted({v["cache_len"] for v in info.values()})
    ref_ids = {n: torch.randint(10, len(tokenizer) - 1, (1, n), device=device) for n in {*references, *cache_lens}}

    def reference(length):
        with torch.no_grad():
            model(input_ids=ref_ids[length], use_cache=True, logits_to_keep=1)

    def reference_generate(length):  # the stock model decoding over a cache of `length` entries per layer
        def run(tokens, logits_processor):
            model.generate(input_ids=ref_ids[length], attention_mask=torch.ones_like(ref_ids[length]),
                           max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           logits_processor=logits_processor)
        return run

    # round-robin over configs inside each repeat, so drift in machine speed hits every config alike
    samples = {c: {"prefill": [], "decode": [], "vision": [], "select": []} for c in configs}
    ref_samples: dict[int, list[float]] = {n: [] for n in references}
    ref_decode: dict[int, list[float]] = {n: [] for n in cache_lens}
    vision_samples: list[float] = []
    for length in cache_lens:  # warm-up of the reference decode
        decode_step_ms(reference_generate(length), device, 2)
    for rep in range(args.repeats):
        vision_samples.append(timed(encode, device, 1) * 1e3)
        for n_ref in references:
            ref_samples[n_ref].append(timed(lambda: reference(n_ref), device, 1) * 1e3)
        for n_cache in cache_lens:
            ref_decode[n_cache] += decode_step_ms(reference_generate(n_cache), device, n)
        for method, budget in configs:
            apply(method, budget)
            entry = samples[(method, budget)]
            entry["prefill"].append(timed(prefill, device, 1) * 1e3)
            if method != "none":
                entry["vision"].append(model.compression.stats.encode_ms)
                entry["select"].append(model.compression.stats.select_ms)
            entry["decode"] += decode_step_ms(generate, device, n)
            remove(method)
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    med = statistics.median
    vision_ms = med(vision_samples)
    rows = []
    for method, budget in configs:
        entry, meta = samples[(method, budget)], info[(method, budget)]
        llm_tokens = meta["llm_tokens"]
        rows.append(
            dict(
                method=method, budget=budget, visual_tokens=meta["visual_tokens"], llm_tokens=llm_tokens,
                layer_avg_visual_tokens=meta["layer_avg"],
                prefill_ms=med(entry["prefill"]), decode_ms_per_token=med(entry["decode"]),
                vision_ms=med(entry["vision"]) if entry["vision"] and med(entry["vision"]) > 0 else vision_ms,  # in-LLM: stock tower
                select_ms=med(entry["select"]) if entry["select"] else 0.0,
                flops_vision=tower_images * vision_flops(cfg.vision_config, tower_tokens),
                flops_llm=meta["flops_llm"], flops_decode=meta["flops_decode"],
                peak_mem_mb=meta["peak"] / 2**20, reference_ms=vision_ms + statistics.fmean(med(ref_samples[t]) for t in meta["layer_tokens"]),
                cache_len=meta["cache_len"], reference_decode_ms=med(ref_decode[meta["cache_len"]]),
                # the fastest of the repeats / the 10th-percentile step: robust to a machine that only ever slows down
                prefill_min_ms=min(entry["prefill"]),
                reference_min_ms=min(vision_samples) + statistics.fmean(min(ref_samples[t]) for t in meta["layer_tokens"]),
                decode_p10_ms=quantile(entry["decode"], 0.1), reference_decode_p10_ms=quantile(ref_decode[meta["cache_len"]], 0.1),
            )
        )

    base = rows[0]
    for r in rows:
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["flops_ideal_speedup"] = (base["flops_vision"] + base["flops_llm"]) / (r["flops_vision"] + r["flops_llm"])
        r["ratio_to_ideal"] = r["prefill_speedup"] / r["flops_ideal_speedup"]
        r["decode_speedup"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["decode_flops_ideal_speedup"] = base["flops_decode"] / r["flops_decode"]
        r["decode_ratio_to_ideal"] = r["decode_speedup"] / r["decode_flops_ideal_speedup"]
        r["select_overhead_pct"] = 100 * r["select_ms"] / r["prefill_ms"]
        r["vs_reference"] = r["prefill_ms"] / r["reference_ms"]
        r["decode_vs_reference"] = r["decode_ms_per_token"] / r["reference_decode_ms"]
        r["vs_reference_min"] = r["prefill_min_ms"] / r["reference_min_ms"]
        r["decode_vs_reference_p10"] = r["decode_p10_ms"] / r["reference_decode_p10_ms"]

    machine = machine_description(device)
    machine.update(dtype=args.dtype, dims=args.dims, dims_values=vars(dims), anyres=anyres, family=family)
    stem = args.out or f"speed_{args.dims}_{device.type}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python eval/speed_bench.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{stem}.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text(to_markdown(rows, machine, command))
    print(to_markdown(rows, machine, command))


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def layer_tokens(stats, layers: int) -> list[int]:
    """Tokens each LLM layer processes on the prompt (batch 1): the text plus that layer's visual tokens."""
    if not stats.layer_visual_tokens:
        return [stats.prompt_tokens_llm] * layers
    text = stats.prompt_tokens_llm - stats.visual_tokens_kept
    return [text + round(v * stats.images) for v in stats.layer_visual_tokens]


def untrained_routers(text_config) -> str:
    """A directory of zero-initialised p-MoD routers for every layer of this LLM (for timing ``pmod``)."""
    import tempfile

    from vlm_compress.modules.pmod import TokenRouters

    path = Path(tempfile.mkdtemp(prefix="pmod-routers-"))
    TokenRouters(text_config.hidden_size, list(range(text_config.num_hidden_layers))).save(path)
    return str(path)


def to_markdown(rows, machine, command) -> str:
    d = machine["dims_values"]
    if machine.get("family") == "qwen2_vl":
        model = (f"Qwen2-VL ViT {d['vision_layers']}×{d['vision_hidden']} (patch {d['patch_size']}, 2×2 merger) + Qwen2 "
                 f"{d['text_layers']}×{d['text_hidden']} ({d['text_heads']} heads / {d['text_kv_heads']} KV, MLP "
                 f"{d['text_intermediate']}, M-RoPE); {QWEN_SIDE}×{QWEN_SIDE} image at native resolution")
    else:
        model = (f"CLIP ViT {d['vision_layers']}×{d['vision_hidden']} at {d['image_size']}/{d['patch_size']} + Llama "
                 f"{d['text_layers']}×{d['text_hidden']} (MLP {d['text_intermediate']})"
                 f"{'; LLaVA-NeXT AnyRes, 672×672 image → thumbnail + 2×2 crops' if machine.get('anyres') else ''}")
    head = (
        f"# Prefill / decode speed ({machine['dims']})\n\n"
        f"Command: `{command}`  \nMachine: {machine['cpu']} ({machine['device']}), {machine['threads']} threads, "
        f"torch {machine['torch']}, {machine['dtype']}, batch 1.  \n"
        f"Model (random weights): {model}.\n\n"
        "`ratio` = measured prefill speed-up / FLOPs-ideal speed-up (in-LLM methods: FLOPs over their per-layer token "
        "counts; `LLM tok` is then the prompt entering layer 0). `vs ref` = our prefill / (stock vision tower + "
        "stock LLM on text-only prompts of the same per-layer lengths, i.e. the mean over layers of the stock LLM's time "
        "at each layer's token count): the cost of our machinery (1.00 = none).\n\n"
        "Decode: `FLOPs-ideal` from the KV entries a step reads (what the prompt left, after any eviction, plus half "
        "the timed steps; `vlm_compress.stats.decode_flops`: projections, MLP and LM head are fixed, attention shrinks). "
        "Each decode step is timed on its own (a timestamp per step from a logits processor; median over all steps "
        "of all repeats). `decode vs ref` = our step / the stock model's step over a text-only cache of the same "
        "length per layer (`cache`; 1.00 = our decode machinery costs nothing). `vs ref (min)` and `decode vs ref "
        "(p10)`: the same ratios from the fastest prefill of the repeats and the 10th-percentile step, which a machine "
        "whose timings only drift upwards (other tenants, allocator) disturbs less than the medians.\n\n"
        "| method | budget | visual tok | layer-avg tok | LLM tok | prefill ms | speed-up | FLOPs-ideal | ratio | vs ref | "
        "vs ref (min) | cache | decode ms/tok | decode speed-up | decode FLOPs-ideal | decode ratio | decode vs ref | "
        "decode vs ref (p10) | vision ms | select ms | select % | peak MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['budget']} | {r['visual_tokens']} | {r['layer_avg_visual_tokens']:.1f} | {r['llm_tokens']} | {r['prefill_ms']:.1f} | "
        f"{r['prefill_speedup']:.2f}× | {r['flops_ideal_speedup']:.2f}× | {r['ratio_to_ideal']:.2f} | {r['vs_reference']:.2f} | "
        f"{r['vs_reference_min']:.2f} | {r['cache_len']} | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f}× | "
        f"{r['decode_flops_ideal_speedup']:.2f}× | {r['decode_ratio_to_ideal']:.2f} | {r['decode_vs_reference']:.2f} | "
        f"{r['decode_vs_reference_p10']:.2f} | {r['vision_ms']:.1f} | {r['select_ms']:.2f} | "
        f"{r['select_overhead_pct']:.1f} | {r['peak_mem_mb']:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

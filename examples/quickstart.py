"""Compress a LLaVA model at two budgets and print the answers and what each budget cost.

    python examples/quickstart.py                       # offline: a random-weight LLaVA (answers are noise)
    python examples/quickstart.py --model PATH --image photo.jpg --question "What is shown?"

PATH is a local LLaVA-1.5 checkpoint in transformers format (e.g. a saved llava-hf/llava-1.5-7b-hf).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from vlm_compress import compress, list_methods, restore


def load(args):
    if args.model:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else None)
        return model.eval(), AutoProcessor.from_pretrained(args.model)
    from vlm_compress.testing import LlavaDims, build_llava, build_processor, build_tokenizer

    dims = LlavaDims(image_size=336, vision_hidden=64, text_hidden=64, text_intermediate=128)
    tokenizer = build_tokenizer()
    return build_llava(tokenizer, dims), build_processor(tokenizer, dims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local LLaVA checkpoint directory (default: random-weight tiny LLaVA)")
    parser.add_argument("--image", help="image file (default: a synthetic scene)")
    parser.add_argument("--question", default="what color is the square ?")
    parser.add_argument("--method", default="cls_attn", choices=list_methods())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.1])
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    model, processor = load(args)
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        canvas = np.full((336, 336, 3), 200, np.uint8)
        canvas[60:140, 200:280] = (220, 30, 30)  # a red square at the top right
        image = Image.fromarray(canvas)
    prompt = f"USER: <image>\n{args.question} ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]

    def answer() -> str:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[0, n_prompt:]
        return f"{processor.decode(new, skip_special_tokens=True).strip()!r} (ids {new.tolist()})"

    print(f"model: {type(model).__name__} ({'random weights' if not args.model else args.model}); prompt {n_prompt} tokens")
    print(f"uncompressed: {answer()}")
    for budget in args.budgets:
        compress(model, budget=budget, method=args.method)
        text = answer()
        s = model.compression.stats
        print(
            f"{args.method} @ {budget}: {text}\n"
            f"    visual tokens {s.visual_tokens_in} -> {s.visual_tokens_kept} entering the LLM "
            f"(layer-averaged {s.layer_avg_visual_tokens:.0f}); prompt {s.prompt_tokens_in} -> {s.prompt_tokens_llm}\n"
            f"    prefill FLOPs {s.prefill_flops / 1e9:.2f} G ({s.flops_ratio:.1%} of full); "
            f"KV cache {s.kv_cache_bytes / 2**20:.2f} MiB (full {s.kv_cache_bytes_full / 2**20:.2f}); "
            f"vision {s.encode_ms:.1f} ms, selection {s.select_ms:.2f} ms"
        )
        restore(model)


if __name__ == "__main__":
    main()

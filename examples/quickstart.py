"""Compress a LLaVA model at two budgets and print the answers and what each budget cost.

    python examples/quickstart.py                       # offline: the embedded trained tiny-llava on ShapesVQA scenes
    python examples/quickstart.py --model PATH --image photo.jpg --question "What is shown?"

PATH is a local LLaVA-1.5 checkpoint in transformers format (e.g. a saved llava-hf/llava-1.5-7b-hf). Without
``--model`` the example runs the shipped ``tiny-llava`` (trained on ShapesVQA, 144 visual tokens per image) on three
held-out scenes and prints the true answer beside each one, so what compression costs is visible.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from vlm_compress import compress, list_methods, restore
from vlm_compress.bench.data import ASSETS, shapes_items


def load(args):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = args.model or str(ASSETS / "tiny-llava")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def examples(args) -> list[tuple[Image.Image, str, str | None]]:
    """(image, question, true answer or None): the user's image, or held-out ShapesVQA scenes for tiny-llava."""
    if args.image:
        return [(Image.open(args.image).convert("RGB"), args.question or "What is shown?", None)]
    if args.model:
        canvas = np.full((336, 336, 3), 200, np.uint8)
        canvas[60:140, 200:280] = (220, 30, 30)  # a red square at the top right
        return [(Image.fromarray(canvas), args.question or "What color is the square?", "red")]
    return [(item.image, args.question or item.question, None if args.question else item.answer)
            for item in shapes_items(3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local LLaVA checkpoint directory (default: the embedded trained tiny-llava)")
    parser.add_argument("--image", help="image file (default: held-out ShapesVQA scenes)")
    parser.add_argument("--question", help="question (default: each scene's own)")
    parser.add_argument("--method", default="cls_attn", choices=list_methods())
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.11])
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    model, processor = load(args)
    cases = examples(args)
    prompts = [f"USER: <image>\n{question} ASSISTANT:" for _, question, _ in cases]
    inputs = processor(images=[image for image, _, _ in cases], text=prompts, return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]

    def answers() -> list[str]:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return [t.strip() for t in processor.batch_decode(out[:, width:], skip_special_tokens=True)]

    print(f"model: {args.model or 'embedded tiny-llava (trained on ShapesVQA)'}; {len(cases)} prompt(s), "
          f"{int((inputs['input_ids'][0] == model.config.image_token_id).sum())} visual tokens per image")
    for (_, question, truth), text in zip(cases, answers()):
        print(f"  Q: {question}  uncompressed: {text!r}" + (f"  (true: {truth!r})" if truth else ""))
    for budget in args.budgets:
        compress(model, budget=budget, method=args.method)
        texts = answers()
        s = model.compression.stats
        print(f"{args.method} @ {budget}:")
        for (_, question, truth), text in zip(cases, texts):
            print(f"  Q: {question}  A: {text!r}" + (f"  (true: {truth!r})" if truth else ""))
        print(
            f"    visual tokens {s.visual_tokens_in} -> {s.visual_tokens_kept} entering the LLM "
            f"(layer-averaged {s.layer_avg_visual_tokens:.0f} per image); prompt {s.prompt_tokens_in} -> {s.prompt_tokens_llm}\n"
            f"    prefill FLOPs {s.prefill_flops / 1e9:.3f} G ({s.flops_ratio:.1%} of full); "
            f"KV cache {s.kv_cache_bytes / 2**20:.2f} MiB (full {s.kv_cache_bytes_full / 2**20:.2f}); "
            f"vision {s.encode_ms:.1f} ms, selection {s.select_ms:.2f} ms"
        )
        restore(model)


if __name__ == "__main__":
    main()

"""M3 fine-tuning of the embedded ``tiny-llava`` (Cai et al., arXiv 2405.17430; reference trained-tokenizers-speculative §2).

    python -m vlm_compress.bench.train_m3 --out vlm_compress/assets/tiny-llava-m3 --minutes 15

Every step runs the batch at each nested scale of the ``m3`` method (12×12, 6×6, 3×3 and 1×1 pooled projector
outputs: 144, 36, 9, 1 tokens) and averages the losses, as the official ``forward`` does over its five scales.
The vision tower stays frozen (the official recipe also tunes it, at a lower rate); the projector and the LLM are
trained. The result is a stock ``LlavaForConditionalGeneration`` checkpoint saved in float16 (half the size of
``tiny-llava``), to be run with ``method="m3"``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import compat
from ..pruners.m3 import m3_kernels
from .task import ShapesTask
from .timing import machine_description
from .train import add_training_arguments, build_tokenizer, make_batch, schedule
from .train_mqt import patch_features


def pooled_tokens(model, pixel_values: torch.Tensor, grid: int, kernel: int) -> torch.Tensor:
    """``[B, (grid/kernel)², D]`` projector outputs average-pooled with kernel = stride ``kernel``."""
    feats = model.model.multi_modal_projector(patch_features(model, pixel_values))
    b, n, d = feats.shape
    pooled = F.avg_pool2d(feats.transpose(1, 2).reshape(b, d, grid, grid), kernel, kernel)
    return pooled.flatten(2).transpose(1, 2)


def scale_loss(model, batch, grid: int, kernel: int) -> torch.Tensor:
    tokens = pooled_tokens(model, batch["pixel_values"], grid, kernel)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 **compat.encoded_images(tokens)).loss


@torch.no_grad()
def evaluate(model, task, tokenizer, grid: int, kernel: int, count: int = 200, batch_size: int = 50) -> float:
    model.eval()
    correct, tokens = 0, (grid // kernel) ** 2
    for start in range(0, count, batch_size):
        batch = make_batch(task, tokenizer, "val", range(start, min(start + batch_size, count)), grid,
                           image_tokens=tokens)
        answers = batch["input_ids"][:, -2]
        feats = pooled_tokens(model, batch["pixel_values"], grid, kernel)
        logits = model(input_ids=batch["input_ids"][:, :-2], attention_mask=batch["attention_mask"][:, :-2],
                       logits_to_keep=1,
                       **compat.encoded_images(feats)).logits
        correct += int((logits[:, -1].argmax(-1) == answers).sum())
    model.train()
    return correct / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, out="tiny-llava-m3", minutes=15, lr=2e-4, warmup=30, eval_every=200)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.base, dtype=torch.float32).train()
    model.model.vision_tower.requires_grad_(False)
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    kernels = m3_kernels((grid, grid))
    task, tokenizer = ShapesTask(canvas=vision.image_size, cell=vision.patch_size), build_tokenizer()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    log = {"args": vars(args), "kernels": kernels,
           "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()}, "history": []}
    start, step = time.time(), 0
    lr_at, running = schedule(args, 0, start)
    rng = np.random.default_rng(args.seed)
    while running(step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        indices = rng.integers(0, 10**9, args.batch_size)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for kernel in kernels:  # the loss averaged over the scales, one backward each to bound memory
            batch = make_batch(task, tokenizer, "train", indices, grid, args.turns, np.random.default_rng(step),
                               image_tokens=(grid // kernel) ** 2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = scale_loss(model, batch, grid, kernel) / len(kernels)
            loss.backward()
            losses.append(loss.item() * len(kernels))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step} losses by scale {[round(x, 3) for x in losses]} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            scores = {(grid // k) ** 2: evaluate(model, task, tokenizer, grid, k) for k in kernels}
            log["history"].append(dict(step=step, seconds=time.time() - start, val_acc=scores))
            print(f"== step {step} val acc by tokens {scores}", flush=True)
    out = Path(args.out)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    AutoProcessor.from_pretrained(args.base).save_pretrained(out)
    log.update(steps=step, seconds=time.time() - start)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()

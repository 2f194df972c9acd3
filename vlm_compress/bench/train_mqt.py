"""Train an MQT resampler (:mod:`vlm_compress.modules.resampler`) for the embedded ``tiny-llava``.

    python -m vlm_compress.bench.train_mqt --out vlm_compress/assets/tiny-llava-mqt --minutes 15

MQT-LLaVA's second stage draws the number of queries ``m`` uniformly from {2, 4, …, M} for every batch (reference
§3.2), so that any prefix of the queries works. We do the same with ``M`` = 64 queries for the 144-patch grid.
Unlike the paper, the LLM and the tower stay frozen and only the resampler (~0.1 M parameters) is trained, so it
ships small and runs on the unchanged ``tiny-llava``; the official recipe also fine-tunes the LLM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import compat
from ..modules.resampler import QueryResampler, ResamplerConfig
from .timing import machine_description
from .train import add_training_arguments, frozen_base, make_batch, optimizer_step, schedule


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, N, Dv]`` the feature layer's patch tokens (CLS dropped), as LLaVA feeds its projector."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def answer_loss(model, resampler, batch, m: int) -> torch.Tensor:
    tokens = resampler(patch_features(model, batch["pixel_values"]), m)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                **compat.encoded_images(tokens))
    return out.loss


@torch.no_grad()
def evaluate(model, resampler, task, tokenizer, grid: int, m: int, count: int = 200, batch_size: int = 50) -> float:
    """First-token accuracy on ``count`` validation samples with ``m`` queries."""
    resampler.eval()
    correct = 0
    for start in range(0, count, batch_size):
        idx = range(start, min(start + batch_size, count))
        batch = make_batch(task, tokenizer, "val", idx, grid, image_tokens=m)
        answers = batch["input_ids"][:, -2]
        batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, :-2], batch["attention_mask"][:, :-2]
        tokens = resampler(patch_features(model, batch["pixel_values"]), m)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1,
                       **compat.encoded_images(tokens)).logits
        correct += int((logits[:, -1].argmax(-1) == answers).sum())
    resampler.train()
    return correct / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, out="tiny-llava-mqt", minutes=15, lr=1e-3, warmup=50, eval_every=200)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()

    model, grid, task, tokenizer = frozen_base(args)
    vision, text = model.config.vision_config, model.config.text_config
    resampler = QueryResampler(ResamplerConfig(args.queries, vision.hidden_size, text.hidden_size, 4)).train()
    optimizer = torch.optim.AdamW(resampler.parameters(), lr=args.lr, weight_decay=0.01)
    log = {"args": vars(args), "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()},
           "history": []}
    start, step = time.time(), 0
    lr_at, running = schedule(args, 0, start)
    rng = np.random.default_rng(args.seed)
    choices = list(range(2, args.queries + 1, 2))  # MQT's second stage: m ~ U{2, 4, …, M}
    while running(step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        m = int(rng.choice(choices))
        batch = make_batch(task, tokenizer, "train", rng.integers(0, 10**9, args.batch_size), grid, args.turns, rng,
                           image_tokens=m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, resampler, batch, m)
        optimizer_step(loss, optimizer, list(resampler.parameters()))
        step += 1
        if step % 20 == 0:
            print(f"step {step} m {m} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            scores = {m: evaluate(model, resampler, task, tokenizer, grid, m) for m in (4, 16, args.queries)}
            log["history"].append(dict(step=step, seconds=time.time() - start, val_acc=scores))
            print(f"== step {step} val acc by m {scores}", flush=True)
    resampler.save(args.out)
    log.update(steps=step, seconds=time.time() - start)
    (Path(args.out) / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()

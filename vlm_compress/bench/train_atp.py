"""Train ATP threshold heads (:mod:`vlm_compress.modules.atp`) for the embedded, frozen ``tiny-llava``.

    python -m vlm_compress.bench.train_atp --out vlm_compress/assets/tiny-llava-atp --minutes 8

Every batch draws a target budget ``β ~ U[--min-budget, --max-budget]``, runs the model with soft ATP masks
(``ATPPruner(soft=True)``: attention log-bias, nothing dropped) and minimises the answer cross-entropy plus
``--budget-weight · (layer-averaged soft share − β)²`` (our form of the paper's budget-constrained loss, see
:mod:`vlm_compress.pruners.atp`). The LLM stays frozen; only the heads (~100 parameters per ATP layer) learn. The
prompt stops before the answer, so the text rows that score the image are the question's, as at inference.
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

from .. import compress, restore
from ..modules.atp import ThresholdHeads
from ..pruners.atp import ATPPruner, load_heads
from .timing import machine_description
from .train import add_training_arguments, frozen_base, make_batch, optimizer_step, schedule



def prompt_and_answer(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) without the answer and EOS (left padding), and the answer ids [B]."""
    return batch["input_ids"][:, :-2], batch["attention_mask"][:, :-2], batch["input_ids"][:, -2]


@torch.no_grad()
def evaluate(model, config: ATPPruner, task, tokenizer, grid: int, count: int, batch_size: int = 64):
    """(first-token accuracy, layer-averaged visual share) with hard ATP pruning on the validation split."""
    compress(model, method=config)
    correct, shares = 0, []
    try:
        for start in range(0, count, batch_size):
            batch = make_batch(task, tokenizer, "val", range(start, min(start + batch_size, count)), grid)
            ids, mask, answers = prompt_and_answer(batch)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], logits_to_keep=1).logits
            correct += int((logits[:, -1].argmax(-1) == answers).sum())
            shares.append(model.compression.stats.layer_avg_visual_tokens / grid ** 2)
    finally:
        restore(model)
    return correct / count, float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, out="tiny-llava-atp", minutes=8, lr=2e-2, warmup=20, eval_every=100)
    parser.add_argument("--budget-weight", type=float, default=20.0)
    parser.add_argument("--temperature", type=float, default=50.0, help="soft-mask temperature T")
    parser.add_argument("--min-budget", type=float, default=0.3)
    parser.add_argument("--max-budget", type=float, default=0.8)
    parser.add_argument("--eval-count", type=int, default=256)
    args = parser.parse_args()

    model, grid, task, tokenizer = frozen_base(args)
    text = model.config.text_config

    out = Path(args.out)
    layers = list(ATPPruner().scoring_layers(text.num_hidden_layers))
    ThresholdHeads(layers).save(out)
    load_heads.cache_clear()
    heads = load_heads(str(out)).train().requires_grad_(True)
    params = list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    log = {"args": vars(args), "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()},
           "atp_layers": layers, "history": []}
    start, step = time.time(), 0
    lr_at, running = schedule(args, 0, start)
    rng = np.random.default_rng(args.seed)

    def record():
        scores = {}
        for budget in (0.5, 0.33):
            accuracy, share = evaluate(model, ATPPruner(budget=budget, heads=str(out)), task, tokenizer, grid, args.eval_count)
            scores[str(budget)] = {"accuracy": accuracy, "layer_avg_share": share}
        log["history"].append(dict(step=step, seconds=time.time() - start, val=scores))
        print(f"== step {step} {scores}", flush=True)

    record()
    while running(step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        budget = float(rng.uniform(args.min_budget, args.max_budget))
        config = ATPPruner(budget=budget, heads=str(out), soft=True, temperature=args.temperature)
        batch = make_batch(task, tokenizer, "train", rng.integers(0, 10**9, args.batch_size), grid)
        ids, mask, answers = prompt_and_answer(batch)
        compress(model, method=config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], logits_to_keep=1).logits
        share = config.soft_layer_average(model.compression.prefill.ctx)
        restore(model)
        task_loss = F.cross_entropy(logits[:, -1].float(), answers)
        budget_loss = (share.mean() - budget) ** 2
        optimizer_step(task_loss + args.budget_weight * budget_loss, optimizer, params)
        step += 1
        if step % 10 == 0:
            print(f"step {step} β {budget:.2f} share {share.mean().item():.3f} ce {task_loss.item():.3f} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            record()
    if log["history"][-1]["step"] != step:
        record()
    heads.eval().save(out)
    log.update(steps=step, seconds=time.time() - start, params=sum(p.numel() for p in params))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()

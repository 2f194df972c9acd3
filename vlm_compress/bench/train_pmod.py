"""Fine-tune the embedded ``tiny-llava`` with p-MoD routing (:mod:`vlm_compress.pruners.pmod`).

    python -m vlm_compress.bench.train_pmod --out vlm_compress/assets/tiny-llava-pmod --minutes 12

As in p-MoD (reference trained-tokenizers-speculative §1.2), the routers start at zero (every weight exactly 1,
so step 0 is the dense model with an arbitrary top-k) and are trained jointly with the LLM through STRing, on the
answer loss alone; here the vision tower and projector stay frozen, so only the routers and fp16 deltas of the
decoder layers ship. The official schedule is ``R̄ = 0.5`` on every batch; we train half the batches at 0.5 and
half at ``R̄ ~ U[0, 0.5]`` (a deviation, so that lower layer-averaged budgets are in the training distribution
too) and give every layer a router (with ``R̄ < 0.35`` layer 0 of a 4-layer LLM routes as well).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import compress, restore
from ..modules.pmod import TokenRouters, save_deltas, shifted_cos_ratios
from ..pruners.pmod import PModPruner, load_routers
from .timing import machine_description
from .train import add_training_arguments, frozen_base, evaluate, make_batch, optimizer_step, schedule



def evaluate_at(model, config: PModPruner | None, task, tokenizer, grid: int, count: int) -> float:
    """First-token validation accuracy with routing by ``config`` (``None``: the dense model)."""
    if config is not None:
        compress(model, method=config)
    try:
        with torch.no_grad():
            return evaluate(model, task, tokenizer, grid, count=count)[0]
    finally:
        if config is not None:
            restore(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, out="tiny-llava-pmod", minutes=12, lr=3e-4, warmup=30, eval_every=100)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--eval-count", type=int, default=256)
    args = parser.parse_args()

    base, grid, task, tokenizer = frozen_base(args)
    model = copy.deepcopy(base)
    layers = model.model.language_model.layers
    layers.requires_grad_(True)
    text = model.config.text_config

    out = Path(args.out)
    meta = dict(base=os.path.relpath(Path(args.base).resolve(), out.resolve()), router_factor=0.5, max_ratio=0.85,
                min_ratio=0.15, weight_scale=0.2)
    TokenRouters(text.hidden_size, list(range(text.num_hidden_layers))).save(out, **meta)
    load_routers.cache_clear()
    routers = load_routers(str(out)).train()  # the module every PModPruner(routers=out) below uses
    routers.requires_grad_(True)
    decoder = [p for p in layers.parameters()]
    optimizer = torch.optim.AdamW([{"params": decoder, "lr_scale": 1.0},
                                   {"params": list(routers.parameters()), "lr_scale": 3.0}], lr=args.lr, weight_decay=0.0)
    log = {"args": vars(args), "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()},
           "schedule_0.5": shifted_cos_ratios(text.num_hidden_layers, 0.5), "history": []}
    start, step = time.time(), 0
    lr_at, running = schedule(args, 0, start)
    rng = np.random.default_rng(args.seed)

    def record():
        official = PModPruner(routers=str(out), router_factor=0.5)
        low = PModPruner(routers=str(out), router_factor=0.0)
        scores = {"dense": evaluate_at(model, None, task, tokenizer, grid, args.eval_count),
                  "R=0.5": evaluate_at(model, official, task, tokenizer, grid, args.eval_count),
                  "R=0.0": evaluate_at(model, low, task, tokenizer, grid, args.eval_count)}
        log["history"].append(dict(step=step, seconds=time.time() - start, val_acc=scores))
        print(f"== step {step} val acc {scores}", flush=True)

    record()
    model.train()
    while running(step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step) * group["lr_scale"]
        factor = 0.5 if step % 2 == 0 else float(rng.uniform(0.0, 0.5))
        compress(model, method=PModPruner(routers=str(out), router_factor=factor))
        batch = make_batch(task, tokenizer, "train", rng.integers(0, 10**9, args.batch_size), grid, args.turns, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["labels"], use_cache=False).loss
        restore(model)
        optimizer_step(loss, optimizer, decoder + list(routers.parameters()))
        step += 1
        if step % 10 == 0:
            print(f"step {step} R̄ {factor:.2f} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            record()
            model.train()
    if not log["history"] or log["history"][-1]["step"] != step:
        record()
    routers.eval().save(out, **meta)
    delta_bytes = save_deltas(model, base, out)
    log.update(steps=step, seconds=time.time() - start, delta_bytes=delta_bytes,
               router_params=sum(p.numel() for p in routers.parameters()))
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()

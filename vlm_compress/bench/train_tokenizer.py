"""Train the embedded image tokenizers (``tiny-flextok``, ``tiny-seed``, ``tiny-vq``) on 64×64 scenes, from scratch.

    python -m vlm_compress.bench.train_tokenizer --kind flextok --out vlm_compress/assets/tiny-flextok --steps 1200
    python -m vlm_compress.bench.train_tokenizer --kind seed --out vlm_compress/assets/tiny-seed --steps 1500
    python -m vlm_compress.bench.train_tokenizer --kind vqgan --out vlm_compress/assets/tiny-vq --steps 3000

FlexTok and SEED train on the ShapesVQA scenes (:mod:`.tokenizer_data`); the grid VQ on the class-conditional scenes
its image generators model (:mod:`.generation_data`).

Every step draws fresh scenes (``train`` split, never repeated), so there is no epoch and no overfitting to a
fixed set. The model's own ``training_loss`` defines the objective (FlexTok: rectified flow with nested dropout;
SEED: its stage-II losses plus the pixel decoder). AdamW, linear warm-up then cosine to a tenth (``train.schedule``).
A checkpoint and ``train_log.json`` (arguments, machine, loss history, final validation figures) are written
every ``--save-every`` steps, so an interrupted run keeps its progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from .. import tokenizers_visual as tv
from ..tokenizers_visual.base import psnr
from .timing import machine_description
from . import generation_data
from .tokenizer_data import SCENES, scene_images
from .train import LossHistory, optimizer_step, schedule

KINDS = ("flextok", "seed", "vqgan")


def training_images(kind: str, split: str, start: int, count: int):
    """``[count, 64, 64, 3]`` uint8 training/validation images for a tokenizer kind."""
    if kind == "vqgan":
        return generation_data.class_scenes(split, start, count)[0]
    return scene_images(split, start, count)


@torch.no_grad()
def validate(model, count: int = 32) -> dict:
    """Validation figures: FlexTok PSNR per prefix length; SEED embedding cosine, codebook use and pixel PSNR."""
    model.eval()
    images = model.preprocess(training_images(model.kind, "val", 0, count))
    if isinstance(model, tv.VQGANTokenizer):
        ids = model.encode(images)
        out = {"psnr": round(float(psnr(images, model.decode(ids)).mean()), 2),
               "codes_used": int(ids.unique().numel())}
    elif isinstance(model, tv.FlexTokTokenizer):
        ids = model.encode(images)
        out = {}
        for k in (1, 4, 16, 64, model.max_tokens):
            recon = model.decode(ids[:, :k], generator=torch.Generator().manual_seed(0))
            out[f"psnr@{k}"] = round(float(psnr(images, recon).mean()), 2)
    else:
        out = {k: round(v, 4) for k, v in model.evaluate(images).items()}
    model.train()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--out", required=True, help="Folder to write config.json, model.safetensors, train_log.json.")
    parser.add_argument("--config", default="{}", help=(
        "JSON overrides of the model config, e.g. '{\"width\": 96}'; with --resume only options that leave the weights' "
        "shapes alone (e.g. nested_dropout, time_mean)."))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=0, help="Stop early after this many minutes (0: no cap).")
    parser.add_argument("--stop-at", type=int, default=0, help=(
        "Stop after this step (counted from the run's start), keeping the learning-rate schedule of --steps (0: run "
        "them all)."))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                        help="Precision of the saved weights (the shipped models: float16).")
    parser.add_argument("--resume", action="store_true", help=(
        "Continue the model in --out for --steps more steps (fresh AdamW moments, its own warm-up and cosine; the "
        "log's history continues)."))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cls = {"flextok": tv.FlexTokTokenizer, "seed": tv.SeedTokenizer, "vqgan": tv.VQGANTokenizer}[args.kind]
    config_cls = cls.config_class
    out = Path(args.out)
    previous = json.loads((out / "train_log.json").read_text()) if args.resume else None
    if args.resume:
        from ..tokenizers_visual.checkpoints import load_tokenizer

        model = load_tokenizer(out)
        if json.loads(args.config):  # a curriculum: training-time options may change between runs (log: "runs")
            model.config = dataclasses.replace(model.config, **json.loads(args.config))
    elif args.kind == "seed":  # the target space: a small open_clip ViT with seeded random weights (module docstring)
        config = config_cls(**json.loads(args.config))
        target = tv.build_clip_target(tv.tiny_clip_config(config.embedding_dim, config.image_size), seed=args.seed)
        model = cls(config, target=target)
    else:
        model = cls(config_cls(**json.loads(args.config)))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    args.minutes = args.minutes or 0
    step0 = previous["steps_done"] if previous else 0
    lr_at, _ = schedule(argparse.Namespace(steps=args.steps, minutes=0, warmup=args.warmup, lr=args.lr), step0,
                        time.time())
    data = ({"scenes": "generation_data.class_scenes", "classes": list(generation_data.CLASS_NAMES),
             **generation_data.SCENES.describe()} if args.kind == "vqgan" else SCENES.describe())
    log = {"args": vars(args), "data": data, "machine": machine_description(torch.device("cpu")),
           "parameters": sum(p.numel() for p in trainable), "history": []}
    if previous:
        log = {**previous, "history": previous["history"], "runs": [*previous.get("runs", [previous["args"]]), vars(args)]}
    start, losses = time.time(), LossHistory(log["history"], args.log_every)
    generator = torch.Generator().manual_seed(args.seed + step0)
    for step in range(step0, step0 + args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        pixels = model.preprocess(training_images(args.kind, "train", step * args.batch_size, args.batch_size))
        loss = model.training_loss(pixels, generator=generator)
        optimizer_step(loss, optimizer, trainable)
        model.after_step(step)
        losses.add(step, loss.item(), lr_at(step))
        last = (step + 1 == step0 + args.steps or (args.minutes and time.time() - start > args.minutes * 60)
                or (args.stop_at and step + 1 == step0 + args.stop_at))
        if (step + 1) % args.save_every == 0 or last:
            log["steps_done"] = step + 1
            log["validation"] = validate(model)
            print(json.dumps({"step": step + 1, **log["validation"]}), flush=True)
            model.save_pretrained(out, dtype=getattr(torch, args.save_dtype))
            (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
        if last:
            break


if __name__ == "__main__":
    main()

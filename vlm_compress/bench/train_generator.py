"""Train the embedded class-conditional image generators and the classifier that judges them, on the class scenes.

    python -m vlm_compress.bench.train_generator --kind target --out vlm_compress/assets/tiny-imagegpt --steps 2000
    python -m vlm_compress.bench.train_generator --kind drafter --out vlm_compress/assets/tiny-imagegpt-drafter \\
        --teacher vlm_compress/assets/tiny-imagegpt --steps 1500 \\
        --config '{"width": 128, "depth": 2, "heads": 4, "mlp_hidden": 384}'
    python -m vlm_compress.bench.train_generator --kind classifier --out vlm_compress/assets/tiny-scene-classifier \\
        --steps 800 --lr 2e-3

* ``target``: an :class:`~vlm_compress.speculative.ImageGPT` on the ``tiny-vq`` codes of the class scenes
  (:mod:`.generation_data`), next-code cross-entropy with the class dropped to the null class 10 % of the time.
* ``drafter``: a smaller ImageGPT distilled from the target: cross-entropy against the target's distributions on
  the same sequences (soft labels, the self-distillation speculative drafters are trained with; LANTERN's EAGLE
  drafters distil on the target's own generations).
* ``classifier``: :class:`~.generation_quality.SceneClassifier` on real scenes, half of each batch replaced by their
  ``--vq`` reconstructions (``--recon-share``), so that it judges what the codes carry (shape, colour) and not the
  pixel noise that generated images never have.

The code dataset is built at start: ``--scenes`` training scenes, rendered and encoded once with the VQ (epochs
reuse them). AdamW, linear warm-up then cosine to a tenth (``train.schedule``). Weights and ``train_log.json``
(arguments, machine, loss history, validation) are written every ``--save-every`` steps and at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..speculative import ImageGPT, ImageGPTConfig
from ..speculative.gpt import parameter_count
from ..tokenizers_visual import load_tokenizer, to_pixels
from . import generation_data
from .generation_quality import ClassifierConfig, SceneClassifier
from .timing import machine_description
from .train import LossHistory, optimizer_step, schedule

KINDS = ("target", "drafter", "classifier")


@torch.no_grad()
def encode_scenes(vq, split: str, count: int, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` scenes of ``split`` → ``(codes [count, grid²], classes [count])``."""
    codes, classes = [], []
    for start in range(0, count, batch):
        images, labels = generation_data.class_scenes(split, start, min(batch, count - start))
        codes.append(vq.encode(vq.preprocess(images)))
        classes.append(torch.from_numpy(labels))
    return torch.cat(codes), torch.cat(classes)


@torch.no_grad()
def validate_generator(model: ImageGPT, codes, classes, teacher: ImageGPT | None = None) -> dict:
    """Cross-entropy (nats per code) on held-out sequences; for a drafter also how well it predicts the teacher:
    the expected acceptance ``Σ min(p, q)`` of one sampled draft and the share of positions where the argmaxes agree."""
    model.eval()
    inputs = torch.cat([model.class_ids(classes), codes[:, :-1]], 1)
    logits = model(inputs)
    out = {"val_ce": round(float(F.cross_entropy(logits.flatten(0, 1), codes.flatten())), 4)}
    if teacher is not None:
        p, q = teacher(inputs).softmax(-1), logits.softmax(-1)
        out["val_expected_acceptance"] = round(float(torch.minimum(p, q).sum(-1).mean()), 4)
        out["val_argmax_agreement"] = round(float((p.argmax(-1) == q.argmax(-1)).float().mean()), 4)
    model.train()
    return out


@torch.no_grad()
def validate_classifier(model: SceneClassifier, vq=None, count: int = 1024) -> dict:
    """Accuracy on held-out real scenes and, with a ``vq``, on their reconstructions."""
    model.eval()
    images, labels = generation_data.class_scenes("val", 0, count)
    pixels, labels = to_pixels(images), torch.from_numpy(labels)
    out = {"val_accuracy": round(float((model.predict(pixels) == labels).float().mean()), 4)}
    if vq is not None:
        recon = torch.cat([vq.decode(vq.encode(pixels[i:i + 256])) for i in range(0, count, 256)])
        out["val_accuracy_reconstructed"] = round(float((model.predict(recon) == labels).float().mean()), 4)
    model.train()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="{}", help="JSON overrides of the model config, e.g. '{\"depth\": 2}'.")
    parser.add_argument("--vq", default="tiny-vq", help="The VQ tokenizer whose codes are modelled.")
    parser.add_argument("--teacher", default=None, help="drafter: the target ImageGPT folder distilled from.")
    parser.add_argument("--scenes", type=int, default=60000, help="Training scenes encoded once at start.")
    parser.add_argument("--recon-share", type=float, default=0.5,
                        help="classifier: share of each batch shown as --vq reconstructions (0: real scenes only).")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    log = {"args": vars(args), "data": {"scenes": "generation_data.class_scenes", "classes": list(
        generation_data.CLASS_NAMES), **generation_data.SCENES.describe()},
        "machine": machine_description(torch.device("cpu")), "history": []}
    teacher = None
    vq = load_tokenizer(args.vq) if args.kind != "classifier" or args.recon_share > 0 else None
    if args.kind == "classifier":
        model = SceneClassifier(ClassifierConfig(**json.loads(args.config)))
        log["vq"] = args.vq if vq is not None else None
    else:
        start = time.time()
        codes, classes = encode_scenes(vq, "train", args.scenes)
        val_codes, val_classes = encode_scenes(vq, "val", 2048)
        log["dataset"] = {"train_scenes": args.scenes, "val_scenes": 2048, "vq": args.vq,
                          "codes_used": int(codes.unique().numel()), "encode_minutes": round((time.time() - start) / 60, 2)}
        print(json.dumps(log["dataset"]), flush=True)
        config = ImageGPTConfig(**{"codebook_size": vq.codebook_size, "grid": vq.grid,
                                   "num_classes": generation_data.NUM_CLASSES, **json.loads(args.config)})
        model = ImageGPT(config)
        if args.kind == "drafter":
            if not args.teacher:
                parser.error("--kind drafter needs --teacher (the target ImageGPT folder)")
            teacher = ImageGPT.from_pretrained(args.teacher)
            log["teacher"] = args.teacher
    model.train()
    log["parameters"] = parameter_count(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    lr_at, _ = schedule(argparse.Namespace(steps=args.steps, minutes=0, warmup=args.warmup, lr=args.lr), 0, time.time())
    generator = torch.Generator().manual_seed(args.seed)
    losses = LossHistory(log["history"], args.log_every)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if args.kind == "classifier":
            images, labels = generation_data.class_scenes("train", step * args.batch_size, args.batch_size)
            pixels = to_pixels(images)
            shown = round(args.recon_share * len(pixels)) if vq is not None else 0
            if shown:
                with torch.no_grad():
                    pixels[:shown] = vq.decode(vq.encode(pixels[:shown]))
            loss = F.cross_entropy(model(pixels), torch.from_numpy(labels))
        else:
            rows = torch.randint(len(codes), (args.batch_size,), generator=generator)
            loss = model.training_loss(codes[rows], classes[rows], generator=generator, teacher=teacher)
        optimizer_step(loss, optimizer, model.parameters())
        losses.add(step, loss.item(), lr_at(step))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            log["steps_done"] = step + 1
            log["validation"] = (validate_classifier(model, vq) if args.kind == "classifier" else
                                 validate_generator(model, val_codes, val_classes, teacher))
            print(json.dumps({"step": step + 1, **log["validation"]}), flush=True)
            if args.kind == "classifier":
                model.save_pretrained(out)
            else:
                model.save_pretrained(out, dtype=torch.float16)
            (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()

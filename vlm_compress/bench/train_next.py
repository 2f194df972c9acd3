"""Train the embedded ``tiny-llava-next`` (stock ``LlavaNextForConditionalGeneration``, AnyRes) from ``tiny-llava``.

    python -m vlm_compress.bench.train_next --base vlm_compress/assets/tiny-llava \\
        --out vlm_compress/assets/tiny-llava-next --minutes 40

Scenes are 192×192 with 4–10 objects of 5–7 pixels: the 96-pixel thumbnail halves them (colour survives, shape
mostly does not), the 2×2 grid of 96-pixel crops sees them as ``tiny-llava`` does. Each image becomes 144
thumbnail tokens + 576 high-resolution tokens + 24 newlines = 744 visual tokens. The vision tower, projector and
LLM start from ``tiny-llava`` (the tower stays frozen: crops look like its training images); the projector, the
LLM and the newline embedding are fine-tuned on the local question types (the colour of a shape, the shape of a
colour, presence, count: region and left/right questions would need the crop's place in the image, which a
crop's tokens do not carry), with several questions per image as in :mod:`.train`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..testing import TINY_LLAVA_DIMS, build_llava_next, build_next_processor
from .task import ShapesTask
from .timing import machine_description
from .train import (
    GroundingProbe, attention_mass_loss, image_columns, optimizer_step, question_targets, schedule, target_mask,
    word_grounding,
)

NEXT_TASK = ShapesTask(canvas=192, cell=8, objects=(4, 10),
                       question_types=("color_of_shape", "shape_of_color", "presence", "count"))
PINPOINTS = [[96, 192], [192, 96], [192, 192]]  # up to 2×2 crops of the tower's 96-pixel input


def initial_model(base: Path):
    """A ``LlavaNextForConditionalGeneration`` holding ``tiny-llava``'s weights (only ``image_newline`` is new)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    model = build_llava_next(tokenizer, TINY_LLAVA_DIMS, pinpoints=PINPOINTS)
    source = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if set(missing) != {"model.image_newline"} or unexpected:
        raise RuntimeError(f"unexpected weight mismatch: missing {missing}, unexpected {unexpected}")
    with tempfile.TemporaryDirectory() as tmp:  # train on the image backend that AutoProcessor will load
        build_next_processor(tokenizer, TINY_LLAVA_DIMS, PINPOINTS).save_pretrained(tmp)
        processor = AutoProcessor.from_pretrained(tmp)
    return model, processor


def make_batch(processor, task: ShapesTask, split: str, indices, turns: int, rng):
    """Processor inputs for multi-turn conversations about each image, with labels on every answer and EOS, and
    the grounding targets of :mod:`.train` mapped onto the packed visual tokens (the high-resolution cell of each
    object: ``thumbnail + row · (cols + 1) + col``, the +1 being the row's newline)."""
    from PIL import Image

    samples = [task.sample_at(split, int(i)) for i in indices]
    texts, conversations = [], []
    for s in samples:
        extra = task.questions_about(s.objects, rng, turns - 1) if turns > 1 else []
        conversations.append([(s.question, s.answer, s.qtype)] + extra)
        texts.append(s.prompt + f" {s.answer} </s>" + "".join(f" USER: {q} ASSISTANT: {a} </s>" for q, a, _ in extra))
    inputs = processor(images=[Image.fromarray(s.image) for s in samples], text=texts, return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    assistant = ids == processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
    answer_positions = assistant.nonzero()[:, 1].view(len(samples), turns)
    after_assistant = torch.zeros_like(ids, dtype=torch.bool)
    after_assistant[:, 1:] |= assistant[:, :-1]  # the answer
    after_assistant[:, 2:] |= assistant[:, :-2]  # its EOS
    inputs["labels"] = ids.masked_fill(~after_assistant, -100)

    rows, cols = task.rows, task.cols
    thumbnail = TINY_LLAVA_DIMS.image_size // TINY_LLAVA_DIMS.patch_size
    packed = thumbnail**2 + (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None]).flatten()
    width = thumbnail**2 + rows * (cols + 1)

    def to_packed(cell_targets):  # [..., rows·cols] → [..., visual tokens]
        out = cell_targets.new_zeros(*cell_targets.shape[:-1], width)
        out[..., packed] = cell_targets
        return out

    grid_targets = torch.stack([torch.stack([target_mask(q, t, s.objects, cols) for q, _, t in conv])
                                for s, conv in zip(samples, conversations)])
    word_positions, word_targets = word_grounding(ids, answer_positions, conversations, samples, processor.tokenizer, cols)
    probes = dict(answer_positions=answer_positions, targets=to_packed(grid_targets), word_positions=word_positions,
                  word_targets=to_packed(word_targets),
                  question_targets=question_targets(ids, answer_positions, processor.tokenizer))
    return inputs, probes


def grounding_loss(probes: dict, input_ids, image_token_id: int, targets: dict) -> torch.Tensor:
    """The attention-mass losses of :mod:`.train` (content words → their objects, answer → question words,
    answer → asked-about objects) on the probes present."""
    loss = torch.zeros(())
    if "word" in probes:
        rows = probes["word"].rows(targets["word_positions"])
        loss = loss + attention_mass_loss(rows, image_columns(input_ids, image_token_id, targets["word_targets"], rows))
    if "question" in probes:
        loss = loss + attention_mass_loss(probes["question"].rows(targets["answer_positions"]),
                                          targets["question_targets"])
    if "ground" in probes:
        rows = probes["ground"].rows(targets["answer_positions"])
        loss = loss + attention_mass_loss(rows, image_columns(input_ids, image_token_id, targets["targets"], rows))
    return loss


@torch.no_grad()
def evaluate(model, processor, task: ShapesTask, split="val", count=200, batch_size=25):
    """Accuracy of the first generated token (greedy) on ``count`` single-question samples, overall and per type."""
    from PIL import Image

    model.eval()
    correct, per_type = 0, {}
    for start in range(0, count, batch_size):
        samples = [task.sample_at(split, i) for i in range(start, min(start + batch_size, count))]
        inputs = processor(images=[Image.fromarray(s.image) for s in samples], text=[s.prompt for s in samples],
                           return_tensors="pt", padding=True)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        for s, p in zip(samples, processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())):
            correct += p == s.answer
            t = per_type.setdefault(s.qtype, [0, 0])
            t[0] += p == s.answer
            t[1] += 1
    model.train()
    return correct / count, {k: v[0] / v[1] for k, v in per_type.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=40)
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps (the learning-rate cosine runs over them) instead of --minutes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--word-layer", type=int, default=0, help="as in vlm_compress.bench.train (-1: off)")
    parser.add_argument("--question-layer", type=int, default=1, help="as in vlm_compress.bench.train (-1: off)")
    parser.add_argument("--ground-layer", type=int, default=2, help="as in vlm_compress.bench.train (-1: off)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "config.json").exists():
        from transformers import AutoProcessor, LlavaNextForConditionalGeneration

        model = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(out)
        log = json.loads((out / "train_log.json").read_text())
        log.setdefault("resumed", []).append({"at_step": log["steps"], "args": vars(args)})
    else:
        model, processor = initial_model(Path(args.base))
        log = {"args": vars(args), "task": NEXT_TASK.describe(), "pinpoints": PINPOINTS,
               "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()}, "history": [], "seconds": 0.0, "steps": 0}
    processor.tokenizer.padding_side = "left"
    model.train()
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step0, seconds0 = log["steps"], log["seconds"]
    start, step = time.time(), step0
    lr_at, running = schedule(args, step0, start)

    def save():
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        (out / "task.json").write_text(json.dumps(NEXT_TASK.describe(), indent=1))
        log.update(steps=step, seconds=seconds0 + time.time() - start)
        (out / "train_log.json").write_text(json.dumps(log, indent=1))

    probes = {name: GroundingProbe(model, layer) for name, layer in
              (("word", args.word_layer), ("question", args.question_layer), ("ground", args.ground_layer)) if layer >= 0}
    rng = np.random.default_rng(args.seed + step0)
    while running(step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        inputs, targets = make_batch(processor, NEXT_TASK, "train", rng.integers(0, 10**9, args.batch_size),
                                     args.turns, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            vqa = model(**inputs).loss
            ground = grounding_loss(probes, inputs["input_ids"], model.config.image_token_id, targets)
        optimizer_step(vqa + ground, optimizer, params)
        step += 1
        if step % 10 == 0:
            print(f"step {step} vqa {vqa.item():.3f} ground {ground.item():.3f} lr {lr_at(step):.1e} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            acc, per_type = evaluate(model, processor, NEXT_TASK)
            log["history"].append(dict(step=step, seconds=seconds0 + time.time() - start, val_acc=acc, per_type=per_type))
            print(f"== step {step} val acc {acc:.3f} {json.dumps({k: round(v, 2) for k, v in per_type.items()})}",
                  flush=True)
            save()
    save()


if __name__ == "__main__":
    main()

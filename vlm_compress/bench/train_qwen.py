"""Train the embedded ``tiny-qwen2-vl`` (stock ``Qwen2VLForConditionalGeneration``) on ShapesVQA from ``tiny-llava``.

    python -m vlm_compress.bench.train_qwen --base vlm_compress/assets/tiny-llava \\
        --out vlm_compress/assets/tiny-qwen2-vl --distill-steps 700 --steps 500
    python -m vlm_compress.bench.train_qwen --out vlm_compress/assets/tiny-qwen2-vl --resume \\
        --distill-steps 0 --steps 300 --lr 5e-4 --seed 1          # the shipped model's second run (make train-qwen)

The LLM is ``tiny-llava``'s, moved over weight for weight (Qwen2's q/k/v biases start at zero; for text tokens the
three M-RoPE rows are equal, which is plain RoPE, so the transplanted LLM reads text exactly as before). The ViT is
Qwen2-VL's own (4-pixel patches, 2-D rotary, a 2×2 patch merger: a 96-pixel image gives 24×24 patches and 12×12
visual tokens, each covering the 8×8 pixels of one ``tiny-llava`` patch) and starts from scratch, in two stages:

1. **Distillation** (``--distill-steps``): the tower and merger learn to reproduce ``tiny-llava``'s projected
   visual tokens of the same image (MSE plus cosine), a dense target that is far cheaper to learn than the answers.
2. **Fine-tuning** (``--steps``): the whole model on multi-turn ShapesVQA conversations through the stock processor
   (answer + EOS cross-entropy), the LLM at a tenth of the tower's learning rate, the distillation loss kept at a
   small weight. The LLM adapts to M-RoPE positions: text after an image now continues 12 positions on, not 144.

The result (stock ``save_pretrained`` + processor, float16 weights) and ``train_log.json`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .task import ShapesTask
from .timing import machine_description
from .train import CLIP_MEAN, CLIP_STD, optimizer_step
from .train_next import evaluate

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DIMS = dict(patch_size=4, vision_hidden=128, vision_layers=4, vision_heads=4, mrope_section=(4, 6, 6))


def initial_model(base: Path):
    """A ``Qwen2VLForConditionalGeneration`` with ``tiny-llava``'s LLM, its processor, and ``tiny-llava`` itself."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from ..testing import build_qwen_processor

    teacher = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    text = teacher.config.text_config
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=text.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"],
                             "mrope_section": list(DIMS["mrope_section"])},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        ),
        vision_config=dict(depth=DIMS["vision_layers"], embed_dim=DIMS["vision_hidden"], hidden_size=text.hidden_size,
                           mlp_ratio=4, num_heads=DIMS["vision_heads"], patch_size=DIMS["patch_size"],
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_start_token_id=tokenizer.bos_token_id, vision_end_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    llm = {k: v for k, v in teacher.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    missing, unexpected = model.load_state_dict(llm, strict=False)
    if unexpected or any(k.startswith("model.language_model.") and not k.endswith("_proj.bias") for k in missing):
        raise RuntimeError(f"unexpected weight mismatch: missing {missing}, unexpected {unexpected}")
    for layer in model.model.language_model.layers:  # Llama has no q/k/v biases: start at zero
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.zeros_(proj.bias)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    size = teacher.config.vision_config.image_size
    processor = build_qwen_processor(tokenizer, max_pixels=size * size, min_pixels=size * size,
                                     patch_size=DIMS["patch_size"])
    return model, processor, teacher


def teacher_pixels(samples) -> torch.Tensor:
    """``tiny-llava``'s input for the samples' images: ``[B, 3, H, W]``, CLIP-normalised."""
    pixels = np.stack([s.image for s in samples]).astype(np.float32) / 255.0
    return torch.from_numpy(((pixels - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())


def make_batch(processor, task: ShapesTask, indices, turns: int, rng):
    """Processor inputs for multi-turn conversations about each image, labels on every answer and its EOS."""
    from PIL import Image

    samples = [task.sample_at("train", int(i)) for i in indices]
    texts = []
    for s in samples:
        extra = task.questions_about(s.objects, rng, turns - 1) if turns > 1 else []
        texts.append(s.prompt + f" {s.answer} </s>" + "".join(f" USER: {q} ASSISTANT: {a} </s>" for q, a, _ in extra))
    inputs = processor(images=[Image.fromarray(s.image) for s in samples], text=texts, return_tensors="pt",
                       padding=True)
    ids = inputs["input_ids"]
    assistant = ids == processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 1:] |= assistant[:, :-1]
    target[:, 2:] |= assistant[:, :-2]
    inputs["labels"] = ids.masked_fill(~target, -100)
    return inputs, samples


def distill_loss(model, teacher, inputs, samples) -> torch.Tensor:
    """Relative MSE + (1 − cosine) between the student's visual tokens and ``tiny-llava``'s, ``[B·144, D]``."""
    with torch.no_grad():
        target = teacher.model.get_image_features(pixel_values=teacher_pixels(samples), return_dict=True).pooler_output
        target = torch.cat(list(target)) if isinstance(target, (list, tuple)) else target.flatten(0, 1)
    student = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                                             return_dict=True).pooler_output
    student = torch.cat(list(student))
    relative = F.mse_loss(student, target) / target.pow(2).mean()  # scale-free: the teacher's tokens are large
    return relative + (1 - F.cosine_similarity(student, target, dim=-1)).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(ASSETS / "tiny-llava"))
    parser.add_argument("--out", default=str(ASSETS / "tiny-qwen2-vl"))
    parser.add_argument("--distill-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=900, help="fine-tuning steps after distillation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6, help="questions per image in a training conversation")
    parser.add_argument("--lr", type=float, default=1e-3, help="tower and merger; the LLM gets a tenth")
    parser.add_argument("--distill-weight", type=float, default=0.1, help="weight of the distillation loss in stage 2")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (its train_log.json is extended; the step counts "
                             "and the learning-rate schedule restart)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    model, processor, teacher = initial_model(Path(args.base))
    previous = None
    if args.resume:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(args.out, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(args.out)
        previous = json.loads((Path(args.out) / "train_log.json").read_text())
    task = ShapesTask()
    rng = np.random.default_rng(args.seed)
    log = dict(args=vars(args), dims=DIMS, task=task.describe(),
               machine={**machine_description(torch.device("cpu")), "cores": os.cpu_count()}, history=[])
    if previous is not None:  # one log for the whole run: earlier runs first
        log = dict(previous, runs=[*previous.get("runs", [previous["args"]]), vars(args)],
                   history=[*previous["history"], {"resumed": vars(args)}])
    out = Path(args.out)
    vision = [p for n, p in model.named_parameters() if n.startswith("model.visual.")]
    llm = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    started = time.time() - (previous or {}).get("seconds", 0.0)
    total = args.distill_steps + args.steps

    def lr_factor(step: int, first: int, length: int) -> float:
        progress = (step - first) / max(length, 1)
        return min(1.0, (step - first + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    optimizer = torch.optim.AdamW([{"params": vision, "lr": args.lr}, {"params": llm, "lr": 0.0}],
                                  weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    running: list[float] = []
    for step in range(total):
        distilling = step < args.distill_steps
        first, length = (0, args.distill_steps) if distilling else (args.distill_steps, args.steps)
        factor = lr_factor(step, first, length)
        optimizer.param_groups[0]["lr"] = args.lr * factor
        optimizer.param_groups[1]["lr"] = 0.0 if distilling else args.lr * 0.1 * factor
        inputs, samples = make_batch(processor, task, rng.integers(0, 10**9, args.batch_size),
                                     1 if distilling else args.turns, rng)
        distill = distill_loss(model, teacher, inputs, samples)
        if distilling:
            loss = distill
            optimizer_step(loss, optimizer, vision)
        else:
            loss = model(**inputs).loss + args.distill_weight * distill
            optimizer_step(loss, optimizer, vision + llm)
        running.append(loss.item())
        if (step + 1) % 50 == 0:
            print(json.dumps(dict(step=step + 1, stage="distill" if distilling else "vqa",
                                  loss=round(sum(running) / len(running), 4), minutes=round((time.time() - started) / 60, 1))),
                  flush=True)
            log["history"].append(dict(step=step + 1, loss=sum(running) / len(running), seconds=time.time() - started))
            running = []
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            acc, per_type = evaluate(model, processor, task, count=256, batch_size=32)
            log["history"].append(dict(step=step + 1, seconds=time.time() - started, val_acc=acc, per_type=per_type))
            print(json.dumps(dict(step=step + 1, val_acc=acc, per_type=per_type)), flush=True)
            save(model, processor, out, log, started)
    save(model, processor, out, log, started)


def save(model, processor, out: Path, log: dict, started: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
    (out / "task.json").write_text(json.dumps(ShapesTask().describe()))  # what the bench evaluates it on
    log["seconds"] = time.time() - started
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()

"""Train the embedded ``tiny-llava`` on ShapesVQA from scratch (stock ``LlavaForConditionalGeneration``).

    python -m vlm_compress.bench.train --out vlm_compress/assets/tiny-llava --minutes 60

One joint stage, four losses: the VQA answer (+ EOS) cross-entropy; a dense per-patch head on the feature layer
(``hidden_states[-2]``) that classifies each patch as background or its (shape, colour); a per-patch row/column
classifier on the same layer (position stays readable from the features after pruning compacts positions); and a
multi-label head on the CLS output of the last layer predicting which (shape, colour) pairs are in the scene. The CLS objective is what
makes CLS attention point at objects, as in CLIP (DESIGN.md, "The embedded benchmark"). The heads are training-only.
Checkpoints (stock ``save_pretrained`` + processor) are written every ``--save-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .task import COLORS, SHAPES, ShapesTask, vocabulary

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PAIRS = [(s, c) for s in SHAPES for c in COLORS]


@dataclasses.dataclass
class TinyDims:
    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 384


def build_tokenizer():
    """Word-level tokenizer over the task vocabulary; ``<image>`` is the image token; left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )


def build_model(tokenizer, dims: TinyDims, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=dims.vision_hidden, intermediate_size=4 * dims.vision_hidden,
            num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
            image_size=dims.image_size, patch_size=dims.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
            num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads, num_key_value_heads=dims.text_heads,
            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_processor(tokenizer, dims: TinyDims):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = dims.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=dims.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )


class AuxHeads(nn.Module):
    """Training-only heads: per-patch (background + shape×colour) and scene-level multi-label on CLS."""

    def __init__(self, vision_hidden: int, grid: int):
        super().__init__()
        self.grid = grid
        self.patch = nn.Linear(vision_hidden, 1 + len(PAIRS))
        self.scene = nn.Linear(vision_hidden, len(PAIRS))
        self.position = nn.Linear(vision_hidden, 2 * grid)  # row and column of every patch


def make_batch(task: ShapesTask, tokenizer, split: str, indices, grid: int):
    samples = [task.sample_at(split, int(i)) for i in indices]
    pixels = np.stack([s.image for s in samples]).astype(np.float32) / 255.0
    pixels = torch.from_numpy(((pixels - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())
    n_tokens = grid * grid
    prompts = [s.prompt.replace("<image>", "<image>" * n_tokens) for s in samples]
    full = [p + " " + s.answer + " </s>" for p, s in zip(prompts, samples)]
    enc = tokenizer(full, return_tensors="pt", padding=True)
    labels = torch.full_like(enc.input_ids, -100)
    labels[:, -2:] = enc.input_ids[:, -2:]  # answer and EOS (left padding keeps them last)
    patch_labels = torch.zeros(len(samples), n_tokens, dtype=torch.long)
    scene_labels = torch.zeros(len(samples), len(PAIRS))
    for b, s in enumerate(samples):
        for o in s.objects:
            pair = PAIRS.index((o.shape, o.color))
            patch_labels[b, o.row * grid + o.col] = 1 + pair
            scene_labels[b, pair] = 1.0
    return dict(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels,
                patch_labels=patch_labels, scene_labels=scene_labels, samples=samples)


def losses(model, heads, batch):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tower = model.model.vision_tower
    out = tower(batch["pixel_values"], output_hidden_states=True)
    feature_layer = out.hidden_states[-2]
    feats = model.model.multi_modal_projector(feature_layer[:, 1:])
    patch_logits = heads.patch(feature_layer[:, 1:])
    weights = torch.ones(patch_logits.shape[-1])
    weights[0] = 0.1  # background dominates the patches
    patch_loss = F.cross_entropy(patch_logits.flatten(0, 1).float(), batch["patch_labels"].flatten(), weight=weights)
    scene_loss = F.binary_cross_entropy_with_logits(heads.scene(out.pooler_output).float(), batch["scene_labels"])
    g = heads.grid
    where = heads.position(feature_layer[:, 1:]).float()  # [B, N, 2g]
    cells = torch.arange(g * g)
    position_loss = F.cross_entropy(where[..., :g].flatten(0, 1), (cells // g).repeat(where.shape[0])) + F.cross_entropy(
        where[..., g:].flatten(0, 1), (cells % g).repeat(where.shape[0]))
    vqa = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(feats))},
    )
    patch_acc = (patch_logits.argmax(-1) == batch["patch_labels"])[batch["patch_labels"] > 0].float().mean()
    return vqa.loss, patch_loss, scene_loss + position_loss, patch_acc


@torch.no_grad()
def evaluate(model, task, tokenizer, grid, split="val", count=256, batch_size=64):
    """Accuracy of the first generated token (greedy) on ``count`` samples, overall and per question type."""
    model.eval()
    answer_ids = torch.tensor(tokenizer.convert_tokens_to_ids(
        sorted({s.answer for s in task.iterate(split, 400)} | set(COLORS) | set(SHAPES))))
    correct, per_type = 0, {}
    for start in range(0, count, batch_size):
        idx = range(start, min(start + batch_size, count))
        samples = [task.sample_at(split, i) for i in idx]
        batch = make_batch(task, tokenizer, split, idx, grid)
        prompts = [s.prompt.replace("<image>", "<image>" * grid * grid) for s in samples]
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=batch["pixel_values"],
                       logits_to_keep=1).logits[:, -1]
        pred = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for s, p in zip(samples, pred):
            ok = p == s.answer
            correct += ok
            t = per_type.setdefault(s.qtype, [0, 0])
            t[0] += ok
            t[1] += 1
    model.train()
    return correct / count, {k: v[0] / v[1] for k, v in per_type.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dims = TinyDims()
    grid = dims.image_size // dims.patch_size
    task = ShapesTask(canvas=dims.image_size, cell=dims.patch_size)
    tokenizer = build_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "config.json").exists():
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        heads = AuxHeads(dims.vision_hidden, grid)
        heads.load_state_dict(torch.load(out / "aux_heads.pt"))
        log = json.loads((out / "train_log.json").read_text())
    else:
        model, heads = build_model(tokenizer, dims, args.seed), AuxHeads(dims.vision_hidden, grid)
        log = {"args": vars(args), "dims": dataclasses.asdict(dims), "machine": f"{platform.processor()} x{os.cpu_count()}",
               "history": [], "seconds": 0.0, "steps": 0}
    processor = build_processor(tokenizer, dims)
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step0, seconds0 = log["steps"], log["seconds"]
    total_estimate = 10_000

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * max(0.1, 0.5 * (1 + math.cos(math.pi * min(step / total_estimate, 1.0))))

    def save(step, seconds):
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        torch.save(heads.state_dict(), out / "aux_heads.pt")
        log.update(steps=step, seconds=seconds)
        (out / "train_log.json").write_text(json.dumps(log, indent=1))

    model.train()
    start, step = time.time(), step0
    rng = np.random.default_rng(args.seed + step0)
    while time.time() - start < args.minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = make_batch(task, tokenizer, "train", rng.integers(0, 10**9, args.batch_size), grid)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            vqa, patch, scene, patch_acc = losses(model, heads, batch)
        loss = vqa + patch + scene
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step} vqa {vqa.item():.3f} patch {patch.item():.3f} scene {scene.item():.3f} "
                  f"patch_acc {patch_acc.item():.3f} lr {lr_at(step):.1e} {time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            acc, per_type = evaluate(model, task, tokenizer, grid)
            log["history"].append(dict(step=step, seconds=seconds0 + time.time() - start, val_acc=acc, per_type=per_type))
            print(f"== step {step} val acc {acc:.3f} {json.dumps({k: round(v, 2) for k, v in per_type.items()})}", flush=True)
        if step % args.save_every == 0:
            save(step, seconds0 + time.time() - start)
    save(step, seconds0 + time.time() - start)


if __name__ == "__main__":
    main()

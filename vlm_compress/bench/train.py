"""Train the embedded ``tiny-llava`` on ShapesVQA from scratch (stock ``LlavaForConditionalGeneration``).

    python -m vlm_compress.bench.train --out vlm_compress/assets/tiny-llava --minutes 60

One joint stage, four losses: the VQA answer (+ EOS) cross-entropy; a dense per-patch head on the feature layer
(``hidden_states[-2]``) that classifies each patch as background or its (shape, colour); a per-patch row/column
classifier on the same layer (position stays readable from the features after pruning compacts positions); and a
multi-label head on the CLS output of the last layer predicting which (shape, colour) pairs are in the scene. The CLS objective is what
makes CLS attention point at objects, as in CLIP (docs/architecture.md, "Benchmarks"). The heads are training-only.
Checkpoints (stock ``save_pretrained`` + processor) are written every ``--save-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import compat
from ..testing import SPECIAL_TOKENS, TINY_LLAVA_DIMS, build_llava, build_processor, wrap_tokenizer
from .task import COLORS, SHAPES, ShapesTask, vocabulary
from .timing import machine_description

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PAIRS = [(s, c) for s in SHAPES for c in COLORS]


def build_tokenizer():
    """Word-level tokenizer over the task vocabulary (one token per word); ``<image>`` is the image token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return wrap_tokenizer(tk)


class AuxHeads(nn.Module):
    """Training-only heads: per-patch (background + shape×colour) and scene-level multi-label on CLS; per-patch
    row/column classes on the vision features; linear (row, col) coordinates on the projected tokens, so that "left
    of" is a difference along one direction of the LLM's input space."""

    def __init__(self, vision_hidden: int, grid: int, text_hidden: int):
        super().__init__()
        self.grid = grid
        self.patch = nn.Linear(vision_hidden, 1 + len(PAIRS))
        self.scene = nn.Linear(vision_hidden, len(PAIRS))
        self.position = nn.Linear(vision_hidden, 2 * grid)  # row and column of every patch
        self.coords = nn.Linear(text_hidden, 2)
        self.relation = nn.Linear(text_hidden, 4)  # (row, col) of both objects of a relation, from attention output
        for head in (self.coords, self.relation):  # start at the centre: no large early gradients
            nn.init.zeros_(head.weight)
            nn.init.constant_(head.bias, 0.5)


def make_batch(task: ShapesTask, tokenizer, split: str, indices, grid: int, turns: int = 1, rng=None,
               image_tokens: int | None = None):
    """A training batch; with ``turns > 1`` each image gets a conversation of that many questions (LLaVA's
    multi-turn format, ``... ASSISTANT: a </s> USER: q ASSISTANT: a </s>``), so one pass over its 144 image tokens
    trains several answers. The first question is the generator's own. ``image_tokens`` sets the number of image
    placeholders (default: one per patch)."""
    samples = [task.sample_at(split, int(i)) for i in indices]
    pixels = np.stack([s.image for s in samples]).astype(np.float32) / 255.0
    pixels = torch.from_numpy(((pixels - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())
    n_tokens = image_tokens or grid * grid
    conversations = [[(s.question, s.answer, s.qtype)] + (task.questions_about(s.objects, rng, turns - 1) if turns > 1 else [])
                     for s in samples]
    texts = []
    for s, turns_of in zip(samples, conversations):
        text = s.prompt.replace("<image>", "<image>" * n_tokens) + f" {s.answer} </s>"
        texts.append(text + "".join(f" USER: {q} ASSISTANT: {a} </s>" for q, a, _ in turns_of[1:]))
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids = enc.input_ids
    assistant = ids == tokenizer.convert_tokens_to_ids("ASSISTANT:")
    answer_positions = assistant.nonzero()[:, 1].view(len(samples), turns)  # [B, T]: the positions predicting answers
    labels = torch.full_like(ids, -100)
    for offset in (1, 2):  # the answer and its EOS
        rows = torch.arange(len(samples))[:, None].expand(-1, turns)
        labels[rows, answer_positions + offset] = ids[rows, answer_positions + offset]
    patch_labels = torch.zeros(len(samples), grid * grid, dtype=torch.long)
    scene_labels = torch.zeros(len(samples), len(PAIRS))
    for b, s in enumerate(samples):
        for o in s.objects:
            pair = PAIRS.index((o.shape, o.color))
            patch_labels[b, o.row * grid + o.col] = 1 + pair
            scene_labels[b, pair] = 1.0
    targets = torch.stack([torch.stack([target_mask(q, t, s.objects, grid) for q, _, t in conv])
                           for s, conv in zip(samples, conversations)])  # [B, T, N]
    pair_targets = torch.stack([torch.stack([relation_targets(q, t, s.objects, grid) for q, _, t in conv])
                                for s, conv in zip(samples, conversations)])  # [B, T, 2, N]
    cells = torch.arange(grid * grid)
    where = (torch.stack([cells // grid, cells % grid], -1).float() + 0.5) / grid  # [N, 2]
    pair_coords = (pair_targets @ where).flatten(-2)  # [B, T, 4]: (row, col) of object A, then of object B
    word_positions, word_targets = word_grounding(ids, answer_positions, conversations, samples, tokenizer, grid)
    return dict(pixel_values=pixels, input_ids=ids, attention_mask=enc.attention_mask, labels=labels,
                patch_labels=patch_labels, scene_labels=scene_labels, targets=targets,
                pair_targets=pair_targets, pair_coords=pair_coords, answer_positions=answer_positions, word_positions=word_positions,
                word_targets=word_targets, samples=samples)


def relation_targets(question: str, qtype: str, objects, grid: int) -> torch.Tensor:
    """[2, N]: for "is the A left of the B", object A and object B (one head looks at each); zeros otherwise."""
    out = torch.zeros(2, grid * grid)
    if qtype == "relative":
        words = question.split()
        for slot, shape in enumerate((words[2], words[6])):
            for o in objects:
                if o.shape == shape:
                    out[slot, o.row * grid + o.col] = 1.0
    return out


def image_columns(input_ids: torch.Tensor, image_token_id: int, targets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scatter per-visual-token ``targets`` ``[B, ..., N]`` onto the sequence axis of ``like`` ``[B, ..., L]``."""
    image = (input_ids == image_token_id).view(like.shape[0], *([1] * (like.dim() - 2)), -1).expand_as(like)
    out = torch.zeros_like(like)
    out[image] = targets.flatten().to(like.dtype)  # every row holds the same number of visual tokens
    return out


def _matches(word: str, o, grid: int) -> bool:
    if word in COLORS:
        return o.color == word
    if word in SHAPES:
        return o.shape == word
    if word in ("top", "bottom"):
        return (o.row < grid / 2) == (word == "top")
    return (o.col < grid / 2) == (word == "left")


def word_grounding(ids, answer_positions, conversations, samples, tokenizer, grid: int):
    """Where each content word of each question should look: ``(positions [B, W], targets [B, W, N])``.

    A content word (colour, shape, quadrant word) targets the objects it describes on its own (at an early layer a
    word cannot know its neighbours, so conjunctions are left to the answer position). "left" in a relative
    question is a relation, not a place, and is skipped. Rows are padded with position 0 and no targets (ignored
    by the loss).
    """
    content = set(tokenizer.convert_tokens_to_ids(sorted(CONTENT_WORDS)))
    rows_pos, rows_tgt = [], []
    for b, (s, conv) in enumerate(zip(samples, conversations)):
        positions, targets, start = [], [], 0
        for t, (_, _, qtype) in enumerate(conv):
            end = int(answer_positions[b, t])
            where = [p for p in range(start, end) if int(ids[b, p]) in content]
            words = tokenizer.convert_ids_to_tokens([int(ids[b, p]) for p in where])
            for p, w in zip(where, words):
                if qtype == "relative" and w not in SHAPES:
                    continue
                mask = torch.zeros(grid * grid)
                for o in s.objects:
                    if _matches(w, o, grid):
                        mask[o.row * grid + o.col] = 1.0
                positions.append(p)
                targets.append(mask)
            start = end + 2
        rows_pos.append(positions)
        rows_tgt.append(targets)
    width = max(len(p) for p in rows_pos)
    positions = torch.zeros(len(samples), width, dtype=torch.long)
    targets = torch.zeros(len(samples), width, grid * grid)
    for b, (p, t) in enumerate(zip(rows_pos, rows_tgt)):
        if p:
            positions[b, : len(p)] = torch.tensor(p)
            targets[b, : len(t)] = torch.stack(t)
    return positions, targets


def target_mask(question: str, qtype: str, objects, grid: int) -> torch.Tensor:
    """[N] image tokens a question is about: the objects whose shape/colour/quadrant it names."""
    mask = torch.zeros(grid * grid)
    words = question.split()
    for o in objects:
        if qtype == "count":
            hit = o.shape == words[2]
        elif qtype == "region":  # the only object in the named quadrant
            hit = ((o.row < grid / 2) == (words[7] == "top")) and ((o.col < grid / 2) == (words[8] == "left"))
        else:
            hit = o.shape in words or o.color in words
        mask[o.row * grid + o.col] = float(hit)
    return mask


class GroundingProbe:
    """Attention of one position to all keys at LLM layer ``layer``, computed from q/k (with RoPE) via a hook."""

    def __init__(self, model, layer: int):
        self.attn = model.model.language_model.layers[layer].self_attn
        self.rope = compat.apply_rotary_pos_emb
        self.handles = [self.attn.register_forward_pre_hook(self._capture, with_kwargs=True),
                        self.attn.register_forward_hook(self._output)]
        self.hidden = self.cos_sin = self.output = None

    def _capture(self, module, args, kwargs):
        self.hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.cos_sin = compat.rotary_tables(kwargs)

    def _output(self, module, args, output):
        self.output = output[0] if isinstance(output, tuple) else output  # [B, L, D] after o_proj

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, T, D] the attention output at ``positions`` ([B, T])."""
        return self.output.gather(1, positions[..., None].expand(-1, -1, self.output.shape[-1]))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def rows(self, positions: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        """[B, T, L] head-mean attention probabilities of the ``positions`` ([B, T]) over all positions (causal);
        ``[B, H, T, L]`` with ``per_head``."""
        a = self.attn
        h = self.hidden
        b, length, _ = h.shape
        cos, sin = (t.expand(b, -1, -1) for t in self.cos_sin)
        at = lambda x: x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        q = a.q_proj(at(h)).view(b, -1, a.config.num_attention_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, length, -1, a.head_dim).transpose(1, 2)
        q, _ = self.rope(q, q, at(cos), at(sin))
        _, k = self.rope(k, k, cos, sin)
        logits = (q @ k.transpose(-1, -2)).float() * a.scaling  # [B, H, T, L]
        future = torch.arange(length) > positions[:, None, :, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        return probs if per_head else probs.mean(1)


CONTENT_WORDS = {*COLORS, *SHAPES, "top", "bottom", "left", "right"}


def question_targets(input_ids: torch.Tensor, answer_positions: torch.Tensor, tokenizer) -> torch.Tensor:
    """[B, T, L] for each turn, the positions of its question's content words (colours, shapes, quadrant words)."""
    content = torch.isin(input_ids, torch.tensor(tokenizer.convert_tokens_to_ids(sorted(CONTENT_WORDS))))
    where = torch.arange(input_ids.shape[1])
    previous = torch.cat([torch.zeros_like(answer_positions[:, :1]), answer_positions[:, :-1] + 2], 1)  # [B, T]: last EOS
    in_turn = (where > previous[..., None]) & (where < answer_positions[..., None])
    return (in_turn & content[:, None]).float()


def attention_mass_loss(row: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log(attention mass on the targets) over rows that have targets. row, targets: [..., L]."""
    has = targets.sum(-1) > 0
    mass = (row * targets).sum(-1).clamp_min(1e-6)
    return -(mass.log() * has).sum() / has.sum().clamp_min(1)


def losses(model, heads, batch, probe: "GroundingProbe | None" = None, freeze_vision: bool = False,
           question_probe: "GroundingProbe | None" = None, word_probe: "GroundingProbe | None" = None):
    tower = model.model.vision_tower
    with torch.set_grad_enabled(not freeze_vision and torch.is_grad_enabled()):
        out = tower(batch["pixel_values"], output_hidden_states=True)
    feature_layer = out.hidden_states[-2]
    feats = model.model.multi_modal_projector(feature_layer[:, 1:])
    with torch.set_grad_enabled(not freeze_vision and torch.is_grad_enabled()):
        patch_logits = heads.patch(feature_layer[:, 1:])
    weights = torch.ones(patch_logits.shape[-1])
    weights[0] = 0.1  # background dominates the patches
    patch_loss = F.cross_entropy(patch_logits.flatten(0, 1).float(), batch["patch_labels"].flatten(), weight=weights)
    scene_loss = position_loss = torch.zeros(())
    if not freeze_vision:
        scene_loss = F.binary_cross_entropy_with_logits(heads.scene(out.pooler_output).float(), batch["scene_labels"])
        g = heads.grid
        where = heads.position(feature_layer[:, 1:]).float()  # [B, N, 2g]
        cells = torch.arange(g * g)
        position_loss = F.cross_entropy(where[..., :g].flatten(0, 1), (cells // g).repeat(where.shape[0]))
        position_loss = position_loss + F.cross_entropy(where[..., g:].flatten(0, 1), (cells % g).repeat(where.shape[0]))
    vqa = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
        **compat.encoded_images(feats),
    )
    patch_acc = (patch_logits.argmax(-1) == batch["patch_labels"])[batch["patch_labels"] > 0].float().mean()
    ground_loss = torch.zeros(())
    image_id = model.config.image_token_id
    if probe is not None:
        per_head = probe.rows(batch["answer_positions"], per_head=True)  # [B, H, T, L]
        rows = per_head.mean(1)
        ground_loss = attention_mass_loss(rows, image_columns(batch["input_ids"], image_id, batch["targets"], rows))
        for head in (0, 1):  # relations: one head on each of the two objects, so their positions can be compared
            ground_loss = ground_loss + attention_mass_loss(
                per_head[:, head], image_columns(batch["input_ids"], image_id, batch["pair_targets"][:, :, head], rows))
        relation = batch["pair_targets"].sum((-1, -2)) == 2  # [B, T] turns about two objects
        if bool(relation.any()):  # ... and what the heads bring back holds both positions, linearly
            predicted = heads.relation(probe.at(batch["answer_positions"])).float()
            ground_loss = ground_loss + 10 * F.mse_loss(predicted[relation], batch["pair_coords"][relation])
    if question_probe is not None:  # the answer position gathers the question's content words first
        ground_loss = ground_loss + attention_mass_loss(question_probe.rows(batch["answer_positions"]),
                                                        batch["question_targets"])
    if word_probe is not None:  # each content word looks up the objects it describes
        rows = word_probe.rows(batch["word_positions"])  # [B, W, L]
        ground_loss = ground_loss + attention_mass_loss(
            rows, image_columns(batch["input_ids"], image_id, batch["word_targets"], rows))
    g = heads.grid
    cells = torch.arange(g * g)
    where = (torch.stack([cells // g, cells % g], -1).float() + 0.5) / g  # [N, 2] in (0, 1)
    coord_loss = F.mse_loss(heads.coords(feats).float(), where.expand(feats.shape[0], -1, -1)) * 10
    return vqa.loss, patch_loss, scene_loss + position_loss + ground_loss + coord_loss, patch_acc


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


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, clip: float = 1.0) -> None:
    """Backward, clip the gradient norm, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


class LossHistory:
    """The running mean of the loss, appended to ``history`` (a training log's list) and printed as one JSON line
    every ``every`` steps, with the learning rate and the minutes since the start."""

    def __init__(self, history: list, every: int):
        self.history, self.every, self.start, self.total = history, every, time.time(), 0.0

    def add(self, step: int, loss: float, lr: float) -> None:
        self.total += loss
        if (step + 1) % self.every == 0:
            entry = {"step": step + 1, "loss": round(self.total / self.every, 5), "lr": lr,
                     "minutes": round((time.time() - self.start) / 60, 2)}
            self.history.append(entry)
            print(json.dumps(entry), flush=True)
            self.total = 0.0


def add_training_arguments(parser, *, out: str, minutes: float, lr: float, warmup: int, eval_every: int,
                           base: str = "tiny-llava") -> None:
    """The options every fine-tuning script of an embedded model shares (defaults per script)."""
    assets = Path(__file__).resolve().parents[1] / "assets"
    parser.add_argument("--base", default=str(assets / base))
    parser.add_argument("--out", default=str(assets / out))
    parser.add_argument("--minutes", type=float, default=minutes)
    parser.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead of --minutes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)


def frozen_base(args):
    """Threads and seed from ``args``; the frozen base model at ``args.base``, its patch-grid side, and the
    ShapesVQA task and tokenizer that match it."""
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration.from_pretrained(args.base, dtype=torch.float32).eval().requires_grad_(False)
    vision = model.config.vision_config
    task = ShapesTask(canvas=vision.image_size, cell=vision.patch_size)
    return model, vision.image_size // vision.patch_size, task, build_tokenizer()


def schedule(args, step0: int, start: float):
    """``(lr_at(step), running(step))`` for a run of ``--steps`` steps, or of ``--minutes`` when no steps are given:
    linear warm-up over ``--warmup`` steps, then a cosine to a tenth of ``--lr``."""

    def progress(step: int) -> float:
        return (step - step0) / args.steps if args.steps else (time.time() - start) / (args.minutes * 60)

    def lr_at(step: int) -> float:
        if step - step0 < args.warmup:
            return args.lr * (step - step0 + 1) / args.warmup
        return args.lr * max(0.1, 0.5 * (1 + math.cos(math.pi * min(progress(step), 1.0))))

    return lr_at, lambda step: progress(step) < 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps (the learning-rate cosine runs over them) instead of --minutes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=6, help="questions per image in a training conversation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--freeze-vision", action="store_true",
                        help="train only the projector and the LLM (second stage, once the tower has converged)")
    parser.add_argument("--question-layer", type=int, default=1,
                        help="LLM layer whose answer-position attention is supervised towards the question's content "
                             "words (-1: off)")
    parser.add_argument("--ground-layer", type=int, default=2,
                        help="LLM layer whose answer-position attention is supervised towards the asked-about objects "
                             "(-1: off)")
    parser.add_argument("--word-layer", type=int, default=0,
                        help="LLM layer whose attention from each question content word is supervised towards the "
                             "objects that word describes (-1: off)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dims = TINY_LLAVA_DIMS
    grid = dims.image_size // dims.patch_size
    task = ShapesTask(canvas=dims.image_size, cell=dims.patch_size)
    tokenizer = build_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "config.json").exists():
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        heads = AuxHeads(dims.vision_hidden, grid, dims.text_hidden)
        if (out / "aux_heads.pt").exists():  # training-only, not shipped: a fresh clone starts them anew
            missing, _ = heads.load_state_dict(torch.load(out / "aux_heads.pt"), strict=False)
            print(f"aux heads started anew: {missing}" if missing else "aux heads resumed", flush=True)
        log = json.loads((out / "train_log.json").read_text())
        log.setdefault("resumed", []).append({"at_step": log["steps"], "args": vars(args)})
    else:
        model, heads = build_llava(tokenizer, dims, args.seed).train(), AuxHeads(dims.vision_hidden, grid, dims.text_hidden)
        log = {"args": vars(args), "dims": dataclasses.asdict(dims), "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()},
               "history": [], "seconds": 0.0, "steps": 0}
    processor = build_processor(tokenizer, dims)
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
        for head in (heads.patch, heads.scene, heads.position):  # the tower's heads; coords trains the projector
            head.requires_grad_(False)
    params = [p for p in list(model.parameters()) + list(heads.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step0, seconds0 = log["steps"], log["seconds"]

    def save(step, seconds):
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        torch.save(heads.state_dict(), out / "aux_heads.pt")
        log.update(steps=step, seconds=seconds)
        (out / "train_log.json").write_text(json.dumps(log, indent=1))

    probe = GroundingProbe(model, args.ground_layer) if args.ground_layer >= 0 else None
    question_probe = GroundingProbe(model, args.question_layer) if args.question_layer >= 0 else None
    word_probe = GroundingProbe(model, args.word_layer) if args.word_layer >= 0 else None
    model.train()
    start, step = time.time(), step0
    lr_at, running = schedule(args, step0, start)
    rng = np.random.default_rng(args.seed + step0)
    while running(step):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = make_batch(task, tokenizer, "train", rng.integers(0, 10**9, args.batch_size), grid, args.turns, rng)
        batch["question_targets"] = question_targets(batch["input_ids"], batch["answer_positions"], tokenizer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            vqa, patch, scene, patch_acc = losses(model, heads, batch, probe, args.freeze_vision, question_probe,
                                                  word_probe)
        optimizer_step(vqa + scene if args.freeze_vision else vqa + patch + scene, optimizer, params)
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
    for p in (probe, question_probe, word_probe):
        if p is not None:
            p.remove()


if __name__ == "__main__":
    main()

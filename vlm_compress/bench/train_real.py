"""Train the shipped part of ``tiny-real-llava`` on ShapesVQA: LLaVA's projector and LoRA deltas on SmolLM2's attention.

    python -m vlm_compress.bench.train_real --minutes 60            # fresh
    python -m vlm_compress.bench.train_real --minutes 60 --resume   # go on from the last checkpoint
    python -m vlm_compress.bench.train_real --from-parts vlm_compress/assets/tiny-real-llava --steps 450 --cosine
                                        # go on from the shipped part (new optimiser), decaying to a tenth

The DINOv2 tower and SmolLM2's weights stay frozen (LLaVA-1.5's stage-1 recipe, Liu et al., arXiv 2310.03744, §4.2,
plus LoRA, Hu et al., arXiv 2106.09685, on q/k/v/o of every layer: rank 8, α 16, B = 0 at the start, so training
starts from the stock LLM). One image per sequence with several questions about it in SmolLM2's chat format
(``<|im_start|>user … <|im_end|>``), the loss on each answer token and the ``<|im_end|>`` after it, plus an
alignment loss on the projector's outputs (:class:`WordTargets`: each patch towards the embeddings of the words it
shows), alone for ``--align-steps`` projector-only steps first, then beside the answer loss. The LoRA is
applied by forward hooks on the frozen ``Linear`` modules during training only; the shipped file holds the factors
(``lora.<module>.A`` ``[r, in]``, ``.B`` ``[out, r]``, ``lora.scale``) and the builder merges ``scale · B @ A``.
Forward and backward run under bfloat16 autocast (``--fp32`` to turn it off); evaluation and the shipped weights are
float32.

Writes ``<out>/parts.safetensors`` and ``<out>/train_log.json`` every ``--save-every`` steps; the optimiser state for
``--resume`` goes to ``<state>`` (not shipped).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..pretrained import tiny_real_llava as real
from .task import COLORS, SHAPES, ShapesTask
from .timing import machine_description

RANK, ALPHA = 8, 16
ALIGN_WORDS = (*COLORS, *SHAPES, "empty")


class LoRAHooks:
    """Trainable low-rank deltas on frozen ``Linear`` modules through forward hooks: ``y += scale · x Aᵀ Bᵀ``."""

    def __init__(self, modules: dict[str, nn.Linear], rank: int = RANK, alpha: float = ALPHA, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.modules, self.scale = modules, alpha / rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name, module in modules.items():
            key = name.replace(".", "__")
            bound = 1 / math.sqrt(module.in_features)  # kaiming-uniform(a=√5) bound, as peft's default
            self.A[key] = nn.Parameter(torch.empty(rank, module.in_features).uniform_(-bound, bound, generator=generator))
            self.B[key] = nn.Parameter(torch.zeros(module.out_features, rank))
        self._handles = []

    def parameters(self):
        return [*self.A.values(), *self.B.values()]

    def __enter__(self) -> "LoRAHooks":
        for name, module in self.modules.items():
            key = name.replace(".", "__")

            def hook(mod, args, output, key=key):
                return output + self.scale * F.linear(F.linear(args[0], self.A[key]), self.B[key])

            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state(self) -> dict[str, torch.Tensor]:
        out = {"lora.scale": torch.tensor(self.scale)}
        for name in self.modules:
            key = name.replace(".", "__")
            out[f"lora.{name}.A"] = self.A[key].detach().clone().contiguous()
            out[f"lora.{name}.B"] = self.B[key].detach().clone().contiguous()
        return out

    def load(self, parts: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.modules:
                key = name.replace(".", "__")
                self.A[key].copy_(parts[f"lora.{name}.A"])
                self.B[key].copy_(parts[f"lora.{name}.B"])


class Conversations:
    """Batches of one image and ``turns`` questions each, tokenised segment by segment so the answer positions are
    known exactly; the first question is the sample's own (the held-out splits ask that one alone)."""

    def __init__(self, task: ShapesTask, processor, turns: int):
        self.task, self.processor, self.turns = task, processor, turns
        tok = processor.tokenizer
        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids(real.IMAGE_TOKEN)
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.image_tokens = (real.IMAGE_SIZE // real.PATCH) ** 2

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def batch(self, split: str, indices, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        samples = [self.task.sample_at(split, int(i)) for i in indices]
        pixels = self.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        rows, labels = [], []
        head, tail = real.PROMPT.split("<image>")
        for s in samples:
            turns = [(s.question, s.answer)] + [(q, a) for q, a, _ in self.task.questions_about(s.objects, rng, self.turns - 1)]
            ids = self._ids(head) + [self.image_id] * self.image_tokens
            lab = [-100] * len(ids)
            for t, (question, answer) in enumerate(turns):
                ask = self._ids(tail.format(question=question) if t == 0 else
                                f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
                reply = self._ids(answer) + [self.end_id]
                ids += ask + reply
                lab += [-100] * len(ask) + reply
            rows.append(ids)
            labels.append(lab)
        width = max(map(len, rows))
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left padding, as in generation
        label_ids = torch.tensor([[-100] * (width - len(r)) + r for r in labels])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=label_ids,
                    patch_words=patch_words(samples))


def patch_words(samples) -> torch.Tensor:
    """``[B, 144, 2]`` word indices (into :data:`ALIGN_WORDS`) each patch shows: (colour, shape) where an object
    is, (``empty``, ``empty``) elsewhere. One grid cell per patch (:data:`real.CELL` × 2 = :data:`real.PATCH`)."""
    side = real.IMAGE_SIZE // real.PATCH
    out = torch.full((len(samples), side * side, 2), ALIGN_WORDS.index("empty"))
    for b, sample in enumerate(samples):
        for o in sample.objects:
            out[b, o.row * side + o.col] = torch.tensor([ALIGN_WORDS.index(o.color), ALIGN_WORDS.index(o.shape)])
    return out


class WordTargets:
    """The alignment objective's targets: per word of :data:`ALIGN_WORDS` the mean input embedding of its tokens.

    A patch showing a red circle is pulled towards ``(e(red) + e(circle)) / 2``, an empty one towards ``e(empty)``:
    the projected image tokens start out reading like the words the questions use, which the frozen LLM can already
    match and copy ("what color is the circle ?" → the token nearest ``circle`` → ``red``). LLaVA's stage 1 learns
    the same alignment from captions through the LM loss alone (Liu et al., arXiv 2310.03744, §4.2); on this budget
    (a few hundred steps on 2 CPU cores) the LM loss alone left the image unused: two runs of 150 steps (6 and 12
    questions per image) answered each question type with nearly one constant. The error is squared and relative to
    the target's squared norm (1 at a zero output); object patches and empty ones are averaged separately and the two
    means added (about 4 of 144 patches show an object)."""

    def __init__(self, model, tokenizer):
        embed = model.get_input_embeddings().weight.detach()
        self.table = torch.stack([embed[tokenizer(w, add_special_tokens=False)["input_ids"]].mean(0)
                                  for w in ALIGN_WORDS])  # [W, D]
        self.empty = ALIGN_WORDS.index("empty")

    def loss(self, projected: torch.Tensor, patch_words: torch.Tensor) -> torch.Tensor:
        """``projected`` [B, N, D] projector outputs, ``patch_words`` [B, N, 2] → scalar."""
        target = self.table[patch_words].mean(dim=2)  # [B, N, D]
        error = (projected.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1)
        objects = patch_words[..., 0] != self.empty
        return error[objects].mean() + error[~objects].mean()


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, 144, C]`` the frozen tower's layer −2 without CLS, as LLaVA reads it (no gradient: the tower is frozen)."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[real.FEATURE_LAYER][:, 1:]


def answer_loss(model, batch: dict[str, torch.Tensor], projected: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the labelled tokens given the projector's output ``projected`` [B, 144, D] (computed once
    per step and shared with the alignment loss), the LM head applied only where a label is (49k-way logits are
    costly). The image tokens' embeddings are replaced by ``projected`` in order, as LLaVA's forward does."""
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, projected.to(embeds.dtype))
    out = model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep])


@torch.no_grad()
def evaluate(model, processor, task: ShapesTask, count: int, batch_size: int = 25) -> float:
    """Greedy accuracy on the first ``count`` validation samples, asked as the bench asks (one question, generate)."""
    from PIL import Image

    from .run import is_correct, normalise

    correct = 0
    for start in range(0, count, batch_size):
        samples = [task.sample_at("val", i) for i in range(start, min(start + batch_size, count))]
        inputs = processor(images=[Image.fromarray(s.image) for s in samples],
                           text=[real.PROMPT.format(question=s.question) for s in samples],
                           return_tensors="pt", padding=True)
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        texts = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(is_correct(normalise(t), s.answer) for t, s in zip(texts, samples))
    return correct / count


def align_projector(model, data: Conversations, targets: WordTargets, args, rng) -> list[dict]:
    """``args.align_steps`` projector-only steps of the alignment loss (no LLM forward: about 1.8 s per 32 images),
    on training images of their own index range; returns their log (every 25th step)."""
    projector = model.model.multi_modal_projector
    optimiser = torch.optim.AdamW(projector.parameters(), lr=args.lr)
    log, start = [], time.time()
    for step in range(args.align_steps):
        first = 10_000_000 + step * args.align_batch  # far from the answer steps' indices
        samples = [data.task.sample_at("train", i) for i in range(first, first + args.align_batch)]
        pixels = data.processor.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            hidden = tower_features(model, pixels)
        loss = targets.loss(projector(hidden.float()), patch_words(samples))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if (step + 1) % 25 == 0 or step + 1 == args.align_steps:
            value = float(loss.detach())
            log.append(dict(step=step + 1, loss=round(value, 4), seconds=round(time.time() - start, 1)))
            print(f"align step {step + 1} loss {value:.4f}", flush=True)
    return log


def learning_rate_factor(step: int, run_start: int, optimiser_start: int, args) -> float:
    """The multiplier of both learning rates at ``step``: a linear warm-up over ``args.warmup`` steps from
    ``optimiser_start`` (where the optimiser's moments began), then 1; with ``args.cosine`` times a cosine from 1
    to 0.1 over this run's ``args.steps`` from ``run_start``."""
    factor = min(1.0, (step - optimiser_start + 1) / args.warmup)
    if args.cosine:
        factor *= 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - run_start) / args.steps)))
    return factor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm_compress.bench.train_real", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(real.ASSETS), help="where parts.safetensors and train_log.json go")
    parser.add_argument("--state", default=str(real.cache_root() / "train-real-state.pt"),
                        help="optimiser state and step for --resume")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--turns", type=int, default=12, help="questions per image")
    parser.add_argument("--lr", type=float, default=1e-3, help="projector learning rate")
    parser.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA learning rate")
    parser.add_argument("--warmup", type=int, default=30, help="linear warm-up steps (again after --from-parts: its optimiser is new)")
    parser.add_argument("--steps", type=int, default=0,
                        help="answer steps in this run (0: until --minutes runs out); the horizon of --cosine")
    parser.add_argument("--cosine", action="store_true",
                        help="decay both learning rates along a cosine to a tenth over this run's --steps")
    parser.add_argument("--align-weight", type=float, default=1.0,
                        help="weight of the alignment loss beside the answer loss in every step (WordTargets)")
    parser.add_argument("--align-steps", type=int, default=300,
                        help="projector-only alignment steps before the first answer step (once per training)")
    parser.add_argument("--align-batch", type=int, default=32, help="images per alignment-only step")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", action="store_true",
                        help="train in float32 (default: bfloat16 autocast, about twice as fast on a CPU with AVX512-BF16)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--from-parts", metavar="DIR", default=None,
                        help="go on from a parts.safetensors + train_log.json (e.g. the shipped ones) when the --resume "
                             "state is gone: the weights and the step count carry over, the optimiser starts afresh")
    args = parser.parse_args(argv)
    if args.resume and args.from_parts:
        parser.error("--resume and --from-parts both say where to start: give one")
    if args.cosine and not args.steps:
        parser.error("--cosine needs --steps (its horizon)")
    torch.set_num_threads(args.threads)
    out, state_path = Path(args.out), Path(args.state)
    out.mkdir(parents=True, exist_ok=True)

    tower, llm, tokenizer = real.load_sources()
    model, processor = real.assemble(tower, llm, tokenizer, parts=None)
    del tower, llm
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lora = LoRAHooks(real.lora_modules(model))
    optimiser = torch.optim.AdamW([{"params": list(projector.parameters()), "lr": args.lr},
                                   {"params": lora.parameters(), "lr": args.lora_lr}], weight_decay=0.0)
    step, log = 0, {"runs": [], "steps": [], "evals": []}
    if args.resume:
        saved = torch.load(state_path, weights_only=False)
        projector.load_state_dict(saved["projector"])
        lora.load(saved["lora"])
        optimiser.load_state_dict(saved["optimiser"])
        step, log = saved["step"], saved["log"]
    elif args.from_parts:
        source = Path(args.from_parts)
        parts = real.read_parts(source / "parts.safetensors")
        if parts is None:
            parser.error(f"--from-parts: no parts.safetensors in {source}")
        projector.load_state_dict({k[len("projector."):]: v for k, v in parts.items() if k.startswith("projector.")})
        lora.load(parts)
        log = json.loads((source / "train_log.json").read_text())
        step = max([s["step"] for s in log["steps"]], default=0)
    first_step = step
    task = real.task()
    data = Conversations(task, processor, args.turns)
    rng = np.random.default_rng([7, step])
    log["runs"].append(dict(start_step=step, minutes=args.minutes, batch_size=args.batch_size, turns=args.turns,
                            lr=args.lr, lora_lr=args.lora_lr, align_weight=args.align_weight,
                            align_steps=args.align_steps, align_batch=args.align_batch, steps=args.steps,
                            cosine=args.cosine, from_parts=args.from_parts, autocast=None if args.fp32 else "bfloat16", machine=machine_description(torch.device("cpu")), started=time.strftime("%Y-%m-%d %H:%M:%S")))
    trainable = sum(p.numel() for p in [*projector.parameters(), *lora.parameters()])
    print(f"training {trainable / 1e6:.2f} M parameters (projector + LoRA r={RANK}) from step {step}", flush=True)

    def save() -> None:
        from safetensors.torch import save_file

        parts = {f"projector.{k}": v.detach().clone().contiguous() for k, v in projector.state_dict().items()}
        parts.update(lora.state())
        save_file(parts, str(out / "parts.safetensors"))
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(projector=projector.state_dict(), lora=lora.state(), optimiser=optimiser.state_dict(),
                        step=step, log=log), state_path)

    deadline = time.time() + 60 * args.minutes
    targets = WordTargets(model, processor.tokenizer)
    if args.align_steps and "align" not in log:
        log["align"] = align_projector(model, data, targets, args, rng)
        print(f"aligned the projector in {log['align'][-1]['seconds']:.0f} s: loss {log['align'][-1]['loss']:.3f}",
              flush=True)
    model.train()
    with lora:
        while time.time() < deadline and not (args.steps and step - first_step >= args.steps):
            t0 = time.time()
            factor = learning_rate_factor(step, first_step, first_step if args.from_parts else 0, args)
            for group, base in zip(optimiser.param_groups, (args.lr, args.lora_lr)):
                group["lr"] = base * factor
            batch = data.batch("train", range(step * args.batch_size, (step + 1) * args.batch_size), rng)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                projected = model.model.multi_modal_projector(tower_features(model, batch["pixel_values"]))
                answer = answer_loss(model, batch, projected)
                align = targets.loss(projected, batch["patch_words"])
                loss = answer + args.align_weight * align
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*projector.parameters(), *lora.parameters()], 1.0)
            optimiser.step()
            step += 1
            log["steps"].append(dict(step=step, loss=round(float(answer.detach()), 4), align=round(float(align.detach()), 4),
                                     seconds=round(time.time() - t0, 2)))
            print(f"step {step} answer loss {float(answer.detach()):.4f} align {float(align.detach()):.4f} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            if step % args.eval_every == 0:
                model.eval()
                accuracy = evaluate(model, processor, task, args.eval_samples)
                model.train()
                log["evals"].append(dict(step=step, val_accuracy=accuracy, samples=args.eval_samples))
                print(f"step {step} val accuracy {accuracy:.3f}", flush=True)
            if step % args.save_every == 0:
                save()
        save()
        model.eval()
        accuracy = evaluate(model, processor, task, args.eval_samples)
    log["evals"].append(dict(step=step, val_accuracy=accuracy, samples=args.eval_samples))
    save()
    print(f"stopped at step {step}: val accuracy {accuracy:.3f}; wrote {out / 'parts.safetensors'}", flush=True)


if __name__ == "__main__":
    main()

"""Train the shipped part of ``tiny-real-llava`` on ShapesVQA: LLaVA's projector and LoRA deltas on SmolLM2's attention.

    python -m vlm_compress.bench.train_real --minutes 60            # fresh
    python -m vlm_compress.bench.train_real --minutes 60 --resume   # go on from the last checkpoint

The DINOv2 tower and SmolLM2's weights stay frozen (LLaVA-1.5's stage-1 recipe, Liu et al., arXiv 2310.03744, §4.2,
plus LoRA, Hu et al., arXiv 2106.09685, on q/k/v/o of every layer: rank 8, α 16, B = 0 at the start, so training
starts from the stock LLM). One image per sequence with several questions about it in SmolLM2's chat format
(``<|im_start|>user … <|im_end|>``), the loss on each answer token and the ``<|im_end|>`` after it. The LoRA is
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
from .task import ShapesTask
from .timing import machine_description

RANK, ALPHA = 8, 16


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
        return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=label_ids)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the labelled tokens, the LM head applied only where a label is (49k-way logits are costly)."""
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"])
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
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fp32", action="store_true",
                        help="train in float32 (default: bfloat16 autocast, about twice as fast on a CPU with AVX512-BF16)")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
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
    task = real.task()
    data = Conversations(task, processor, args.turns)
    rng = np.random.default_rng([7, step])
    log["runs"].append(dict(start_step=step, minutes=args.minutes, batch_size=args.batch_size, turns=args.turns,
                            lr=args.lr, lora_lr=args.lora_lr, autocast=None if args.fp32 else "bfloat16", machine=machine_description(torch.device("cpu")), started=time.strftime("%Y-%m-%d %H:%M:%S")))
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
    model.train()
    with lora:
        while time.time() < deadline:
            t0 = time.time()
            for group, base in zip(optimiser.param_groups, (args.lr, args.lora_lr)):
                group["lr"] = base * min(1.0, (step + 1) / args.warmup)
            batch = data.batch("train", range(step * args.batch_size, (step + 1) * args.batch_size), rng)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
                loss = answer_loss(model, batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*projector.parameters(), *lora.parameters()], 1.0)
            optimiser.step()
            step += 1
            log["steps"].append(dict(step=step, loss=round(float(loss.detach()), 4), seconds=round(time.time() - t0, 2)))
            print(f"step {step} loss {float(loss.detach()):.4f} ({time.time() - t0:.1f} s)", flush=True)
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

"""Train the embedded ``tiny-onevision`` (stock ``LlavaOnevisionForConditionalGeneration``) on ShapesVideo.

    python -m vlm_compress.bench.train_video --out vlm_compress/assets/tiny-onevision --steps 2800

A clip is 8 ShapesVQA frames (:mod:`.video_task`); each frame goes through ``tiny-llava``'s CLIP tower (96 pixels,
12×12 patches, CLS dropped), the projector and OneVision's 2×2 bilinear pooling: 36 tokens a frame, 8·36 + 1 = 289
for the clip (one newline after the whole video). The tower, projector and LLM start from ``tiny-llava`` (the tower
stays frozen); the tokenizer is a new lower-cased word-level one that also covers QuoTA's prompt templates
(:mod:`vlm_compress.pruners.quota`), with ``tiny-llava``'s embedding and output rows copied word by word. Every step
sums three losses, each on the answer tokens and EOS: video QA, on clips of 1, 2, 4 or 8 frames that hold the key
frames (one length a step: the short ones are a curriculum, pooled frames are unreadable to ``tiny-llava`` at first);
frame relevance, one frame of full clips as a 1-frame video under QUESTION_TEMPLATE or ENTITY_TEMPLATE ("yes" for a
key frame, key and other frames drawn evenly); and text-only query decoupling (DECOUPLE_TEMPLATE → "step 1: yes
step 2: [...] step 3: [...]"). These are the prompts QuoTA builds at run time. Float32: bf16 autocast is about 2×
slower on CPUs without native bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..pruners.quota import DECOUPLE_TEMPLATE, ENTITY_TEMPLATE, PROMPT_FORMAT, QUESTION_TEMPLATE
from ..testing import SPECIAL_TOKENS, TINY_LLAVA_DIMS, build_onevision, build_onevision_processor, wrap_tokenizer
from .task import vocabulary
from .timing import machine_description
from .train import optimizer_step, schedule
from .video_task import ShapesVideoTask, VideoSample, decoupled, frame_relevance

VIDEO_TASK = ShapesVideoTask(frames=8, canvas=96, cell=8, objects=(3, 5))
PINPOINTS = [[96, 192], [192, 96], [192, 192]]  # up to 2×2 crops of the tower's 96-pixel input (images only)
RENAMED = {"USER:": "user", "ASSISTANT:": "assistant"}  # tiny-llava's words → this tokenizer's
# New words whose input embedding starts from an old word's: every answer is predicted at the ":" closing
# "assistant :", where tiny-llava predicted at "ASSISTANT:" (from the mean of the old rows, that position starts
# at chance: ~0.1 first-token accuracy on a key frame against 0.99 from "ASSISTANT:", unpooled).
EMBEDDING_FROM = {":": "ASSISTANT:"}
ENTITIES = re.compile(r"step\s*3\s*:\s*\[(.*?)\]")


def _pipeline():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])


def words_of(text: str) -> list[str]:
    """The tokens the tokenizer splits ``text`` into (lower-cased words and single punctuation marks)."""
    normalizer, pre_tokenizer = _pipeline()
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]


def build_tokenizer():
    """Word-level tokenizer over the task's words, QuoTA's templates and the decoupling format."""
    from tokenizers import Tokenizer, decoders, models

    words = set(words_of(" ".join(vocabulary())))
    for template in (DECOUPLE_TEMPLATE, ENTITY_TEMPLATE, QUESTION_TEMPLATE, PROMPT_FORMAT):
        words.update(words_of(template.format(question="", entities="", visual="", text="")))
    words.update("[ ] , : . ? step 1 2 3".split())
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.add_special_tokens(SPECIAL_TOKENS)
    tk.normalizer, tk.pre_tokenizer = _pipeline()
    tk.decoder = decoders.WordPiece(cleanup=True)  # joins words with spaces
    return wrap_tokenizer(tk)


def check_tokenizer(tokenizer, task: ShapesVideoTask) -> None:
    """Every prompt and target of the task, under every template, tokenizes without ``<unk>``."""
    s = task.sample_at("val", 0)
    texts = ["USER: <video>\nwhat color is the triangle ? ASSISTANT:", s.prompt, decoupled(s),
             PROMPT_FORMAT.format(visual="", text=DECOUPLE_TEMPLATE.format(question=s.question)),
             PROMPT_FORMAT.format(visual="<video>", text=QUESTION_TEMPLATE.format(question=s.question)),
             PROMPT_FORMAT.format(visual="<video>", text=ENTITY_TEMPLATE.format(entities=", ".join(s.entities)))]
    texts += [f"{q} {a} {', '.join(e)}" for q, a, e in
              {(x.question, x.answer, tuple(x.entities)) for x in task.iterate("val", 200)}]
    for text in texts:
        if tokenizer.unk_token_id in tokenizer(text).input_ids:
            raise RuntimeError(f"<unk> in {text!r}: {tokenizer.tokenize(text)}")


def initial_model(base: Path):
    """A ``LlavaOnevisionForConditionalGeneration`` holding ``tiny-llava``'s weights, and its processor.

    Tower, projector, decoder layers and final norm load exactly; the embedding and output rows are copied by word
    (new words: the mean of the old rows plus a little noise); ``image_newline`` is new. Returns ``(model,
    processor, report)``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tokenizer = build_tokenizer()
    check_tokenizer(tokenizer, VIDEO_TASK)
    model = build_onevision(tokenizer, TINY_LLAVA_DIMS, pinpoints=PINPOINTS, tower="clip")
    source = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    old_vocab = AutoProcessor.from_pretrained(base).tokenizer.get_vocab()
    state = source.state_dict()
    rows = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in rows}, strict=False)
    if set(missing) != rows | {"model.image_newline"} or unexpected:
        raise RuntimeError(f"unexpected weight mismatch: missing {missing}, unexpected {unexpected}")
    new_vocab = tokenizer.get_vocab()
    pairs = {new_vocab[RENAMED.get(w, w.lower())]: i for w, i in old_vocab.items() if RENAMED.get(w, w.lower()) in new_vocab}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in rows:
            old, new = state[name], model.state_dict()[name]
            new.copy_(old.mean(0) + 0.1 * old.std(0) * torch.randn(new.shape, generator=generator))
            new[list(pairs)] = old[list(pairs.values())]
        embed = model.state_dict()["model.language_model.embed_tokens.weight"]
        for word, source_word in EMBEDDING_FROM.items():
            embed[new_vocab[word]] = state["model.language_model.embed_tokens.weight"][old_vocab[source_word]]
    report = dict(copied_rows=len(pairs), new_rows=sorted(w for w, i in new_vocab.items() if i not in pairs),
                  embedding_from=EMBEDDING_FROM,
                  unmapped_old=sorted(w for w in old_vocab if RENAMED.get(w, w.lower()) not in new_vocab),
                  loaded_exactly=len(state) - len(rows), new_parameters=["model.image_newline"])
    with tempfile.TemporaryDirectory() as tmp:  # train on the backends that AutoProcessor will load
        build_onevision_processor(tokenizer, TINY_LLAVA_DIMS, PINPOINTS, tower="clip").save_pretrained(tmp)
        processor = AutoProcessor.from_pretrained(tmp)
    check_normalisation(processor, base)
    return model, processor, report


def check_normalisation(processor, base: Path) -> None:
    """The image and video processors normalise as ``tiny-llava``'s (CLIP mean/std, 96 pixels)."""
    ref = json.loads((base / "processor_config.json").read_text())["image_processor"]
    for name, p in (("image", processor.image_processor), ("video", processor.video_processor)):
        if not (np.allclose(p.image_mean, ref["image_mean"]) and np.allclose(p.image_std, ref["image_std"])
                and p.size["height"] == p.size["width"] == ref["crop_size"]["height"]):
            raise RuntimeError(f"the {name} processor normalises unlike {base}: {p.image_mean} {p.image_std} {p.size}")


# ---- batches: processor inputs with labels on the target tokens and EOS ----------------------------------
def with_targets(processor, prompts: list[str], targets: list[str] | None, videos=None) -> dict:
    """Prompts followed by their targets and EOS, labelled there; ``targets=None``: the prompts alone (eval)."""
    texts = prompts if targets is None else [f"{p} {t} </s>" for p, t in zip(prompts, targets)]
    inputs = processor(text=texts, videos=videos, return_tensors="pt", padding=True) if videos is not None else \
        processor.tokenizer(texts, return_tensors="pt", padding=True)
    if targets is None:
        return dict(inputs)
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    for row, t in enumerate(targets):  # left padding: every target ends its row
        n = len(processor.tokenizer(f"{t} </s>").input_ids)
        labels[row, -n:] = ids[row, -n:]
    inputs["labels"] = labels
    return dict(inputs)


def qa_batch(processor, samples: list[VideoSample], train: bool = True) -> dict:
    return with_targets(processor, [s.prompt for s in samples], [s.answer for s in samples] if train else None,
                        videos=[s.frames for s in samples])


def relevance_prompt(sample: VideoSample, template: str) -> str:
    text = (QUESTION_TEMPLATE.format(question=sample.question) if template == "question"
            else ENTITY_TEMPLATE.format(entities=", ".join(sample.entities)))
    return PROMPT_FORMAT.format(visual="<video>", text=text)


def pick_frame(sample: VideoSample, rng: np.random.Generator) -> int:
    """A key frame or another one, evenly (another one when the clip has no key frame)."""
    others = [f for f in range(len(sample.frames)) if f not in sample.key_frames]
    pool = sample.key_frames if sample.key_frames and rng.random() < 0.5 else others
    return int(pool[rng.integers(len(pool))])


def relevance_batch(processor, items: list[tuple[VideoSample, int, str]], train: bool = True) -> dict:
    """``(sample, frame, template)`` → the frame as a 1-frame video under that template ("question"/"entity")."""
    return with_targets(processor, [relevance_prompt(s, t) for s, _, t in items],
                        [frame_relevance(s, f) for s, f, _ in items] if train else None,
                        videos=[s.frames[f : f + 1] for s, f, _ in items])


def decouple_prompt(question: str) -> str:
    return PROMPT_FORMAT.format(visual="", text=DECOUPLE_TEMPLATE.format(question=question))


def decouple_batch(processor, samples: list[VideoSample]) -> dict:
    return with_targets(processor, [decouple_prompt(s.question) for s in samples], [decoupled(s) for s in samples])


def parse_entities(text: str) -> list[str] | None:
    """Step 3's list from a decoupling answer, or ``None`` when there is none."""
    found = ENTITIES.search(text)
    return None if found is None else [e.strip() for e in found.group(1).split(",") if e.strip()]


def training_batches(processor, tasks: dict[int, ShapesVideoTask], args, rng, pool: list) -> list[dict]:
    """One step's sub-batches: video QA on ``--qa-frames`` frames of clips of one length drawn from
    ``--clip-lengths`` (short clips are the curriculum: the key frame alone teaches reading pooled frames); frame
    relevance on frames of ``--context-clips`` new full clips, and decoupling on their questions. With
    ``--context-pool N`` the new clips join ``pool`` (the last N kept) and relevance and decoupling draw from it:
    more questions a step for the cost of a few clips."""
    def draw(task, n):
        return [task.sample_at("train", int(i)) for i in rng.integers(0, 10**9, n)]

    length = int(rng.choice(args.clip_lengths))
    samples = draw(tasks[length], max(1, args.qa_frames // length))
    context = draw(tasks[VIDEO_TASK.frames], args.context_clips)
    if args.context_pool:
        pool.extend(context)
        del pool[: -args.context_pool]
        context = pool
    items = [(s, pick_frame(s, rng), t) for t, n in (("question", args.relevance), ("entity", args.entity))
             for s in (context[i] for i in rng.integers(0, len(context), n))]
    batches = [qa_batch(processor, samples), relevance_batch(processor, items)]
    if args.decouple:
        batches.append(decouple_batch(processor, [context[i] for i in rng.integers(0, len(context), args.decouple)]))
    return batches


# ---- evaluation ------------------------------------------------------------------------------------------
class Evaluation:
    """Held-out clips (``count``, rendered once) and the checks of :meth:`run`."""

    def __init__(self, task: ShapesVideoTask, split: str = "val", count: int = 200, decouple: int = 60):
        self.samples = list(task.iterate(split, count))
        self.frames = [pick_frame(s, np.random.default_rng([7, i])) for i, s in enumerate(self.samples)]
        self.key_frames = [s.window(k, k + 1) for s in self.samples for k in (s.key_frames or [0])[:1]]
        self.decouple = decouple

    @torch.no_grad()
    def run(self, model, processor, batch_size: int = 25) -> dict:
        """Video QA first-token accuracy (overall, per type; and on the first key frame alone as a 1-frame clip);
        frame relevance first-token accuracy per template; decoupling: the rate of answers whose step 3 parses,
        and of those equal to the sample's entities."""
        model.eval()
        tok = processor.tokenizer

        def first_tokens(make, items):
            out = []
            for start in range(0, len(items), batch_size):
                inputs = make(items[start : start + batch_size])
                logits = model(**inputs, logits_to_keep=1).logits[:, -1]
                out += tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
            return out

        answers = first_tokens(lambda b: qa_batch(processor, b, train=False), self.samples)
        per_type = {}
        for s, a in zip(self.samples, answers):
            per_type.setdefault(s.qtype, []).append(a == s.answer)
        result = dict(qa_acc=float(np.mean([a == s.answer for s, a in zip(self.samples, answers)])),
                      per_type={k: float(np.mean(v)) for k, v in sorted(per_type.items())})
        answers = first_tokens(lambda b: qa_batch(processor, b, train=False), self.key_frames)
        result["qa_key_frame"] = float(np.mean([a == s.answer for s, a in zip(self.key_frames, answers)]))
        for template in ("question", "entity"):
            items = [(s, f, template) for s, f in zip(self.samples, self.frames)]
            said = first_tokens(lambda b: relevance_batch(processor, b, train=False), items)
            result[f"relevance_{template}"] = float(np.mean([p == frame_relevance(s, f) for (s, f, _), p in zip(items, said)]))
        samples = self.samples[: self.decouple]
        inputs = tok([decouple_prompt(s.question) for s in samples], return_tensors="pt", padding=True)
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        parsed = [parse_entities(t) for t in tok.batch_decode(generated, skip_special_tokens=True)]
        result["decouple_parsed"] = float(np.mean([p is not None for p in parsed]))
        result["decouple_exact"] = float(np.mean([p == s.entities for s, p in zip(samples, parsed)]))
        model.train()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(Path(__file__).resolve().parents[1] / "assets" / "tiny-llava"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=45)
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps (the learning-rate cosine runs over them) instead of --minutes")
    parser.add_argument("--qa-frames", type=int, default=24, help="frames per step of video QA clips")
    parser.add_argument("--clip-lengths", type=int, nargs="+", default=[1, 2, 4, 8, 8],
                        help="a step's QA clips have one of these lengths, drawn uniformly (the task's is 8)")
    parser.add_argument("--context-clips", type=int, default=3,
                        help="full clips per step that the relevance frames and decoupling questions come from")
    parser.add_argument("--context-pool", type=int, default=0,
                        help="keep the last N context clips and draw relevance and decoupling from them (0: off)")
    parser.add_argument("--relevance", type=int, default=10, help="frames per step under QUESTION_TEMPLATE")
    parser.add_argument("--entity", type=int, default=6, help="frames per step under ENTITY_TEMPLATE")
    parser.add_argument("--decouple", type=int, default=1, help="text-only decoupling prompts per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="bf16 autocast (off: about 2× slower than float32 on CPUs without AVX-512 BF16)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--stop-at", type=int, default=0,
                        help="end (evaluate, save) after this step, the schedule still running over --steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "config.json").exists():
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(out)
        log = json.loads((out / "train_log.json").read_text())
        log.setdefault("resumed", []).append({"at_step": log["steps"], "args": vars(args)})
    else:
        model, processor, report = initial_model(Path(args.base))
        print("initialised from", args.base, json.dumps(report), flush=True)
        log = {"args": vars(args), "task": VIDEO_TASK.describe(), "pinpoints": PINPOINTS, "init": report,
               "machine": {**machine_description(torch.device("cpu")), "cores": os.cpu_count()}, "history": [],
               "seconds": 0.0, "steps": 0}
    processor.tokenizer.padding_side = "left"
    model.train()
    model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    evaluation = Evaluation(VIDEO_TASK)
    spec = VIDEO_TASK.describe()
    tasks = {n: ShapesVideoTask.from_description({**spec, "frames": n}) for n in {*args.clip_lengths, VIDEO_TASK.frames}}
    step0, seconds0 = log["steps"], log["seconds"]
    start, step = time.time(), step0
    lr_at, running = schedule(args, step0, start)

    def save():
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        (out / "task.json").write_text(json.dumps(VIDEO_TASK.describe(), indent=1))
        log.update(steps=step, seconds=seconds0 + time.time() - start)
        (out / "train_log.json").write_text(json.dumps(log, indent=1))

    def evaluate():
        result = evaluation.run(model, processor)
        log["history"].append(dict(step=step, seconds=seconds0 + time.time() - start, **result))
        print(f"== step {step} {json.dumps({k: v if isinstance(v, float) else {t: round(a, 3) for t, a in v.items()} for k, v in result.items()})}",
              flush=True)

    if step0 == 0:
        evaluate()
    rng = np.random.default_rng(args.seed + step0)
    pool = []
    while running(step) and not (args.stop_at and step >= args.stop_at):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batches = training_batches(processor, tasks, args, rng, pool)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            losses = [model(**b).loss for b in batches]
        optimizer_step(sum(losses), optimizer, params)
        step += 1
        if step % 10 == 0:
            print(f"step {step} losses {' '.join(f'{x.item():.3f}' for x in losses)} lr {lr_at(step):.1e} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0:
            evaluate()
            save()
    if not log["history"] or log["history"][-1]["step"] != step:
        evaluate()
    save()


if __name__ == "__main__":
    main()

"""Plain autoregressive and speculative decoding of image codes.

``speculative_generate`` is draft-then-verify with a chain of ``γ`` drafts (Leviathan et al., arXiv 2211.17192,
Alg. 1; reference ``trained-tokenizers-speculative.md`` §7.1): the drafter proposes ``γ`` codes one at a time, the
target scores them in one forward pass (with the last emitted code in front), and the rule (:mod:`.acceptance`,
:mod:`.lantern`) accepts a prefix; at the first rejection a replacement is drawn from the rule's residual, and when
all ``γ`` pass a bonus code is drawn from the target's next distribution. Both caches are then cropped to the
accepted prefix. Every round therefore emits 1..γ+1 codes for one target call. The last round drafts fewer so that
exactly ``num_codes`` codes come out.

With the standard rule the codes are distributed exactly as plain sampling from the target under the same
:class:`~.sampling.Warp` (tested by exact enumeration and Monte Carlo), and greedy speculative decoding returns
exactly the greedy codes. Classifier-free guidance combines each model's logits inside its :class:`~.streams.ModelStream`,
so verification sees the same guided target as plain decoding.

Speculative decoding runs one sequence at a time (acceptance lengths differ per sequence); a batch of classes is
generated sample after sample, drawing from one sampler in order.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .acceptance import AcceptanceRule
from .gpt import ImageGPT
from .sampling import Sampler, TorchSampler, Warp
from .streams import ModelStream, Stream

DRAFT_MODES = ("sample", "argmax")
SOFTMAX = Warp()  # greedy verification reads the unwarped target distribution (reference §6.2)


@dataclasses.dataclass
class GenerationStats:
    """What a generation cost. ``mean_accepted_length`` is τ, codes emitted per target call (EAGLE's convention;
    plain decoding: 1); ``acceptance_rate`` the share of drafted codes accepted."""

    sequences: int = 0
    codes: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    accepted_per_round: list = dataclasses.field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        return self.codes / max(self.target_calls, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def codes_per_second(self) -> float:
        return self.codes / self.seconds if self.seconds > 0 else float("nan")

    @classmethod
    def total(cls, parts: "list[GenerationStats]") -> "GenerationStats":
        """The stats of several generations together (counts and seconds summed, rounds concatenated)."""
        out = cls()
        for part in parts:
            for field in dataclasses.fields(cls):
                setattr(out, field.name, getattr(out, field.name) + getattr(part, field.name))
        return out

    def summary(self) -> dict:
        return {"sequences": self.sequences, "codes": self.codes, "target_calls": self.target_calls,
                "draft_calls": self.draft_calls, "mean_accepted_length": self.mean_accepted_length,
                "acceptance_rate": self.acceptance_rate, "seconds": self.seconds,
                "codes_per_second": self.codes_per_second}


def _stream(model: ImageGPT | Stream, cfg_scale: float) -> Stream:
    if isinstance(model, ImageGPT):
        return ModelStream(model, cfg_scale)
    if cfg_scale != 1.0:
        raise ValueError("cfg_scale applies to ImageGPT models; a stream carries its own guidance")
    return model


def _num_codes(model, num_codes: int | None) -> int:
    total = model.config.num_codes if isinstance(model, ImageGPT) else num_codes
    if total is None:
        raise ValueError("num_codes is required for a stream (an ImageGPT knows its grid)")
    num_codes = total if num_codes is None else int(num_codes)
    if not 1 <= num_codes <= total:
        raise ValueError(f"num_codes must lie in [1, {total}], got {num_codes}")
    return num_codes


def _classes(classes) -> torch.Tensor:
    classes = torch.as_tensor(classes).long().reshape(-1)
    if classes.numel() == 0:
        raise ValueError("no classes given")
    return classes


@torch.no_grad()
def generate(model: ImageGPT | Stream, classes, num_codes: int | None = None, warp: Warp | None = None,
             greedy: bool = False, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
             sampler: Sampler | None = None) -> tuple[torch.LongTensor, GenerationStats]:
    """Plain decoding of ``num_codes`` codes (default: the whole grid) for ``classes [B]`` in one batch →
    ``(codes [B, num_codes], stats)``."""
    classes = _classes(classes)
    num_codes = _num_codes(model, num_codes)
    stream, warp, sampler = _stream(model, cfg_scale), warp or Warp(), sampler or TorchSampler(generator)
    start = time.perf_counter()
    logits = stream.start(classes)
    out = []
    for i in range(num_codes):
        code = logits.argmax(-1) if greedy else sampler.categorical(warp(logits))
        out.append(code)
        if i < num_codes - 1:
            logits = stream.extend(code[:, None])[:, -1]
    stats = GenerationStats(sequences=len(classes), codes=len(classes) * num_codes, target_calls=num_codes,
                            seconds=time.perf_counter() - start)
    return torch.stack(out, 1), stats


@torch.no_grad()
def speculative_generate(target: ImageGPT | Stream, drafter: ImageGPT | Stream, classes, gamma: int = 4,
                         rule: AcceptanceRule | None = None, num_codes: int | None = None, warp: Warp | None = None,
                         greedy: bool = False, draft: str = "sample", cfg_scale: float = 1.0,
                         generator: torch.Generator | None = None, sampler: Sampler | None = None,
                         ) -> tuple[torch.LongTensor, GenerationStats]:
    """Speculative decoding (module docstring) of ``num_codes`` codes per class → ``(codes [B, num_codes], stats)``.

    ``rule``: :class:`AcceptanceRule` (standard, the default) or :class:`~.lantern.LanternRule`; ``draft``:
    ``"sample"`` draws each draft from the drafter's warped distribution, ``"argmax"`` takes its most likely code
    (a point mass, EAGLE-2's ``q = 1``); ``greedy`` verifies greedily (drafts are then argmax too)."""
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma (draft length) must be a positive int, got {gamma!r}")
    if draft not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {DRAFT_MODES}, got {draft!r}")
    classes = _classes(classes)
    num_codes = _num_codes(target, num_codes)
    if isinstance(drafter, ImageGPT) and isinstance(target, ImageGPT):
        if drafter.config.codebook_size != target.config.codebook_size:
            raise ValueError(f"drafter and target must share a codebook: {drafter.config.codebook_size} vs "
                             f"{target.config.codebook_size} codes")
    target_stream, draft_stream = _stream(target, cfg_scale), _stream(drafter, cfg_scale)
    rule, warp, sampler = rule or AcceptanceRule(), warp or Warp(), sampler or TorchSampler(generator)
    stats = GenerationStats()
    start = time.perf_counter()
    rows = [_one_sequence(target_stream, draft_stream, classes[i:i + 1], num_codes, gamma, rule, warp, greedy,
                          draft, sampler, stats) for i in range(len(classes))]
    stats.seconds = time.perf_counter() - start
    return torch.stack(rows), stats


def _one_sequence(target: Stream, drafter: Stream, cls: torch.Tensor, num_codes: int, gamma: int,
                  rule: AcceptanceRule, warp: Warp, greedy: bool, draft: str, sampler: Sampler,
                  stats: GenerationStats) -> torch.LongTensor:
    """One sequence; the streams' caches always hold a prefix of ``out`` (pending codes are fed next round)."""
    head = target.start(cls)[0]  # target logits for code 0 (later rounds get them from the verification pass)
    draft_logits = drafter.start(cls)[0]
    stats.target_calls += 1
    stats.draft_calls += 1
    out: list[int] = []
    target_pending: list[int] = []  # emitted, not yet fed to the target (the last code of a round)
    draft_pending: list[int] = []
    while len(out) < num_codes:
        g = min(gamma, num_codes - len(out) - 1)
        if draft_pending:
            draft_logits = drafter.extend(_ids(draft_pending))[0, -1]
            stats.draft_calls += 1
        drafts, proposals = [], []
        for i in range(g):
            q = warp(draft_logits)
            x = int(draft_logits.argmax()) if greedy or draft == "argmax" else int(sampler.categorical(q))
            if draft == "argmax" and not greedy:
                q = torch.zeros_like(q)
                q[x] = 1.0
            drafts.append(x)
            proposals.append(q)
            if i < g - 1:
                draft_logits = drafter.extend(_ids([x]))[0, -1]
                stats.draft_calls += 1
        fed = target_pending + drafts
        verified = target.extend(_ids(fed))[0] if fed else head.new_zeros(0, head.shape[-1])
        if fed:
            stats.target_calls += 1
        # logits[i] is the target's distribution for draft i; logits[g] for the code after all of them
        logits = ([head] if not target_pending else []) + list(verified)
        accepted, replacement = 0, None
        for i, x in enumerate(drafts):
            if greedy:
                ok = rule.greedy_accepts(SOFTMAX(logits[i]), x)
                if not ok:
                    replacement = int(logits[i].argmax())
            else:
                accept, residual = rule.decide(warp(logits[i]), proposals[i], x)
                ok = sampler.bernoulli(accept)
                if not ok:
                    replacement = int(sampler.categorical(residual))
            if not ok:
                break
            accepted += 1
        if replacement is None:  # every draft passed (or none was made): the bonus code
            last = logits[len(drafts)]
            replacement = int(last.argmax()) if greedy else int(sampler.categorical(warp(last)))
        base = len(out)
        out += drafts[:accepted] + [replacement]
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.accepted_per_round.append(accepted)
        target.crop(len(out) - 1)
        target_pending = [replacement]
        kept_in_drafter = min(accepted, max(g - 1, 0))  # the drafter never fed its last draft
        drafter.crop(base + kept_in_drafter)  # it fed its pending codes at the start of the round
        draft_pending = drafts[kept_in_drafter:accepted] + [replacement]
    stats.sequences += 1
    stats.codes += num_codes
    return torch.tensor(out, dtype=torch.long)


def _ids(codes: list[int]) -> torch.LongTensor:
    return torch.tensor([codes], dtype=torch.long)

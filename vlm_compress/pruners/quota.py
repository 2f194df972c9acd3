"""``quota``: QuoTA, query-oriented token assignment over video frames (Luo et al., arXiv 2503.08689; reference §7).

Official code: ``MAC-AutoML/QuoTA`` @ec194d7 (``quota_pipeline.py``, ``tools/qwen2vl_batch.py::frame_retrieve``,
``core/llava_arch.py::token_compress``). Three parts, all training-free:

1. **Query decoupling.** The VLM itself, text only, answers a three-step chain-of-thought prompt (does the
   question ask about objects? which ones? which are physical entities?); ``step 3: [...]`` is the entity list.
   Output that does not parse falls back to the raw question; "step 1: no" means no entities (the official demo
   crashes there, ``final_object`` undefined). ``decouple=False`` skips the pass.
2. **Frame relevance.** A scorer VLM (default: the model itself, run uncompressed) sees each frame alone with
   "does the image contain any object of {entities}?" (or, without entities, "{question} does the image contain
   sufficient information ...?") and the frame's score is ``p = P(yes) / (P(yes) + P(no))`` from the next-token
   logits (the official code reads the softmax probability of the letter "A" of an A/B prompt, unnormalised).
   Frames go through in batches of ``score_batch`` (official: 64).
3. **Token assignment.** Frame weights ``w_i = (scale · p_i)^power`` (official ``weight_scale = [100, 2]``),
   normalised; frame ``i`` gets ``n_i`` tokens of the video's budget, ``n_i ∝ w_i``, then its grid is resized to
   ``n_i`` tokens (``within="bilinear"``: the official v1) or reduced by another method; frames with ``n_i = 0`` are
   dropped with their placeholders.

Choices the paper and code leave open, and our differences:

* **Exact counts.** The official ``n_i = int(N_t · w_i)`` floors (the video gets fewer than ``N_t`` tokens) and
  resizes to an ``h×w ≤ n_i`` grid. We split with largest remainders so the counts sum exactly to the budget for
  any scores (all-zero scores: an even split), and resize to the smallest ``h×w ≥ n_i`` grid with the frame's
  aspect ratio, dropping the ``h·w − n_i < h`` surplus cells evenly spread over the grid.
* **Cap.** A frame gets at most its own token count (the official v2–v5 ``scale_weights`` cap; v1 may upsample a
  frame past its native grid). This makes ``budget=1.0`` the identity.
* **Newlines.** The installed transformers' OneVision closes a video with one newline (kept, counted in the
  budget); the official LLaVA-Video code adds one per row of each frame.
* **Frames and scorer input.** We score the frames the processor gave (no QuoTA-specific dynamic frame count:
  the caller samples frames, :func:`vlm_compress.video.read_video`). The default scorer is the model itself,
  uncompressed, each frame a one-frame video (the pooled tokens the model sees). A separate ``scorer`` (any
  supported VLM, like the reference's Qwen2-VL-2B) sees each frame as an image through its own processor: the
  frames are un-normalised from this model's video processor, so it sees them at this model's input size, not
  the source resolution. Its prompts are wrapped in the same ``prompt_format``.
* **Within a frame.** ``within`` may name any single-grid encoder method (e.g. ``"cls_attn"``), so QuoTA's
  assignment can be compared with the uniform split of the same method; AnyRes images (image prompts) are
  reduced by ``pool`` under ``within="bilinear"``.

On Qwen2-VL/Qwen2.5-VL a "frame" is one temporal slice of the video (two input frames under the 2×2×2 patching),
scored as a one-slice video (``VideoBatch.one_frame_videos``), its tokens the merged grid of that slice.

Cost: the decoupling generation and the scoring passes are reported in ``stats.scoring_passes``,
``scoring_ms``, ``scoring_tokens`` and ``scoring_flops``; the per-frame scores in ``stats.frame_scores``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..budget import apportion
from ..registry import get_method, register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection, VideoContext, model_tokenizer

# Step (i), query decoupling: the VLM itself, text only, turns the question into the physical entities it asks
# about (reference: `quota_pipeline.py`, a 3-step chain of thought: need objects? -> object list -> filtered
# physical-entity list). Our wording, one in-context example instead of the reference's three.
DECOUPLE_TEMPLATE = (
    "Question: {question}\n"
    "Which objects does the question ask about? Think in three steps.\n"
    "Step 1: does the question ask about objects? Answer yes or no.\n"
    "Step 2: list the objects the question mentions.\n"
    "Step 3: keep only physical entities, as a list.\n"
    "Example: question: what color is the car? step 1: yes step 2: [car, color] step 3: [car]"
)
# Step (ii), frame scoring (reference: `tools/qwen2vl_batch.py::frame_retrieve`, an A/B letter prompt; the issue
# asks P("yes") normalised over yes/no, so the options are the words themselves).
ENTITY_TEMPLATE = "Does the image contain any object of {entities}? Answer yes or no."
QUESTION_TEMPLATE = (
    "{question}\nDoes the image contain sufficient information to answer the given question? Answer yes or no."
)
# How a prompt is wrapped for the model: `{visual}` is one frame's placeholders (empty for the text-only
# decoupling pass), `{text}` the instruction. LLaVA-1.5's conversation format, which the embedded models use.
PROMPT_FORMAT = "USER: {visual}\n{text} ASSISTANT:"

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"  # scorer="tiny-llava" names one of them
_STEP1 = re.compile(r"step\s*1\s*:\s*(yes|no)\b", re.IGNORECASE)
_STEP3 = re.compile(r"step\s*3\s*:\s*\[(.*?)\]", re.IGNORECASE | re.DOTALL)


def parse_entities(text: str) -> list[str] | None:
    """The entity list of a decoupling answer: ``[]`` when step 1 says "no" (no objects asked about), ``None``
    when the answer does not parse (the caller falls back to the raw question)."""
    step1 = _STEP1.search(text)
    if step1 and step1.group(1).lower() == "no":
        return []
    step3 = _STEP3.search(text)
    if step3 is None:
        return None
    items = [item.strip().strip("'\"").strip() for item in step3.group(1).split(",")]
    items = [item for item in items if item]
    return items or None


def assign_counts(scores: list[float], total: int, per_frame: int, scale: float = 100.0,
                  power: float = 2.0) -> list[int]:
    """Tokens per frame: ``total`` split in proportion to ``(scale · score)^power`` with largest remainders, at
    most ``per_frame`` each; sums exactly to ``min(total, frames · per_frame)`` for any scores (all-zero: even)."""
    weights = [(scale * max(float(s), 0.0)) ** power for s in scores]
    return apportion(total, weights, [per_frame] * len(scores))


def resize_shape(count: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The smallest ``h×w ≥ count`` grid with about ``grid``'s aspect ratio (``h = round(sqrt(count·H/W))``)."""
    rows = min(max(round(math.sqrt(count * grid[0] / grid[1])), 1), count)
    return rows, math.ceil(count / rows)


def bilinear_tokens(features: torch.Tensor, grid: tuple[int, int], count: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QuoTA v1 within a frame: ``[I, h·w, D]`` resized bilinearly to :func:`resize_shape` and thinned to exactly
    ``count`` tokens (surplus cells dropped evenly over the raster). Returns ``(tokens [I, count, D],
    representative source token [count], merged_into [h·w])``: the source cell nearest each kept output cell's
    centre, and the output slot whose cell covers each source cell's centre (-1 when that cell was dropped)."""
    h, w = grid
    if count == h * w:
        index = torch.arange(count, device=features.device)
        return features, index, index
    rows, cols = resize_shape(count, grid)
    maps = features.reshape(features.shape[0], h, w, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(maps.float(), size=(rows, cols), mode="bilinear").to(features.dtype)
    resized = resized.permute(0, 2, 3, 1).reshape(features.shape[0], rows * cols, -1)
    surplus = rows * cols - count
    drop = torch.linspace(0, rows * cols - 1, surplus + 2)[1:-1].round().long() if surplus else torch.zeros(0).long()
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[drop] = False
    cells = keep.nonzero().squeeze(1)
    src_r = ((cells // cols).double() + 0.5).mul(h / rows).floor().long().clamp_max(h - 1)
    src_c = ((cells % cols).double() + 0.5).mul(w / cols).floor().long().clamp_max(w - 1)
    slot = torch.full((rows * cols,), -1, dtype=torch.long)
    slot[cells] = torch.arange(count)
    out_r = ((torch.arange(h).double() + 0.5) * rows / h).floor().long().clamp_max(rows - 1)
    out_c = ((torch.arange(w).double() + 0.5) * cols / w).floor().long().clamp_max(cols - 1)
    merged_into = slot[(out_r[:, None] * cols + out_c[None, :]).flatten()]
    device = features.device
    return resized[:, cells.to(device)], (src_r * w + src_c).to(device), merged_into.to(device)


@register_method("quota")
@dataclasses.dataclass
class QuotaPruner(EncoderPruner):
    adaptive_count: ClassVar[bool] = True  # only with within="pool" (a pooled grid may hold fewer)

    within: str = dataclasses.field(
        default="bilinear",
        metadata={"help": "How a frame is reduced to its count: 'bilinear' (official v1) or the name of a "
                  "single-grid encoder method ('pool' ~ v2's adaptive pooling, 'cls_attn', 'random', ...)."},
    )
    assign: str = dataclasses.field(
        default="relevance",
        metadata={"help": "'relevance' (QuoTA: frames scored, counts by weight) or 'uniform' (an even split, no "
                  "scoring: the baseline of the same within-frame reduction).", "choices": ("relevance", "uniform")},
    )
    decouple: bool = dataclasses.field(
        default=True, metadata={"help": "Run the chain-of-thought query decoupling (part i); False scores frames "
                                "against the raw question."})
    weight_scale: float = dataclasses.field(default=100.0, metadata={"help": "w = (scale·p)^power (official 100).", "above": 0})
    weight_power: float = dataclasses.field(default=2.0, metadata={"help": "w = (scale·p)^power (official 2).", "above": 0})
    score_batch: int = dataclasses.field(default=64, metadata={"help": "Frames per scoring pass (official 64).", "range": (1, None)})
    decouple_tokens: int = dataclasses.field(default=48, metadata={"help": "Max new tokens of the decoupling answer.", "range": (1, None)})
    tokenizer: str | None = dataclasses.field(
        default=None, metadata={"help": "Directory of the model's tokenizer (builds the scoring prompts); default: "
                                "the directory the model was loaded from."})
    scorer: str | None = dataclasses.field(
        default=None, metadata={"help": "Directory of another supported VLM that scores each frame as an image "
                                "(the reference uses Qwen2-VL-2B), or the name of an embedded model such as "
                                "'tiny-llava'; default: the model itself, uncompressed, each frame as a one-frame video."})
    entity_template: str = dataclasses.field(default=ENTITY_TEMPLATE, metadata={"help": "Frame prompt with entities."})
    question_template: str = dataclasses.field(default=QUESTION_TEMPLATE, metadata={"help": "Frame prompt without."})
    decouple_template: str = dataclasses.field(default=DECOUPLE_TEMPLATE, metadata={"help": "Decoupling prompt."})
    prompt_format: str = dataclasses.field(
        default=PROMPT_FORMAT, metadata={"help": "Conversation wrapper with {visual} and {text}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.within not in ("bilinear", "pool"):
            inner = get_method(self.within)
            if inner.stage != "encoder" or inner is type(self) or getattr(inner, "requires_anyres", False):
                raise ValueError(f"quota's within must be 'bilinear' or a single-grid encoder method, got {self.within!r}")
        for name, field in (("prompt_format", "{visual}"), ("prompt_format", "{text}"),
                            ("entity_template", "{entities}"), ("question_template", "{question}"),
                            ("decouple_template", "{question}")):
            if field not in getattr(self, name):
                raise ValueError(f"quota's {name} must contain {field}")

    # ---- set-up -------------------------------------------------------------------------------------
    @property
    def _inner(self) -> EncoderPruner | None:
        name = "pool" if self.within == "bilinear" else self.within
        cached = self.__dict__.get("_inner_pruner")
        if cached is None or cached.name != name or cached.budget != self.budget:
            cached = get_method(name).create(budget=self.budget)
            self.__dict__["_inner_pruner"] = cached
        return cached

    def attention_layers(self) -> tuple[int, ...]:
        return self._inner.attention_layers()

    def hidden_state_layers(self) -> tuple[int, ...]:
        return self._inner.hidden_state_layers()

    def needs_all_query_rows(self) -> bool:
        return self._inner.needs_all_query_rows()

    def check(self, adapter) -> None:
        super().check(adapter)
        if not adapter.video:
            raise ValueError(f"'quota' assigns tokens over video frames; {type(adapter.model).__name__} takes no "
                             "videos (use it on LlavaOnevisionForConditionalGeneration)")
        self._inner.check(adapter)
        self.__dict__["_tokenizer"] = model_tokenizer(
            adapter.model, self.tokenizer, "quota builds its scoring prompts with the model's tokenizer",
            "compress(model, 0.1, 'quota', tokenizer=model_dir)")
        if self.scorer is not None:
            self.__dict__["_scorer"] = self._load_scorer(adapter.model)

    def _load_scorer(self, model: torch.nn.Module) -> "_ImageScorer":
        """The scorer VLM and its processor, and how to turn this model's frames back into pixels (its video
        processor's normalisation, read from the model's directory)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..adapters import get_adapter

        path = self.tokenizer or getattr(model.config, "_name_or_path", None)
        scorer_path = self.scorer
        if not Path(scorer_path).is_dir() and (ASSETS_DIR / scorer_path / "config.json").exists():
            scorer_path = ASSETS_DIR / scorer_path
        try:
            own = AutoProcessor.from_pretrained(path).video_processor
            processor = AutoProcessor.from_pretrained(scorer_path)
            scorer = AutoModelForImageTextToText.from_pretrained(scorer_path).eval()
        except (OSError, ValueError, AttributeError) as error:
            raise ValueError(f"quota could not load the scorer {self.scorer!r} with its processor, or this model's "
                             f"video processor from {path!r} ({error}); pass scorer= a local VLM checkpoint "
                             "directory and tokenizer= this model's directory") from None
        get_adapter(scorer)  # a supported model, or a TypeError naming the supported ones
        device = next(model.parameters()).device
        return _ImageScorer(scorer.to(device), processor, own.image_mean, own.image_std,
                            own.rescale_factor if own.do_rescale else 1.0)

    def __deepcopy__(self, memo: dict) -> "QuotaPruner":
        """A copy shares the loaded tokenizer and scorer (read-only), not a deep copy of them."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        copied = type(self)(**fields)
        for key in ("_tokenizer", "_scorer"):
            if key in self.__dict__:
                copied.__dict__[key] = self.__dict__[key]
        return copied

    # ---- parts (i) and (ii) ----------------------------------------------------------------------------
    def query_of(self, prompt_ids: torch.Tensor, video_token_id: int) -> str:
        """The question: the prompt's text after its last video placeholder, less the format's closing text."""
        tokenizer = self.__dict__["_tokenizer"]
        ids = prompt_ids.tolist()
        last = max(i for i, t in enumerate(ids) if t == video_token_id)
        after = ids[last + 1:]
        closing = self.prompt_format.split("{text}", 1)[1].strip()
        closing_ids = tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []
        if closing_ids and after[-len(closing_ids):] == closing_ids:
            after = after[: -len(closing_ids)]
        return tokenizer.decode(after, skip_special_tokens=True).strip()

    def entities_of(self, query: str, ctx: VideoContext) -> list[str] | None:
        """Part (i): the decoupled entity list, or ``None`` (fallback to the raw question)."""
        tokenizer = self.__dict__["_tokenizer"]
        prompt = self.prompt_format.format(visual="", text=self.decouple_template.format(question=query))
        inputs = tokenizer(prompt, return_tensors="pt")
        device = ctx.video.suffix.device
        new = ctx.runner.generate(  # the model itself, uncompressed (the reference runs the main LVLM)
            input_ids=inputs["input_ids"].to(device),
            attention_mask=inputs["attention_mask"].to(device), max_new_tokens=self.decouple_tokens, do_sample=False,
        )
        return parse_entities(tokenizer.decode(new[0], skip_special_tokens=True))

    def frame_scores(self, text: str, ctx: VideoContext, video_token_id: int) -> list[float]:
        """Part (ii): ``P(yes)/(P(yes)+P(no))`` per frame for the frame prompt ``text``: each frame as a one-frame
        video of the model itself, or as an image of the ``scorer``."""
        scorer = self.__dict__.get("_scorer")
        if scorer is not None:
            return scorer.scores(self.prompt_format, text, ctx, self.score_batch)
        tokenizer = self.__dict__["_tokenizer"]
        video_token = tokenizer.convert_ids_to_tokens(video_token_id)
        ids = tokenizer(self.prompt_format.format(visual=video_token, text=text), return_tensors="pt")["input_ids"][0]
        per_frame = ctx.tokens_per_frame + ctx.video.suffix.shape[0]  # one frame's placeholders
        at = (ids == video_token_id).nonzero().squeeze(1)
        if at.numel() != 1:
            raise ValueError(f"quota's prompt_format must hold one {{visual}} placeholder, got {at.numel()}")
        ids = torch.cat([ids[: at[0]], ids.new_full((per_frame,), video_token_id), ids[at[0] + 1:]])
        yes, no = _answer_ids(tokenizer, "yes"), _answer_ids(tokenizer, "no")
        frames, device = ctx.num_frames, ctx.video.pixel_values.device
        scores = []
        for start in range(0, frames, self.score_batch):
            stop = min(start + self.score_batch, frames)
            batch = ids[None].expand(stop - start, -1).to(device)
            logits = ctx.runner.forward(
                input_ids=batch, attention_mask=torch.ones_like(batch),
                **ctx.video.one_frame_videos(start, stop, batch), logits_to_keep=1,
            ).logits[:, -1]
            scores += yes_probability(logits, yes, no)
        return scores

    # ---- part (iii) ------------------------------------------------------------------------------------
    def frame_counts(self, ctx: VideoContext) -> list[int]:
        if self.assign == "uniform" or ctx.total >= ctx.num_frames * ctx.tokens_per_frame:
            return ctx.even_counts()  # the baseline, or every token kept: nothing to assign, no scoring passes
        video_token_id = ctx.runner.model.config.video_token_id
        query = self.query_of(ctx.prompt_ids, video_token_id)
        entities = self.entities_of(query, ctx) if self.decouple else None
        if entities:
            text = self.entity_template.format(entities=", ".join(entities))
        else:
            text = self.question_template.format(question=query)
        scores = self.frame_scores(text, ctx, video_token_id)
        ctx.frame_scores = scores
        return assign_counts(scores, ctx.total, ctx.tokens_per_frame, self.weight_scale, self.weight_power)

    def output_count(self, keep: int, layout) -> int:
        if self.within == "bilinear" and not layout.is_anyres:
            return keep
        return self._inner.output_count(keep, layout)

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        layout = ctx.layout
        if self.within != "bilinear" or layout.is_anyres or layout.num_tokens != layout.grids[0][0] * layout.grids[0][1]:
            return self._inner.select(ctx)
        tokens, source, merged_into = bilinear_tokens(ctx.features, layout.grids[0], ctx.uniform_keep())
        count = tokens.shape[0]
        return EncoderSelection(features=list(tokens.unbind(0)), kept_index=[source] * count,
                                merged_into=[merged_into] * count)


def yes_probability(logits: torch.Tensor, yes: list[int], no: list[int]) -> list[float]:
    """``[B, V]`` next-token logits → ``P(yes) / (P(yes) + P(no))`` per row (each answer's token ids pooled)."""
    logits = logits.float()
    both = torch.stack([logits[:, yes].logsumexp(-1), logits[:, no].logsumexp(-1)], -1)
    return both.softmax(-1)[:, 0].tolist()


@dataclasses.dataclass
class _ImageScorer:
    """Another VLM scoring frames as images (the reference uses Qwen2-VL-2B): this model's frames are
    un-normalised back to pixels (``(x·std + mean) / rescale``) and given to the scorer's own processor."""

    model: torch.nn.Module
    processor: Any
    mean: Sequence[float]
    std: Sequence[float]
    rescale: float

    def frames(self, pixel_values: torch.Tensor) -> list[Any]:
        from PIL import Image

        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        pixels = ((pixel_values.float().cpu() * std + mean) / self.rescale).round().clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in pixels]

    def scores(self, prompt_format: str, text: str, ctx: VideoContext, batch_size: int) -> list[float]:
        tokenizer = self.processor.tokenizer
        prompt = prompt_format.format(visual=self.processor.image_token, text=text)
        yes, no = _answer_ids(tokenizer, "yes"), _answer_ids(tokenizer, "no")
        images = self.frames(ctx.video.pixel_values)
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            inputs = self.processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
            logits = ctx.runner.forward(model=self.model, **inputs.to(device), logits_to_keep=1).logits[:, -1]
            scores += yes_probability(logits, yes, no)
        return scores


def _answer_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids that start the answer ``word`` (with and without a leading space, lower and capitalised)."""
    ids = set()
    for form in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        encoded = tokenizer(form, add_special_tokens=False)["input_ids"]
        if encoded and encoded[0] != tokenizer.unk_token_id:
            ids.add(encoded[0])
    if not ids:
        raise ValueError(f"the tokenizer has no token for the answer {word!r}; quota's scoring prompt needs it")
    return sorted(ids)

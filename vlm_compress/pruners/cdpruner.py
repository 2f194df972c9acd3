"""``cdpruner``: instruction-conditioned diversity: greedy MAP of a DPP over the projected visual tokens.

CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967; reference ``sota-methods.md`` §1). Official code:
``Theia-4869/CDPruner`` @9541616 (algorithm f972b88/58190f6), ``llava/model/llava_arch.py::encode_images`` and
``llava/model/multimodal_encoder/clip_encoder.py::load_text_tower, forward``.

For one image with projected tokens ``F`` [N, D] (mm_projector output) and relevance ``rel`` [N]::

    S    = cos(F, F)                                    # float32
    L    = rel_i · S_ij · rel_j
    keep = sort(greedy MAP of the DPP with kernel L, exactly k steps)      # Fast-MAP-DPP, Chen et al. 2018

The greedy step takes ``argmax`` of the residual gains (ties to the lowest index), as :func:`dpp_greedy`. The
relevance is the mean over the text's vectors ``t_m`` of ``±cos(e_i, t_m)``, min-max normalised over the image's
tokens as the official ``(rel − min + 1e-6) / (max − min)`` (:func:`relevance_from_cosines`). Two text sources:

* **default** (every model): the model's own LLM input embeddings of the prompt text after the image
  (``ctx.instruction_ids``; for LLaVA templates the question and ``ASSISTANT:``) against the projected tokens
  ``e_i = F_i``. This is a deliberate difference: the official code needs a CLIP text tower (below). Sign: the
  official ``−cos`` here too (``negate=True``). The maintainer calls the inversion "an interesting phenomenon …
  only observed in CLIP" (issue #14) and users report that it keeps the least relevant tokens (issues #19, #22),
  so ``+cos`` (``negate=False``) was a candidate default in the LLM space; on the embedded tiny-llava the official
  sign wins by far (0.695 against 0.328 at budget 0.11, 0.792 against 0.477 at 0.5;
  ``eval/results/frontier_tiny-llava.md``). A prompt with no text after the image gets uniform relevance (pure
  DPP diversity over ``S``).
* ``text_encoder=PATH`` (the official relevance): a local CLIP checkpoint, either a Hugging Face ``CLIPModel``
  folder (``config.json`` + weights + tokenizer files, e.g. a snapshot of ``openai/clip-vit-large-patch14-336``,
  LLaVA-1.5's tower) or an open_clip folder (``open_clip_config.json`` with ``model_cfg`` + ``open_clip_model.safetensors``,
  loaded as ``open_clip.create_model("local-dir:PATH")``; ViT towers with ``ln_post`` and ``proj``). Image side:
  ``e_i = visual_projection(post_layernorm(V_i))`` with ``V = ctx.images.vision_features`` (the tower's feature
  layer, −2, no CLS), using the checkpoint's own ``post_layernorm`` (the official code uses the LLaVA tower's; for
  LLaVA-1.5 the tower is frozen CLIP so they are equal; for LLaVA-NeXT's fine-tuned tower they differ slightly).
  Text side: the **question string**, decoded from ``ctx.instruction_ids`` with the LLM's tokenizer (``tokenizer``,
  default: the directory the model was loaded from), cut at the first ``question_end`` marker (``ASSISTANT:``,
  ``[/INST]``, ...) and with the answer-format phrases the official eval scripts strip (``drop_phrases``) removed;
  then the CLIP tokenizer with no truncation, zero-padded to a multiple of 77 (the text tower's
  ``max_position_embeddings``), one projected pooled embedding per 77-token segment (``text_embeds``; open_clip:
  the same with its ``SimpleTokenizer``, other open_clip tokenizers truncate to the context length). Sign: the
  official ``−cos``. The tower is loaded once per pruner instance (at
  ``compress``) and shared by copies. An empty question gets uniform relevance.

Budget: ``k = ctx.uniform_keep()`` tokens per image (an int budget of 64 is the paper's "64"; ``budget="auto"`` is
refused: a DPP has no per-token score to count by). LLaVA-NeXT (AnyRes): the official code keeps ``T`` per
sub-image (thumbnail and each crop, before packing) and disables unpadding and newlines; HF packs the unpadded grid
with ``image_newline`` tokens, which we cannot change, so the image's ``k`` is split over its parts (thumbnail, each
crop) in proportion to each part's token count (:func:`vlm_compress.budget.apportion`, capped at its size; the
official equal split where no crop lost rows or columns to unpadding), a DPP runs within each part, newline tokens
are never chosen, and the relevance min-max is global over the image's tokens (as officially over all its
sub-images). The kept tokens stay in packed order. Qwen2-VL/Qwen2.5-VL and OneVision frames: one DPP per image or frame (the
official repository has no such variant).

Other differences from the official code, each deliberate:

* Numerical guard: when the best residual gain falls to ``≤ 1e-6 · max_i L_ii`` (more picks than the kernel's
  numerical rank: duplicate or blank tokens), the remaining picks are the unchosen tokens by descending relevance
  (``L_ii``, ties to the lowest index). The official code takes ``sqrt`` of a value ``≤ 0`` there and its later
  picks are NaN garbage; for LLaVA-1.5 (N = 576, D = 4096) this never triggers in practice.
* Cosines use ``F.normalize`` (zero vectors: cosine 0; official: a division by a zero norm gives NaN); the CLIP
  embeddings are computed in float32 (official: ``post_layernorm`` in the tower dtype, then float32).
* Constant relevance (``max = min``) is uniform relevance (official: a division by zero).
* Each image is selected on its own with its own instruction (official: one prompt per call, batch size 1); at
  ``k ≥ N`` everything is kept in order (identity), and with ``k`` above the image's content tokens the newlines
  fill the rest in order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..budget import apportion
from ..registry import register_method
from .base import EncoderContext, EncoderPruner, EncoderSelection, model_tokenizer

RESIDUAL_FLOOR = 1e-6  # relative to max_i L_ii: below it the kernel is exhausted (see the module docstring)
QUESTION_END = ("ASSISTANT:", "[/INST]", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# what the official eval scripts strip from the question before it reaches the CLIP text tower (model_vqa_*.py)
DROP_PHRASES = ("Answer the question using a single word or phrase.",
                "Answer with the option's letter from the given choices directly.")


def dpp_greedy(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]`` indices in the order the greedy MAP of a DPP with ``kernel`` [N, N] (PSD) picks them (Fast-MAP-DPP,
    Chen et al. 2018: incremental Cholesky rows ``C``, residual gains ``d``; ``k`` capped at ``N``).

    Step: ``j = argmax d`` (ties: lowest index); ``e = (L[j] − C[:i, j]ᵀ C[:i]) / sqrt(d[j])``; ``d −= e²``. Once
    ``d[j] ≤ RESIDUAL_FLOOR · max(diag L)`` the rest are the unchosen tokens by descending ``diag L`` (module
    docstring: the numerical guard)."""
    kernel = kernel.detach().float()
    n = kernel.shape[0]
    k = min(int(k), n)
    order = torch.empty(k, dtype=torch.long, device=kernel.device)
    if k == 0:
        return order
    diag = kernel.diagonal().clone()
    gains = diag.clone()
    rows = kernel.new_zeros(k, n)
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    floor = RESIDUAL_FLOOR * diag.max().clamp_min(0)
    # no host sync in the loop: once the best gain is at the floor (or NaN), every later step takes the unchosen
    # token with the largest diag L instead (gains only shrink, so the fallback never ends), with no update
    for i in range(k):
        j = torch.argmax(gains)
        best = gains[j]
        greedy = best > floor
        j = torch.where(greedy, j, torch.argmax(diag.masked_fill(chosen, float("-inf"))))
        order[i] = j
        chosen[j] = True
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / best.clamp_min(floor).clamp_min(1e-30).sqrt()
        e = torch.where(greedy, e, torch.zeros_like(e))
        rows[i] = e
        gains = torch.where(greedy, gains - e * e, gains).masked_fill(chosen, float("-inf"))
    return order


def relevance_from_cosines(cosines: torch.Tensor, negate: bool) -> torch.Tensor:
    """``[N, M]`` cosines of each token with each text vector → ``[N]`` float32 relevance: the mean over ``M`` of
    ``−cos`` (``negate``, the official sign) or ``+cos``, then ``(r − min + 1e-6) / (max − min)``; ones when the
    range is 0 or there is no text (``M = 0``)."""
    n = cosines.shape[0]
    if cosines.shape[-1] == 0 or n == 0:
        return cosines.new_ones(n, dtype=torch.float32)
    score = cosines.detach().float().mean(dim=-1)
    score = -score if negate else score
    low, high = score.min(), score.max()
    if not float(high - low) > 0:
        return torch.ones_like(score)
    return (score - low + 1e-6) / (high - low)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def dpp_select(features: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """``[k]`` indices (selection order) of ``features`` [n, D] under the kernel ``rel_i · cos_ij · rel_j``."""
    x = unit(features)
    r = relevance.float()
    return dpp_greedy(r[:, None] * (x @ x.T) * r[None, :], k)


@register_method("cdpruner")
@dataclasses.dataclass
class CDPrunerPruner(EncoderPruner):
    text_encoder: str | None = dataclasses.field(
        default=None,
        metadata={"help": "Local CLIP checkpoint for the official relevance: a Hugging Face CLIPModel folder (e.g. "
                  "openai/clip-vit-large-patch14-336, LLaVA-1.5's tower) or an open_clip folder "
                  "(open_clip_config.json + weights). None: the LLM's own input embeddings of the instruction."},
    )
    tokenizer: str | None = dataclasses.field(
        default=None,
        metadata={"help": "With text_encoder: directory of the LLM's tokenizer, to decode the question from the "
                  "prompt ids; default: the directory the model was loaded from."},
    )
    negate: bool = dataclasses.field(
        default=True,
        metadata={"help": "Relevance sign: True = the official -cos (the maintainer, issue #14), False = +cos."},
    )
    question_end: tuple[str, ...] = dataclasses.field(
        default=QUESTION_END,
        metadata={"help": "With text_encoder: the decoded question ends at the first of these chat-template markers."},
    )
    drop_phrases: tuple[str, ...] = dataclasses.field(
        default=DROP_PHRASES,
        metadata={"help": "With text_encoder: phrases removed from the question (the answer-format lines the "
                  "official eval scripts strip)."},
    )

    @property
    def sign(self) -> bool:
        """Whether the relevance uses ``−cos``."""
        return self.negate

    # ---- set-up (text_encoder only) --------------------------------------------------------------------------
    def check(self, adapter) -> None:
        super().check(adapter)
        if self.text_encoder is None:
            return
        tower = self.text_tower()
        width = adapter.vision_feature_size
        if tower.vision_width != width:
            raise ValueError(self._width_error(tower.vision_width, width))
        self.__dict__["_llm_tokenizer"] = self._load_llm_tokenizer(adapter.model)

    def _width_error(self, clip: int, model: int) -> str:
        return (f"cdpruner's text_encoder {self.text_encoder!r} is a CLIP whose vision tower is {clip} wide, but this "
                f"model's vision features are {model} wide: pass the CLIP checkpoint of this model's own vision tower "
                "(LLaVA-1.5: openai/clip-vit-large-patch14-336), or text_encoder=None for the LLM-embedding relevance")

    def text_tower(self) -> _ClipRelevance:
        """The CLIP of ``text_encoder``, loaded once per instance."""
        cached = self.__dict__.get("_text_tower")
        if cached is None or cached[0] != self.text_encoder:
            cached = (self.text_encoder, _load_clip(self.text_encoder))
            self.__dict__["_text_tower"] = cached
        return cached[1]

    def _load_llm_tokenizer(self, model: torch.nn.Module | None) -> Any:
        return model_tokenizer(model, self.tokenizer,
                               "cdpruner with text_encoder decodes the question with the model's tokenizer",
                               "compress(model, 64, 'cdpruner', text_encoder=clip_dir, tokenizer=model_dir)")

    def llm_tokenizer(self) -> Any:
        cached = self.__dict__.get("_llm_tokenizer")
        if cached is None:
            cached = self._load_llm_tokenizer(None)
            self.__dict__["_llm_tokenizer"] = cached
        return cached

    def __deepcopy__(self, memo: dict) -> CDPrunerPruner:
        """A copy shares the loaded CLIP and tokenizer (read-only), not a deep copy of them."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        copied = type(self)(**fields)
        for key in ("_text_tower", "_llm_tokenizer"):
            if key in self.__dict__:
                copied.__dict__[key] = self.__dict__[key]
        return copied

    def question(self, ids: torch.Tensor) -> str:
        """The question string of instruction ``ids`` [T] (text_encoder only): decoded with the LLM's tokenizer, cut
        at the first ``question_end`` marker, ``drop_phrases`` removed, stripped."""
        text = self.llm_tokenizer().decode(ids.tolist(), skip_special_tokens=True)
        ends = [i for i in (text.find(m) for m in self.question_end if m) if i >= 0]
        if ends:
            text = text[: min(ends)]
        for phrase in self.drop_phrases:
            if phrase:
                text = text.replace(phrase, "")
        return text.strip()

    # ---- relevance -------------------------------------------------------------------------------------------
    def relevance(self, ctx: EncoderContext, content: torch.Tensor) -> list[torch.Tensor]:
        """Per image, ``[n]`` float32 relevance of its ``content`` tokens (``[n]`` indices, newlines excluded)."""
        features = ctx.features[:, content]
        ids = ctx.instruction_ids or [None] * features.shape[0]
        if self.text_encoder is None:
            out = []
            for x, instruction in zip(features, ids):
                if instruction is None or instruction.numel() == 0 or ctx.embed_tokens is None:
                    out.append(torch.ones(x.shape[0], device=x.device))
                    continue
                text = ctx.embed_tokens(instruction).to(x.device)
                out.append(relevance_from_cosines(unit(x) @ unit(text).T, self.sign))
            return out
        tower = self.text_tower()
        vision = ctx.images.vision_features[:, content]
        if vision.shape[-1] != tower.vision_width:
            raise ValueError(self._width_error(tower.vision_width, vision.shape[-1]))
        texts: dict[str, torch.Tensor] = {}
        out = []
        for v, instruction in zip(vision, ids):
            question = self.question(instruction) if instruction is not None else ""
            if not question:
                out.append(torch.ones(v.shape[0], device=v.device))
                continue
            if question not in texts:
                texts[question] = tower.text_embeds(question, v.device)
            image = tower.image_embeds(v)
            out.append(relevance_from_cosines(unit(image) @ unit(texts[question]).T, self.sign))
        return out

    # ---- selection -------------------------------------------------------------------------------------------
    def select(self, ctx: EncoderContext) -> EncoderSelection:
        """Per image of ``ctx.features`` [I, N, D]: ``k`` tokens by the relevance-weighted DPP → sorted ``[I, k]``."""
        features, keep, n = ctx.features, ctx.uniform_keep(), ctx.num_tokens
        device = features.device
        layout = ctx.layout
        if keep >= n:
            return EncoderSelection.from_indices(features, torch.arange(n, device=device).expand(features.shape[0], n))
        content = (~layout.newline).nonzero().squeeze(1)
        if keep >= content.numel():  # every content token, then the first newlines
            extra = layout.newline.nonzero().squeeze(1)[: keep - content.numel()]
            index = torch.cat([content, extra]).sort().values.to(device)
            return EncoderSelection.from_indices(features, index.expand(features.shape[0], -1))
        parts = [torch.searchsorted(content, p) for p in layout.sub_images()]  # positions into `content`
        counts = apportion(keep, [p.numel() for p in parts], [p.numel() for p in parts]) if len(parts) > 1 else [keep]
        content_dev = content.to(device)
        chosen = []
        with torch.no_grad():  # indices only; the kept features are gathered with their autograd history
            relevance = self.relevance(ctx, content_dev)
            for x, rel in zip(features[:, content_dev], relevance):
                picks = []
                for part, count in zip(parts, counts):
                    if count > 0:
                        part = part.to(device)
                        picks.append(part[dpp_select(x[part], rel[part], count)])
                chosen.append(content_dev[torch.cat(picks)].sort().values)
        return EncoderSelection.from_indices(features, torch.stack(chosen))


# ---- CLIP text towers ----------------------------------------------------------------------------------------
class _ClipRelevance:
    """A CLIP's two relevance embeddings: ``image_embeds(V [n, Dv]) → [n, C]`` and ``text_embeds(text) → [M, C]``
    (one per segment of ``segment`` tokens); ``vision_width`` is ``Dv``; ``model`` the loaded CLIP module."""

    vision_width: int
    model: torch.nn.Module

    def _on(self, device: torch.device) -> Any:
        """The CLIP, moved to ``device`` the first time it is needed there."""
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model

    def image_embeds(self, vision: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_embeds(self, text: str, device: torch.device) -> torch.Tensor:
        raise NotImplementedError


def _segments(ids: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ``ids`` zero-padded to a multiple of ``length`` → ``(ids, mask)`` ``[M, length]`` (official)."""
    count = (len(ids) - 1) // length + 1
    pad = count * length - len(ids)
    tensor = torch.tensor(ids + [0] * pad, dtype=torch.long).view(count, length)
    mask = torch.tensor([1] * len(ids) + [0] * pad, dtype=torch.long).view(count, length)
    return tensor, mask


class _HFClip(_ClipRelevance):
    def __init__(self, path: str):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.vision_width = self.model.config.vision_config.hidden_size
        self.segment = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeds(self, vision: torch.Tensor) -> torch.Tensor:
        model = self._on(vision.device)
        return model.visual_projection(model.vision_model.post_layernorm(vision.float()))

    @torch.no_grad()
    def text_embeds(self, text: str, device: torch.device) -> torch.Tensor:
        model = self._on(device)
        ids = self.tokenizer(text, truncation=False, verbose=False)["input_ids"]
        ids, mask = _segments(list(ids), self.segment)
        pooled = model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output
        return model.text_projection(pooled)


class _OpenClip(_ClipRelevance):
    def __init__(self, path: str):
        import open_clip

        self.model = open_clip.create_model(f"local-dir:{path}").float().eval()
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        visual = self.model.visual
        if getattr(visual, "proj", None) is None or getattr(visual, "attn_pool", None) is not None \
                or not hasattr(visual, "ln_post"):
            raise ValueError(f"cdpruner's open_clip text_encoder {path!r} needs a ViT tower with ln_post and proj "
                             "(OpenAI-style CLIP); this one has none (or attentional pooling)")
        self.vision_width = visual.ln_post.normalized_shape[0]
        self.segment = self.model.context_length

    @torch.no_grad()
    def image_embeds(self, vision: torch.Tensor) -> torch.Tensor:
        visual = self._on(vision.device).visual
        return visual.ln_post(vision.float()) @ visual.proj

    @torch.no_grad()
    def text_embeds(self, text: str, device: torch.device) -> torch.Tensor:
        model = self._on(device)
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # SimpleTokenizer: no truncation, as officially
            ids, _ = _segments([tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id], self.segment)
        else:  # other open_clip tokenizers truncate to the context length
            ids = tok([text])
        return model.encode_text(ids.to(device))


def _load_clip(path: str) -> _ClipRelevance:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"cdpruner's text_encoder {path!r} is not a directory; pass a local CLIP checkpoint: a Hugging "
                         "Face CLIPModel folder (config.json + weights + tokenizer, e.g. a snapshot of "
                         "openai/clip-vit-large-patch14-336) or an open_clip folder (open_clip_config.json + "
                         "open_clip_model.safetensors), or text_encoder=None for the LLM-embedding relevance")
    if (folder / "open_clip_config.json").is_file():
        return _OpenClip(str(folder))
    if not (folder / "config.json").is_file():
        raise ValueError(f"cdpruner's text_encoder {path!r} holds neither config.json (a Hugging Face CLIPModel) nor "
                         "open_clip_config.json (open_clip); pass the folder of a CLIP checkpoint")
    try:
        return _HFClip(str(folder))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cdpruner could not load a CLIPModel with its tokenizer from {path!r} ({error}); the folder "
                         "must hold a full CLIP (text_model, text_projection, visual_projection) and its tokenizer") from None


"""Base of encoder-stage methods: what a pruner sees (:class:`EncoderContext`) and returns (:class:`EncoderSelection`).

A pruner is a :class:`MethodConfig` dataclass with one job: from scores and image structure to kept tokens.
Hooks, input rewriting and statistics live in :mod:`vlm_compress.stages.encoder`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, ClassVar

import torch

from .. import kernels
from ..adapters.base import ImageBatch, TokenLayout, VideoBatch
from ..budget import apportion, is_auto, tokens_to_keep
from ..config import MethodConfig
from ..ops import HeadReduce, ScoreKind, gather_tokens
from ..scoring import AttentionCapture


@dataclasses.dataclass
class EncoderContext:
    """Inputs of one selection call over ``I`` images that share a layout of ``N`` visual tokens.

    ``keep[i]`` is the number of tokens image ``i`` must come out with; ``image_index_in_prompt[i]`` its rank
    among the images of its own prompt (batch-invariant, unlike the flat index ``i``). ``requested[i]`` is the
    budget it was given before :meth:`EncoderPruner.output_count` (``keep`` when ``None``).

    ``instruction_ids[i]``: ``[T_i]`` the text of image ``i``'s prompt after the image (or frame's video): the
    valid, non-visual token ids that follow its placeholders (for LLaVA templates the question and ``ASSISTANT:``).
    ``embed_tokens``: the LLM's input embeddings, ``[T] ids → [T, D]`` in the space of ``features``. Both are set
    by the encoder stage (``None`` in hand-built contexts); instruction-conditioned methods (CDPruner) read them.
    """

    images: ImageBatch
    keep: list[int]
    image_index_in_prompt: list[int]
    capture: AttentionCapture
    requested: list[int] | None = None
    instruction_ids: list[torch.Tensor] | None = None
    embed_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def features(self) -> torch.Tensor:
        """``[I, N, D]`` projected visual tokens."""
        return self.images.features

    @property
    def num_tokens(self) -> int:
        return self.images.features.shape[1]

    @property
    def layout(self) -> TokenLayout:
        return self.images.layout

    def cls_attention(self, layer: int, head_reduce: HeadReduce = "mean", kind: ScoreKind = "probs") -> torch.Tensor:
        """``[I, N]`` float32: each visual token's attention from the CLS of the tower image it came from (a crop's
        own CLS under AnyRes) at vision ``layer``; ``-inf`` for tokens the tower did not produce (newlines), so
        score-based methods drop them first."""
        return self._per_token(self.capture.first_row_attention(layer, head_reduce, kind), float("-inf"))

    def keys(self, layer: int) -> torch.Tensor:
        """``[I, N, head_dim]`` head-mean keys of vision ``layer`` per visual token (zeros for newlines)."""
        return self._per_token(self.capture.head_mean_keys(layer), 0.0)

    def attention_statistics(self, layer: int, kind: ScoreKind = "logits") -> tuple[torch.Tensor, torch.Tensor]:
        """``(received, given)`` ``[I, N]`` float32: the head-mean patch-to-patch attention of vision ``layer`` each
        visual token receives (mean over queries) and gives (mean over keys), within its own tower image and
        excluding CLS; ``-inf`` for tokens without one (newlines, CLS). Needs :meth:`EncoderPruner.needs_all_query_rows`."""
        if not self.capture.has_cls:
            return tuple(self._per_token(m, float("-inf")) for m in self.capture.attention_means(layer, kind, skip=0))
        means = self.capture.attention_means(layer, kind)  # [tower images, T - 1]: CLS has none
        cls = torch.full_like(means[0][:, :1], float("-inf"))
        return tuple(self._per_token(torch.cat([cls, m], dim=1), float("-inf")) for m in means)

    def hidden(self, layer: int) -> torch.Tensor:
        """``[I, N, Dv]`` output of vision ``layer`` at each visual token (zeros for newlines)."""
        return self._per_token(self.capture.hidden_states[layer], 0.0)

    def _per_token(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """Tower outputs ``[tower images, T, ...]`` at each visual token's source: ``[I, N, ...]``, ``fill`` where
        the tower produced no token (newlines). Pooled tokens (``images.pooled_from``) get the tower values pooled as
        the model pooled the features (bilinear, ``[I, h·w] → [I, grid]``)."""
        if self.images.pooled_from is not None:
            return self._pooled(values)
        source = self.images.source
        flat = values.flatten(0, 1)
        span = self.images.source_span
        if span > 1:  # merged patches (Qwen2-VL): the mean over the token's group
            group = source.clamp_min(0)[..., None] + torch.arange(span, device=source.device)
            out = flat[group].float().mean(dim=source.dim()).to(flat.dtype)
        else:
            out = flat[source.clamp_min(0)]
        missing = (source < 0).view(*source.shape, *([1] * (out.dim() - source.dim())))
        return out.masked_fill(missing, fill)

    def _pooled(self, values: torch.Tensor) -> torch.Tensor:
        """``[tower images, T, ...]`` → ``[I, N, ...]`` for images whose ``N`` tokens are the tower's ``h×w`` grid
        bilinearly resized to ``grid`` (OneVision's ``apply_pooling``; -inf/NaN-free inputs assumed)."""
        (h, w), grid = self.images.pooled_from, self.images.grid
        tower_image = self.images.source[:, 0] // self.images.tower_length
        grid_values = values[tower_image][:, values.shape[1] - h * w:]  # [I, h·w, ...]: skip a CLS
        extra = grid_values.shape[2:]
        maps = grid_values.reshape(grid_values.shape[0], h, w, -1).permute(0, 3, 1, 2).float()
        pooled = torch.nn.functional.interpolate(maps, size=grid, mode="bilinear")
        return pooled.permute(0, 2, 3, 1).reshape(maps.shape[0], grid[0] * grid[1], *extra).to(values.dtype)

    def tower_cell(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tower image [I, N], (row, col) [I, N, 2])``: where each visual token sits in the tower image it came
        from (a crop, the thumbnail, or the only image), its patch grid being ``images.grid``; -1 for
        newlines and CLS."""
        if self.images.source_span > 1:  # merged tokens: each row is its own tower image, on the merged grid
            cell = self.layout.cell.to(self.images.source.device).expand(self.images.num_images, -1, -1)
            rows = torch.arange(self.images.num_images, device=cell.device)[:, None].expand(-1, cell.shape[1])
            return torch.where(cell[..., 0] >= 0, rows, -1), cell
        per_image = self.images.tower_length
        source = self.images.source
        patch = source % per_image - (per_image - self.images.grid[0] * self.images.grid[1])
        valid = (source >= 0) & (patch >= 0)
        side = self.images.grid[1]
        cell = torch.stack([patch // side, patch % side], -1).masked_fill(~valid.unsqueeze(-1), -1)
        return torch.where(valid, source // per_image, torch.full_like(source, -1)), cell

    def uniform_keep(self) -> int:
        """The common ``keep`` count (images of one call share a layout, hence a count)."""
        if len(set(self.keep)) != 1:
            raise ValueError(f"this pruner needs one token count for all images, got {sorted(set(self.keep))}")
        return self.keep[0]


def model_tokenizer(model: torch.nn.Module | None, path: str | None, needed_for: str, example: str) -> Any:
    """The tokenizer in directory ``path``, else in the directory ``model`` was loaded from; a ``ValueError`` that
    says what it is ``needed_for`` and shows the fix (``example``, a ``compress`` call with ``tokenizer=``)."""
    from transformers import AutoTokenizer

    if model is not None:
        path = path or getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    try:
        if not path:
            raise OSError("the model was not loaded from a directory")
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{needed_for} and could not load one from {path!r} ({error}); pass "
                         f"tokenizer='path/to/dir' (a directory with the tokenizer files), e.g. {example}") from None


class ModelRunner:
    """Runs the model a pruner is attached to (or another one) *uncompressed*, for scoring passes (QuoTA's frame
    relevance and query decoupling), and keeps their cost: passes, wall time, tokens and a FLOPs estimate
    (LLM prefill of every token, :func:`vlm_compress.stats.prompt_costs`, plus the vision tower per frame)."""

    def __init__(self, model: torch.nn.Module, suspend: Callable[[], contextlib.AbstractContextManager]):
        self.model = model
        self._suspend = suspend
        self.passes = 0
        self.seconds = 0.0
        self.tokens = 0
        self.flops = 0.0

    def _count(self, model: torch.nn.Module, inputs: dict[str, Any], generated: int = 0) -> None:
        from ..stats import prompt_costs, vision_flops

        mask = inputs.get("attention_mask")
        lengths = (mask.sum(dim=1) if mask is not None else torch.full((inputs["input_ids"].shape[0],),
                                                                        inputs["input_ids"].shape[1]))
        lengths = (lengths + generated).tolist()
        config = model.config
        self.passes += 1
        self.tokens += sum(lengths)
        self.flops += prompt_costs(lengths, config.text_config, 4)[0]
        vision = config.vision_config
        for key, grid in (("pixel_values_videos", "video_grid_thw"), ("pixel_values", "image_grid_thw")):
            if inputs.get(key) is None:
                continue
            if inputs.get(grid) is not None:  # packed patches (Qwen2-VL): attention within each t-slice of h·w
                for t, h, w in inputs[grid].tolist():
                    self.flops += vision_flops(vision, h * w, t)
            else:
                tower_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
                self.flops += vision_flops(vision, tower_tokens, int(inputs[key].shape[:-3].numel()))

    def forward(self, model: torch.nn.Module | None = None, **inputs: Any) -> Any:
        """``model(**inputs)`` under ``no_grad``; the attached model (default) with its compression suspended."""
        start = time.perf_counter()
        with (self._suspend() if model is None else contextlib.nullcontext()), torch.no_grad():
            out = (model or self.model)(**inputs)
        self.seconds += time.perf_counter() - start
        self._count(model or self.model, inputs)
        return out

    def generate(self, model: torch.nn.Module | None = None, **inputs: Any) -> torch.Tensor:
        """``model.generate(**inputs)`` as :meth:`forward`; returns the new tokens only ``[B, T]``."""
        start = time.perf_counter()
        with (self._suspend() if model is None else contextlib.nullcontext()), torch.no_grad():
            out = (model or self.model).generate(**inputs)
        self.seconds += time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1]:]
        self._count(model or self.model, inputs, generated=new.shape[1])
        return new


@dataclasses.dataclass
class VideoContext:
    """One video whose budget is split over its frames (:meth:`EncoderPruner.frame_counts`).

    video: the frames (``[F, n, D]``), the suffix the model adds (OneVision's newline) and the frames' pixels.
    total: frame tokens to assign (the video's budget less the suffix, which is always kept).
    prompt_ids: ``[L]`` the prompt of the sample holding the video (padding removed, placeholders included).
    runner: runs a model uncompressed for scoring passes (:class:`ModelRunner`).
    frame_scores: what a scoring method found per frame (``[F]``), reported in ``stats.frame_scores``.
    """

    video: VideoBatch
    total: int
    prompt_ids: torch.Tensor
    runner: ModelRunner
    frame_scores: list[float] | None = None

    @property
    def num_frames(self) -> int:
        return self.video.num_frames

    @property
    def tokens_per_frame(self) -> int:
        return self.video.frames.layout.num_tokens

    def even_counts(self) -> list[int]:
        """The uniform assignment: ``total`` split evenly, the remainder to the earliest frames."""
        return apportion(self.total, [1.0] * self.num_frames, [self.tokens_per_frame] * self.num_frames)


@dataclasses.dataclass
class EncoderSelection:
    """Result of a pruner, per image.

    features: ``[k_i, D]`` tokens to feed to the LLM, in the order they will be placed.
    kept_index: ``[k_i]`` index of the source token of each output (the representative for merged tokens).
    merged_into: optional ``[N]`` output slot each source token went into (-1 if dropped), for overlays.
    protected: optional ``[p_i]`` output slots later stages must not drop (MustDrop's key set).
    """

    features: list[torch.Tensor]
    kept_index: list[torch.Tensor]
    merged_into: list[torch.Tensor] | None = None
    protected: list[torch.Tensor] | None = None

    @classmethod
    def from_indices(cls, features: torch.Tensor, index: torch.Tensor) -> "EncoderSelection":
        """Selection by gathering ``features`` [I, N, D] at sorted ``index`` [I, k]."""
        return cls(features=list(gather_tokens(features, index).unbind(0)), kept_index=list(index.unbind(0)))

    @classmethod
    def top_k(cls, features: torch.Tensor, scores: torch.Tensor, k: int) -> "EncoderSelection":
        """The ``k`` highest-scoring rows of ``features`` [I, N, D] by ``scores`` [I, N], in raster order (ties:
        lower index), through the fused top-k + gather kernel dispatch."""
        kept, index, _ = kernels.topk_gather(scores, features, k)
        return cls(features=list(kept.unbind(0)), kept_index=list(index.unbind(0)))


def kept_count(pruner: "EncoderPruner", layout: TokenLayout, requested: int | None = None) -> int:
    """Visual tokens an image laid out as ``layout`` comes out of ``pruner`` with: its budget in tokens
    (:func:`~vlm_compress.budget.tokens_to_keep`, or ``requested`` when a budget was resolved per image, as
    ``budget="auto"`` does), then the method's :meth:`EncoderPruner.output_count`. The one count function of the
    toolkit: the HF encoder stage checks every selection against it and the vLLM plugin sizes its placeholders with
    it (:mod:`vlm_compress.integrations.vllm`), so both paths agree by construction."""
    if requested is None:
        if is_auto(pruner.budget):
            raise ValueError(f"budget={pruner.budget!r} gives each image the count its scores choose, known only after "
                             "encoding; pass a float or int budget where counts must be fixed up front")
        requested = tokens_to_keep(pruner.budget, layout.num_tokens)
    return pruner.output_count(requested, layout)


@dataclasses.dataclass
class EncoderPruner(MethodConfig):
    """Encoder-stage method: choose or merge visual tokens before they enter the LLM."""

    stage: ClassVar[str] = "encoder"
    adaptive_count: ClassVar[bool] = False  # may return fewer tokens than the budget (data-dependent merging)
    # needs thumbnail + crops (LLaVA-NeXT) or native-resolution grids (Qwen2-VL); compress() refuses other models
    requires_anyres: ClassVar[bool] = False

    def check(self, adapter) -> None:
        """Raise a ``ValueError`` if this method cannot run on ``adapter``'s model (called by ``compress``)."""
        if self.requires_anyres and not (adapter.anyres or adapter.native_resolution):
            raise ValueError(
                f"{self.name!r} needs AnyRes images (thumbnail + crops), which {type(adapter.model).__name__} does not "
                f"have; use it on LlavaNextForConditionalGeneration, or pick a single-grid method such as 'cls_attn'"
            )

    def attention_layers(self) -> tuple[int, ...]:
        """Vision-tower layers whose queries/keys :meth:`select` reads (empty: no hooks)."""
        return ()

    def hidden_state_layers(self) -> tuple[int, ...]:
        """Vision-tower layers whose output hidden states :meth:`select` reads (:meth:`EncoderContext.hidden`)."""
        return ()

    def needs_all_query_rows(self) -> bool:
        """Whether :meth:`select` reads attention rows other than CLS (full maps cost memory; say so only then)."""
        return False

    def output_count(self, keep: int, layout: TokenLayout) -> int:
        """Tokens this method outputs for a budget of ``keep`` tokens of an image laid out as ``layout`` (a pooling
        grid may give fewer). A pure function of its arguments: serving engines fix placeholder counts from it
        before the image is encoded (:func:`kept_count`)."""
        return keep

    def exact_count(self) -> bool:
        """Whether :meth:`select` returns exactly :meth:`output_count` tokens for every image (``False`` for
        data-dependent merging, :attr:`adaptive_count`); engines that fix counts up front (vLLM) need ``True``."""
        return not self.adaptive_count

    def frame_counts(self, ctx: VideoContext) -> list[int]:
        """Tokens each frame of a video gets, summing to ``ctx.total`` (each at most the frame's count); frames
        given 0 are dropped with their placeholders. Default: an even split; QuoTA assigns by frame relevance."""
        return ctx.even_counts()

    def token_scores(self, ctx: EncoderContext) -> torch.Tensor | None:
        """``[I, N]`` the scores this method ranks tokens by (``-inf`` for tokens it never picks, such as newlines),
        from which ``budget="auto"`` chooses each image's count (:func:`vlm_compress.budget.auto_count`).
        ``None`` (the default): not a score-based method, so ``compress`` refuses ``"auto"``."""
        return None

    @classmethod
    def supports_auto(cls) -> bool:
        """Whether ``budget="auto"`` works with this method (it overrides :meth:`token_scores`)."""
        return cls.token_scores is not EncoderPruner.token_scores

    def select(self, ctx: EncoderContext) -> EncoderSelection:
        raise NotImplementedError

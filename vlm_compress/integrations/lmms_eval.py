"""lmms-eval model plugin: a local Hugging Face LLaVA / LLaVA-NeXT, compressed by vlm-compress, under lmms-eval's own tasks.

Tasks with ``output_type: generate_until`` only; ``loglikelihood`` raises (lmms-eval 0.7.3 cannot score it).

    pip install -e ".[lmms]"     # registers ``vlm_compress_llava`` through the ``lmms_eval.models`` entry point
    lmms-eval --model vlm_compress_llava --tasks TASK --batch_size 4 \\
        --model_args pretrained=/models/llava-1.5-7b-hf,method=cls_attn,budget=0.2

``model_args`` (keyword arguments of :class:`VLMCompressLlava`): ``pretrained``, a LOCAL checkpoint directory
(nothing is downloaded); ``method``, a registered method (default ``cls_attn``; ``none`` evaluates the
uncompressed model); ``budget``, a share of visual tokens (``0.2``) or tokens per image (``64``: a value without
``.`` is an int); ``device``; ``dtype`` (``auto``, ``float16``, ``bfloat16``, ``float32``); ``batch_size``;
``max_new_tokens`` (used when the task sets none); ``prompt`` (``auto``, ``llava`` or ``chat``). Any other key
is a method option for :func:`vlm_compress.compress` (``method=visionzip,budget=64,layer=-3``). With the CLI,
give the batch size as ``--batch_size`` (the CLI always passes one; a different ``batch_size=`` in ``model_args``
is refused with a message).

Prompts: ``USER: <image>\\n{context} ASSISTANT:`` (LLaVA-1.5) with ``prompt=llava``, or the processor's chat
template with ``prompt=chat``; ``auto`` picks ``chat`` when the processor has a template. A context that already
contains ``<image>`` keeps its placeholders; otherwise one ``<image>`` per image is put before it. Generation is
greedy unless the task sets ``temperature > 0``; the text is cut at the first ``until`` string and stripped.

Cost, per request (:class:`RequestStats`): prefill wall-clock (``generate`` entry to the end of the first forward:
vision tower, selection and LLM prefill) of the request's batch, and that time divided by the batch's requests;
visual tokens in, entering the LLM, and per LLM layer (layer-averaged: in-LLM methods such as ``fastv`` drop tokens
inside the LLM, so fewer than enter it); prompt tokens entering the LLM; modelled prefill FLOPs and KV-cache bytes
(:mod:`vlm_compress.stats`, each layer with its own token count; KV after any decode-stage eviction). lmms-eval
0.7.3 takes them in two places, both in ``simple_evaluate``'s result:

- each sample's ``token_counts`` (``input_tokens``: prompt tokens entering the LLM, after compression;
  ``output_tokens``: generated tokens), summed in ``results["efficiency"]``;
- its throughput log (:func:`lmms_eval.models.model_utils.gen_metrics.log_metrics`, once per ``generate_until``),
  summarised as ``results["throughput"]["avg_<name>"]``: ``avg_prefill_ms`` (per request),
  ``avg_visual_tokens_in_per_image``, ``avg_visual_tokens_kept_per_image``,
  ``avg_layer_avg_visual_tokens_per_image``, ``avg_prompt_tokens_llm``, ``avg_prefill_gflops``, ``avg_kv_cache_mb``
  (means per request, or per image).

The records themselves stay on the model object as ``request_stats``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image

from ..api import compress
from ..registry import get_method
from ..stats import kv_cache_bytes, prefill_flops

if TYPE_CHECKING:
    # Not at import time: importing ``lmms_eval.models`` loads the entry points, which import this module; a
    # top-level import would hand lmms-eval a half-initialised module (no ``manifest``) when this one comes first.
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "vlm_compress_llava"
IMAGE_TOKEN = "<image>"
LLAVA_PROMPT = "USER: {images}{context} ASSISTANT:"
PROMPT_MODES = ("auto", "llava", "chat")
_HANDLED_GEN_KWARGS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams"}


def manifest() -> ModelManifest:
    """Payload of the ``lmms_eval.models`` entry point: ``vlm_compress_llava`` → :class:`VLMCompressLlava`.

    lmms-eval 0.7.3 resolves entry-point models through its registry, but its ``lmms-eval models`` listing reads only
    its own table of simple models; the model is added to that table too, as lmms-eval's own (legacy) plugin loader
    does, so the listing shows it.
    """
    import sys

    from lmms_eval.models.registry_v2 import ModelManifest

    class_path = f"{__name__}.VLMCompressLlava"
    listing = getattr(sys.modules.get("lmms_eval.models"), "AVAILABLE_SIMPLE_MODELS", None)
    if isinstance(listing, dict):
        listing.setdefault(MODEL_ID, class_path)
    return ModelManifest(model_id=MODEL_ID, simple_class_path=class_path)


def parse_budget(value: float | int | str) -> float | int:
    """``"64"`` → 64 (tokens per image), ``"0.2"`` → 0.2 (share); numbers pass through (lmms-eval parses first)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text) if "." in text else int(text)
        except ValueError:
            raise ValueError(f"budget={value!r}: pass a share such as 0.2 or a token count such as 64") from None
    return value


@dataclasses.dataclass
class RequestStats:
    """Cost of one lmms-eval request. ``batch_prefill_ms`` and ``batch_size`` are those of the batch it ran in;
    ``prefill_ms`` is the request's share of it (the batch's time over its requests)."""

    task: str
    doc_id: int
    batch_size: int
    batch_prefill_ms: float  # wall-clock from generate() entry to the end of the first forward (tower, selection, prefill)
    prefill_ms: float  # batch_prefill_ms / batch_size
    images: int
    visual_tokens_in: int  # image placeholders in the processor's prompt
    visual_tokens_kept: int  # entering the LLM
    layer_avg_visual_tokens: float  # visual tokens per LLM layer, averaged over layers (in-LLM methods drop inside)
    prompt_tokens_llm: int  # non-padding prompt tokens entering the LLM
    output_tokens: int  # generated, up to and including EOS
    prefill_flops: float  # LLM prefill of this request alone, with each layer's own token count (vlm_compress.stats)
    kv_cache_bytes: int  # the prompt's KV cache, each layer's own length (after any decode-stage eviction)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def _first_forward_end(model: torch.nn.Module, device: torch.device) -> Iterator[list[float]]:
    """Yield a list that receives the ``perf_counter`` time at which the first forward of ``model`` returned."""
    marks: list[float] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not marks:
            marks.append(_now(device))

    handle = model.register_forward_hook(hook)
    try:
        yield marks
    finally:
        handle.remove()


def _truncate(text: str, until: Sequence[str]) -> str:
    """``text`` cut before the earliest stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def _method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with int fields of ``method``'s config made int again (lmms-eval parses ``-3`` as ``-3.0``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(get_method(method))}

    def fix(name: str, value: Any) -> Any:
        default = defaults.get(name)
        is_int = isinstance(default, int) and not isinstance(default, bool)
        return int(value) if is_int and isinstance(value, float) and value.is_integer() else value

    return {name: fix(name, value) for name, value in options.items()}


class VLMCompressLlava(lmms):
    """A local LLaVA or LLaVA-NeXT checkpoint under lmms-eval, compressed by :func:`vlm_compress.compress`.

    See the module docstring for ``model_args``, the prompt format and the cost metrics.
    """

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VLMCompressLlava":
        """lmms-eval's constructor from ``--model_args`` plus its own options (``--batch_size``, ``--device``): an
        option given both ways is an error naming the fix instead of a duplicate-keyword ``TypeError``."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        both = sorted(k for k in set(args) & set(extra) if str(args[k]) != str(extra[k]))
        if both:
            given = ", ".join(f"{k}={args[k]!r} in --model_args and {extra[k]!r} from lmms-eval's --{k}" for k in both)
            raise ValueError(f"{given}: give it once, as lmms-eval's own --{both[0]} option")
        return cls(**{**args, **extra})

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "cls_attn",
        budget: float | int | str = 0.2,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        prompt: str = "auto",
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; unused (no automatic batch size)
        **method_options: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if pretrained is None or not Path(str(pretrained), "config.json").is_file():
            raise ValueError(
                f"pretrained={pretrained!r} is not a local checkpoint directory (no config.json); "
                "vlm_compress_llava loads local paths only: model_args=pretrained=/path/to/llava,..."
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError("vlm_compress_llava runs in one process; launch lmms-eval without data parallelism")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size={batch_size!r}: pass an int (no 'auto' batch size)") from None
        if prompt not in PROMPT_MODES:
            raise ValueError(f"prompt={prompt!r}: choose one of {', '.join(PROMPT_MODES)}")

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, str(dtype))
        self._model = AutoModelForImageTextToText.from_pretrained(
            str(pretrained), dtype=torch_dtype, local_files_only=True
        ).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(str(pretrained), local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.tokenizer = self.processor.tokenizer
        self.chat_template = getattr(self.processor, "chat_template", None)
        if prompt == "chat" and not self.chat_template:
            raise ValueError(f"prompt=chat but the processor at {pretrained} has no chat template")
        self.prompt = prompt if prompt != "auto" else ("chat" if self.chat_template else "llava")

        self.pretrained = str(pretrained)
        self.method = None if str(method).lower() == "none" else str(method)
        self.budget = parse_budget(budget) if self.method else None
        if self.method:
            compress(self._model, budget=self.budget, method=self.method, **_method_options(self.method, method_options))
        elif method_options:
            raise ValueError(f"method options {sorted(method_options)} need a method (got method=none)")
        self.max_new_tokens = int(max_new_tokens)
        config = self._model.config
        self._image_token_id = int(getattr(config, "image_token_id", None) or config.image_token_index)
        eos = self._model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._warned: set[str] = set()
        self.request_stats: list[RequestStats] = []

    # ---- what lmms-eval reads -------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ---- prompts and inputs ---------------------------------------------------------------------------
    def build_prompt(self, context: str, images: int) -> str:
        """The model's prompt for one request with ``images`` images (see the module docstring)."""
        if self.prompt == "chat":
            text = context.replace(IMAGE_TOKEN, "").strip()
            content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prefix = "" if IMAGE_TOKEN in context else f"{IMAGE_TOKEN}\n" * images
        return LLAVA_PROMPT.format(images=prefix, context=context)

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Image.Image]:
        """The request's images (RGB), from the task's ``doc_to_visual``; videos and audio are refused."""
        if doc_to_visual is None:
            return []
        found = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = [v for item in found for v in (item if isinstance(item, (list, tuple)) else [item])]
        for v in flat:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(f"task {task!r} gives a {type(v).__name__} visual; only images are supported")
        return [v.convert("RGB") for v in flat]

    def _encode(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        inputs = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        return inputs

    # ---- cost accounting ------------------------------------------------------------------------------
    def _reset_compression_stats(self) -> None:
        state = self._model.__dict__.get("compression")
        if state is not None:
            state.stats = None

    def _row_costs(self, inputs: dict[str, torch.Tensor], images_per_row: list[int]) -> list[dict[str, Any]]:
        """Per-row tokens and modelled cost of the last call on ``inputs`` (compressed or not): each LLM layer's own
        token count where an in-LLM method dropped tokens inside the LLM, the prompt length otherwise."""
        state = self._model.__dict__.get("compression")
        stats = state.stats if state is not None else None
        if stats is not None and stats.images != sum(images_per_row):
            raise RuntimeError(f"compression stats cover {stats.images} images, the batch has {sum(images_per_row)}")
        text_config = self._model.config.text_config
        layers = text_config.num_hidden_layers
        element_size = torch.tensor([], dtype=self._model.dtype).element_size()
        visual_in = (inputs["input_ids"] == self._image_token_id).sum(dim=1).tolist()
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        per_layer = state.prefill.last_prompt_counts() if state is not None and state.prefill is not None else None
        rows, offset = [], 0
        for row, (n_images, n_visual, length) in enumerate(zip(images_per_row, visual_in, lengths)):
            kept = sum(stats.kept_per_image[offset : offset + n_images]) if stats is not None else n_visual
            offset += n_images
            n_llm = int(length) - (n_visual - kept)
            processed = cached = [n_llm] * layers
            layer_visual = float(kept)
            if per_layer is not None:
                processed, cached = per_layer.tokens[row], per_layer.cached[row]
                layer_visual = sum(per_layer.visual[row]) / layers
            rows.append(dict(
                images=n_images, visual_tokens_in=int(n_visual), visual_tokens_kept=int(kept),
                layer_avg_visual_tokens=layer_visual, prompt_tokens_llm=n_llm,
                prefill_flops=prefill_flops([processed], text_config),
                kv_cache_bytes=kv_cache_bytes([cached], text_config, element_size),
            ))
        return rows

    def _generated_lengths(self, new_tokens: torch.Tensor) -> list[int]:
        """Tokens generated per row [B, T], up to and including the first EOS."""
        lengths = []
        for row in new_tokens.tolist():
            stop = next((j for j, t in enumerate(row) if t in self._eos_ids), None)
            lengths.append(len(row) if stop is None else stop + 1)
        return lengths

    def _log(self, records: list[RequestStats], seconds: float) -> None:
        """Hand one ``generate_until`` call's costs to lmms-eval's throughput log (``results["throughput"]``)."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        if not records:
            return
        n, images = len(records), sum(r.images for r in records)
        metrics: dict[str, float | int] = {
            "total_requests": n,
            "prefill_ms": sum(r.prefill_ms for r in records) / n,
            "prompt_tokens_llm": sum(r.prompt_tokens_llm for r in records) / n,
            "prefill_gflops": sum(r.prefill_flops for r in records) / n / 1e9,
            "kv_cache_mb": sum(r.kv_cache_bytes for r in records) / n / 2**20,
        }
        if images:
            metrics["visual_tokens_in_per_image"] = sum(r.visual_tokens_in for r in records) / images
            metrics["visual_tokens_kept_per_image"] = sum(r.visual_tokens_kept for r in records) / images
            metrics["layer_avg_visual_tokens_per_image"] = sum(r.layer_avg_visual_tokens for r in records) / images
        tokens = sum(r.output_tokens for r in records)
        log_metrics(
            total_elapsed_time=seconds, total_gen_tokens=tokens,
            avg_speed=tokens / seconds if seconds > 0 else 0.0, additional_metrics=metrics,
        )

    # ---- generation -----------------------------------------------------------------------------------
    def _generation_options(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """``(until, generate kwargs)`` from a task's ``generation_kwargs``: greedy unless temperature > 0."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        options: dict[str, Any] = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            num_beams=int(gen_kwargs.get("num_beams") or 1),
            do_sample=temperature > 0,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if temperature > 0:
            options.update(temperature=temperature, top_p=gen_kwargs.get("top_p"), top_k=gen_kwargs.get("top_k"))
        ignored = sorted(set(gen_kwargs) - _HANDLED_GEN_KWARGS - self._warned)
        if ignored:
            self._warned.update(ignored)
            logger.warning(f"vlm_compress_llava ignores generation_kwargs {ignored}")
        return until, options

    def _batches(self, requests: list[Instance]) -> Iterator[list[int]]:
        """Request indices in batches of equal ``generation_kwargs``, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                yield indices[start : start + self.batch_size]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """One answer per request; ``args = (context, generation_kwargs, doc_to_visual, doc_id, task, split)``."""
        from tqdm import tqdm

        results: list[GenerationResult | None] = [None] * len(requests)
        records: list[RequestStats] = []
        seconds = 0.0
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlm_compress_llava")
        for batch in self._batches(requests):
            args = [requests[i].args for i in batch]
            visuals = [self._visuals(a[2], a[3], a[4], a[5]) for a in args]
            prompts = [self.build_prompt(a[0], len(v)) for a, v in zip(args, visuals)]
            until, options = self._generation_options(dict(args[0][1] or {}))
            inputs = self._encode(prompts, [image for v in visuals for image in v])
            width = inputs["input_ids"].shape[1]
            self._reset_compression_stats()
            with torch.inference_mode(), _first_forward_end(self._model, self._device) as marks:
                start = _now(self._device)
                out = self._model.generate(**inputs, **options)
                end = _now(self._device)
            seconds += end - start
            new_tokens = out[:, width:]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            generated = self._generated_lengths(new_tokens)
            batch_prefill_ms = (marks[0] - start) * 1e3 if marks else float("nan")
            for row, (i, a, cost) in enumerate(zip(batch, args, self._row_costs(inputs, [len(v) for v in visuals]))):
                text = _truncate(texts[row], until).strip()
                record = RequestStats(
                    task=a[4], doc_id=a[3], batch_size=len(batch), batch_prefill_ms=batch_prefill_ms,
                    prefill_ms=batch_prefill_ms / len(batch),
                    output_tokens=generated[row], **cost,
                )
                records.append(record)
                counts = TokenCounts(input_tokens=record.prompt_tokens_llm, output_tokens=record.output_tokens)
                results[i] = GenerationResult(text=text, token_counts=counts)
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), text)
            bar.update(len(batch))
        bar.close()
        self.request_stats += records
        self._log(records, seconds)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Not supported: lmms-eval 0.7.3 cannot score log-likelihood results (see the error message)."""
        raise NotImplementedError(
            "vlm_compress_llava does not implement loglikelihood: lmms-eval 0.7.3's evaluator turns every "
            "(float, bool) result into a string (api.instance.unwrap_generation_output), so loglikelihood and "
            "multiple_choice tasks cannot be scored, and its multiple_choice scoring takes the argmin, i.e. expects "
            "a loss rather than the documented log-probability (EvolvingLMMs-Lab/lmms-eval#370). "
            "Use generate_until tasks."
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlm_compress_llava does not support multi-round tasks; use generate_until tasks")

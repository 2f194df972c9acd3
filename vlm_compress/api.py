"""The public entry points: ``compress``, ``restore``, ``compressed``; argument validation; ``model.compression``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import compat, pruners  # noqa: F401  (registers the built-in methods)
from .adapters import Adapter, get_adapter
from .budget import is_auto, validate_budget
from .config import MethodConfig
from .patching import check_unpatchable, patch_method, patched_modules, unpatch_all
from .registry import get_method, list_methods
from .stages.encoder import EncoderStage, RewrittenInputs
from .stages.prefill import PrefillStage
from .stats import CompressionStats

DEFAULT_BUDGET = 0.2
_STATE_ATTR = "compression"


@dataclasses.dataclass
class CompressionState:
    """What ``compress`` attached to a model as ``model.compression``.

    ``configs``: the active method configs (budgets resolved). ``stats``: :class:`CompressionStats` of the last
    compressed forward/generate (``None`` before the first one, or after a text-only call).
    ``last``: the last :class:`RewrittenInputs` (kept indices, keep mask), for inspection and overlays.
    """

    configs: list[MethodConfig]
    adapter: Adapter
    encoder: EncoderStage | None
    prefill: PrefillStage | None = None
    stats: CompressionStats | None = None
    last: RewrittenInputs | None = None

    @property
    def config(self) -> MethodConfig | list[MethodConfig]:
        return self.configs[0] if len(self.configs) == 1 else self.configs

    def __deepcopy__(self, memo: dict) -> "CompressionState":
        """A copy for a copied model (``copy.deepcopy(model)``): the same methods on the copy's modules and the last
        ``stats``; ``last`` (the last call's tensors, which may be in an autograd graph) is not carried over."""
        return CompressionState(
            configs=copy.deepcopy(self.configs, memo), adapter=copy.deepcopy(self.adapter, memo),
            encoder=copy.deepcopy(self.encoder, memo), prefill=copy.deepcopy(self.prefill, memo),
            stats=copy.deepcopy(self.stats, memo), last=None,
        )


def _resolve_configs(
    method: str | MethodConfig | Sequence[str | MethodConfig], budget: float | int | None, kwargs: dict[str, Any]
) -> list[MethodConfig]:
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("method list is empty; pass a method name such as 'cls_attn'")
    if kwargs and (len(items) > 1 or isinstance(items[0], MethodConfig)):
        raise TypeError(
            f"method options {sorted(kwargs)} are only accepted with a single method name; "
            "when stacking or passing config objects, set options on the configs"
        )
    if budget is not None:
        budget = validate_budget(budget)
    configs = []
    for item in items:
        if isinstance(item, MethodConfig):
            config = item
        elif isinstance(item, str):
            config = get_method(item).create(**kwargs)
        else:
            raise TypeError(f"method must be a name, a MethodConfig, or a list of them; got {type(item).__name__}")
        if config.budget is None:
            config = dataclasses.replace(config, budget=budget if budget is not None else DEFAULT_BUDGET)
        elif budget is not None and config.budget != budget:
            raise ValueError(
                f"budget={budget!r} conflicts with {config.name!r} config budget={config.budget!r}; set it in one place"
            )
        else:
            config = dataclasses.replace(config)
        validate_budget(config.budget)
        if is_auto(config.budget) and not getattr(type(config), "supports_auto", lambda: False)():
            scored = [n for n in list_methods("encoder") if get_method(n).supports_auto()]
            raise ValueError(
                f"budget={config.budget!r} chooses each image's count from a method's token scores; {config.name!r} "
                f"ranks no tokens by score. Use one of {', '.join(scored)}, or a float/int budget"
            )
        configs.append(config)
    stages = [c.stage for c in configs]
    duplicated = sorted({s for s in stages if stages.count(s) > 1})
    if duplicated:
        raise ValueError(
            f"stacking needs methods of different stages; got several {duplicated[0]}-stage methods "
            f"({', '.join(c.name for c in configs if c.stage == duplicated[0])})"
        )
    return configs


def compress(
    model: nn.Module,
    budget: float | int | str | None = None,
    method: str | MethodConfig | Sequence[str | MethodConfig] = "cls_attn",
    **method_kwargs: Any,
) -> nn.Module:
    """Compress the visual tokens of ``model`` in place and return it.

    Args:
        model: a supported transformers VLM (see :func:`vlm_compress.adapters.supported_model_classes`).
        budget: float in (0, 1], the share of visual tokens kept (layer-averaged), or int >= 1, visual tokens
            kept per image; default 0.2. Or ``"auto"`` / ``"auto:<mass>"`` (score-based encoder methods): each image
            keeps the fewest tokens whose share of its score mass reaches ``mass`` (default 0.9), so counts differ
            per image; ``stats.kept_per_image`` reports them. May instead be set on a config object.
        method: a registered name (:func:`list_methods`), a config object, or a list of them (one per stage).
        **method_kwargs: options of a single named method, e.g. ``compress(m, 0.2, "cls_attn", layer=-3)``.

    After this, ``model(**inputs)`` and ``model.generate(**inputs)`` take the stock processor's inputs and run on
    the compressed prompt; ``model.compression.stats`` describes the last call; ``restore(model)`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress() expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    wrapper, model = model, unwrap_model(model)
    if isinstance(model.__dict__.get(_STATE_ATTR), CompressionState):
        active = ", ".join(c.name for c in model.__dict__[_STATE_ATTR].configs)
        raise ValueError(
            f"this model is already compressed (method {active}); call vlm_compress.restore(model) first, "
            "or pass method=[...] in one compress() call to stack methods"
        )
    if patched_modules(model):
        raise RuntimeError(
            "this model carries vlm-compress patches without a compression state (an interrupted compress or a "
            "copy made half-way); call vlm_compress.restore(model) to clear them"
        )
    adapter = get_adapter(model)
    configs = _resolve_configs(method, budget, method_kwargs)
    by_stage = {c.stage: c for c in configs}
    encoder = EncoderStage(adapter, by_stage["encoder"]) if "encoder" in by_stage else None
    prefill = None
    if "prefill" in by_stage or "decode" in by_stage:
        prefill = PrefillStage(adapter, by_stage.get("prefill"))
        if "decode" in by_stage:
            prefill.add_decode_policy(by_stage["decode"])
    state = CompressionState(configs=configs, adapter=adapter, encoder=encoder, prefill=prefill)
    try:  # atomic: any failure takes back every patch made so far
        if prefill is not None:
            prefill.attach()
        patch_method(model, "forward", _compressed_forward)
        patch_method(model, "generate", _compressed_generate)
        if prefill is not None and not hasattr(type(model), "_reorder_cache"):  # (only XLNet and RAG define one)
            patch_method(model, "_reorder_cache", _compressed_reorder_cache)
        model.__dict__[_STATE_ATTR] = state
    except BaseException:
        _remove_patches(model)
        raise
    return wrapper


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a wrapper: a PEFT ``PeftModel``'s base model; any other model as it is."""
    get_base_model = getattr(type(model), "get_base_model", None)
    if get_base_model is not None and type(model).__module__.split(".")[0] == "peft":
        return model.get_base_model()
    return model


def _remove_patches(model: nn.Module) -> None:
    """Every vlm-compress patch on ``model`` and its submodules, and the compression state (checked first, so a
    refusal leaves everything in place)."""
    modules = patched_modules(model)
    for module in modules:
        check_unpatchable(module)
    for module in modules:
        unpatch_all(module)
    model.__dict__.pop(_STATE_ATTR, None)


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`compress`: remove every patch and ``model.compression``. Outputs are the untouched model's.

    Also clears what an interrupted :func:`compress` could have left behind (patches without a state)."""
    wrapper, model = model, unwrap_model(model)
    if not isinstance(model.__dict__.get(_STATE_ATTR), CompressionState) and not patched_modules(model):
        raise ValueError("this model is not compressed; nothing to restore")
    _remove_patches(model)
    return wrapper


@contextlib.contextmanager
def compressed(
    model: nn.Module,
    budget: float | int | str | None = None,
    method: str | MethodConfig | Sequence[str | MethodConfig] = "cls_attn",
    **method_kwargs: Any,
) -> Iterator[nn.Module]:
    """``with compressed(model, 0.1, "visionzip"): ...`` compresses for the scope and restores on exit."""
    compress(model, budget, method, **method_kwargs)
    try:
        yield model
    finally:
        restore(model)


_FEATURE_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy")
_IMAGE_KWARGS = (*_FEATURE_KWARGS, "image_sizes", "batch_num_images", "vision_aspect_ratio")
_VIDEO_INPUTS = ("pixel_values_videos", "image_sizes_videos")
_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")  # [B, L] per-token inputs, shortened with input_ids


def _rewrite(state: CompressionState, call: dict[str, Any]) -> RewrittenInputs | None:
    """Compress the inputs of one call in place in ``call``; ``None`` (and ``call`` untouched) if not applicable."""
    pixel_values = call.get("pixel_values")
    pixel_values_videos = call.get("pixel_values_videos")
    input_ids = call.get("input_ids")
    if state.encoder is None or (pixel_values is None and pixel_values_videos is None):
        return None
    if call.get(compat.MM_ENCODER_OUTPUTS) is not None:
        return None
    if input_ids is None:
        raise ValueError(
            "a compressed model needs input_ids (not inputs_embeds) to find the image placeholders; "
            "pass the processor's input_ids"
        )
    adapter = state.adapter
    image_kwargs = {k: call[k] for k in (*_FEATURE_KWARGS, *adapter.image_input_names) if call.get(k) is not None}
    video_kwargs = {k: call[k] for k in (*_FEATURE_KWARGS, *adapter.video_input_names) if call.get(k) is not None}
    token_inputs = {k: call[k] for k in _TOKEN_INPUTS
                    if isinstance(call.get(k), torch.Tensor) and call[k].shape == input_ids.shape}
    rewritten = state.encoder.run(
        input_ids,
        pixel_values,
        attention_mask=call.get("attention_mask"),
        labels=call.get("labels"),
        position_ids=call.get("position_ids"),
        image_kwargs=image_kwargs,
        pixel_values_videos=pixel_values_videos,
        video_kwargs=video_kwargs,
        token_inputs=token_inputs,
    )
    if rewritten is None:
        return None
    for key in ("pixel_values", *_IMAGE_KWARGS, *_VIDEO_INPUTS, *adapter.image_input_names, *adapter.video_input_names):
        call.pop(key, None)
    call.update(rewritten.token_inputs)
    call.update(input_ids=rewritten.input_ids, attention_mask=rewritten.attention_mask)
    call.update(adapter.encoded_inputs(rewritten.image_features, rewritten.video_features))
    if rewritten.labels is not None:
        call["labels"] = rewritten.labels
    if rewritten.position_ids is not None:
        call["position_ids"] = rewritten.position_ids
    adapter.prompt_rewritten(rewritten.position_ids, rewritten.attention_mask)
    state.stats, state.last = rewritten.stats, rewritten
    return rewritten


def _state(model: nn.Module) -> CompressionState:
    return model.__dict__[_STATE_ATTR]


def _suspended(state: CompressionState) -> bool:
    """A method's own scoring passes (QuoTA) run the model uncompressed."""
    return state.encoder is not None and state.encoder.suspended


def _compressed_forward(model: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.forward`` while compressed (a :class:`~vlm_compress.patching.Patched` implementation)."""
    state = _state(model)
    if _suspended(state):
        return original(*args, **kwargs)
    call = _bind(original, args, kwargs)
    cache = compat.cache_of_call(call)
    if state.prefill is not None and compat.is_static_cache(cache):
        raise ValueError(STATIC_CACHE_MESSAGE)
    cached = compat.cache_length(cache)
    if cached == 0:
        _rewrite(state, call)
    if state.prefill is None:
        return original(**call)
    return _run_in_llm(state, original, call, cached)


@functools.lru_cache(maxsize=64)
def _signature(function: Any) -> inspect.Signature:
    """The signature of a class-level function (cached: functions of classes live as long as their classes)."""
    return inspect.signature(function)


def _bind(original: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``original``'s arguments by name (its ``**kwargs`` merged in). A class method's signature is computed once
    (≈ 0.1 ms each time otherwise: every decode step calls the patched forward)."""
    function = getattr(original, "__func__", None)
    if function is not None:  # a bound method: the function's signature with its instance bound first
        signature = _signature(function)
        arguments = signature.bind(original.__self__, *args, **kwargs).arguments
        arguments.pop(next(iter(signature.parameters)))
    else:  # an earlier instance-level override (accelerate's hook): not cached, it holds its module
        arguments = inspect.signature(original).bind(*args, **kwargs).arguments
    call = {k: v for k, v in arguments.items() if k != "kwargs"}
    call.update(arguments.get("kwargs", {}))
    return call


def _protected_mask(state: CompressionState, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] the encoder stage's protected tokens (MustDrop's key set) at their placeholders in ``input_ids``."""
    last = state.last
    if input_ids is None or last is None or last.selection.protected is None or not torch.equal(last.input_ids, input_ids):
        return None
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    protected = iter(last.selection.protected)  # images first, then videos
    for token, features in ((state.adapter.image_token_id, last.image_features),
                            (state.adapter.video_token_id, last.video_features)):
        if not features:
            continue
        where = (input_ids == token).nonzero()  # row-major: placeholder order
        offset, chosen = 0, []
        for kept, slots in zip(features, protected):
            if slots is not None:
                chosen.append(slots.to(where.device) + offset)
            offset += kept.shape[0]
        if chosen:
            rows = where[torch.cat(chosen)]
            mask[rows[:, 0], rows[:, 1]] = True
    return mask


def _run_in_llm(state: CompressionState, original: Any, call: dict[str, Any], cached: int) -> Any:
    """One forward through the in-LLM stage: a prompt (empty cache) or a further step on the per-layer caches."""
    stage = state.prefill
    input_ids = call.get("input_ids")
    tokens = input_ids if input_ids is not None else call["inputs_embeds"]
    new = tokens.shape[1]
    if cached and stage.slots is not None and call.get("position_ids") is None:
        # layer 0's cache length is not the sequence length once caches are pruned: give every layer the true one
        positions = stage.slots.length + torch.arange(new, device=tokens.device)
        call["position_ids"] = state.adapter.step_positions(positions.unsqueeze(0).expand(tokens.shape[0], -1))
    encoded = call.get(compat.MM_ENCODER_OUTPUTS) is not None
    protected = _protected_mask(state, input_ids) if encoded else None
    stage.begin(input_ids, call.get("attention_mask"), cached, protected)
    with stage.calling():
        out = original(**call)
    if not cached and stage.record is not None:
        dtype = next(stage.layers[0].parameters()).dtype
        base = state.stats if encoded else None  # the encoder's, this prompt
        state.stats = stage.stats(base, torch.finfo(dtype).bits // 8)
    stage.end(new, compat.cache_of_output(out))
    if state.stats is not None and stage.policies and stage.slots is not None:
        element = torch.finfo(next(stage.layers[0].parameters()).dtype).bits // 8
        state.stats.kv_cache_bytes_decode = stage.cache_bytes(element)
        state.stats.decode_select_ms = stage.record.step_select_s * 1e3 if stage.record is not None else 0.0
        if not cached:  # what decoding starts from: the prompt's caches after eviction
            state.stats.kv_cache_bytes = state.stats.kv_cache_bytes_decode
    return out


STATIC_CACHE_MESSAGE = (
    "in-LLM and decode-stage methods keep a different number of tokens in each layer's KV cache, which a static "
    "(preallocated) cache cannot hold; generate with the default dynamic cache (drop cache_implementation='static' "
    "or the StaticCache you passed), or use an encoder-stage method, which works with static caches"
)


def _compressed_generate(model: nn.Module, original: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.generate`` while compressed: the prompt is compressed once, then the stock ``generate`` runs."""
    state = _state(model)
    if _suspended(state):
        return original(*args, **kwargs)
    call = dict(kwargs)
    if args:
        if "input_ids" in call or "inputs" in call:
            raise TypeError("generate() got input_ids both positionally and by keyword")
        call["input_ids"], args = args[0], args[1:]
    if "inputs" in call:
        call["input_ids"] = call.pop("inputs")
    if state.prefill is not None and _wants_static_cache(model, call):
        raise ValueError(STATIC_CACHE_MESSAGE)
    prompt = call.get("input_ids")
    with torch.no_grad():  # as the stock generate runs the vision tower
        rewritten = _rewrite(state, call)
    out = original(*args, **call)
    if rewritten is None or prompt is None:
        return out
    # give back the prompt the caller passed, so `out[:, prompt_len:]` still slices the new tokens
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    sequences = torch.cat([prompt, sequences[:, rewritten.input_ids.shape[1] :]], dim=1)
    if isinstance(out, torch.Tensor):
        return sequences
    out.sequences = sequences
    return out


def _compressed_reorder_cache(model: nn.Module, original: Any, cache: Any, beam_idx: torch.Tensor) -> Any:
    """``model._reorder_cache`` while compressed in the LLM: beam search's hook for moving cache rows (``generate``
    calls it when the model has one, else ``cache.reorder_cache``). Reorders the cache as the stock path does and
    the per-layer slot bookkeeping and decode policies' state with it, which differ per beam once a policy evicts
    during generation."""
    cache.reorder_cache(beam_idx)
    state = _state(model)
    if not _suspended(state):
        state.prefill.reorder(beam_idx)
    return cache


def _wants_static_cache(model: nn.Module, call: dict[str, Any]) -> bool:
    config = call.get("generation_config") or getattr(model, "generation_config", None)
    return compat.requests_static_cache(config, call)

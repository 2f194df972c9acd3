"""The in-LLM stage: per-layer token plans with per-layer KV caches (docs/architecture.md, "The per-layer KV
engine").

Every decoder layer of the LLM gets a per-instance wrapper (removed by ``restore``). While a prompt is prefilled,
the wrapper asks the method which tokens the layer processes, gathers their hidden states, rotary cos/sin and
position ids, builds the attention mask over exactly those tokens, runs the *original* layer, and scatters the
outputs back; tokens a layer skips pass through it unchanged. The layer's KV cache therefore holds only what it
processed, so cache lengths differ per layer. :class:`LayerSlots` remembers, per layer and sample, which
sequence position each cache slot holds; every later call (decode steps) builds its mask from those slots, and
position ids stay the original ones, so a decode step sits at the full-prompt position in all layers.

Qwen2-VL/Qwen2.5-VL (3-D M-RoPE): the rotary embedding mixes the three position rows into ordinary ``(cos, sin)``
tables before the decoder layers, so gathering a layer's rows keeps every token's own (t, h, w) position; cached
steps given no position ids get the model's 4-row ids from the adapter (``Adapter.step_positions``: text position,
then the M-RoPE rows shifted by ``rope_deltas``), so decode steps sit where the uncompressed prompt puts them.

Masks are explicit boolean masks for SDPA (additive for eager); attention weights are never requested. When a
layer processes every token of the prompt the original call runs untouched, which makes a plan that keeps
everything bit-identical to the uncompressed model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import compat
from ..llm_attention import (apply_rope, check_decoder_layer, project_keys, project_queries, row_attention,
                             row_attention_received)
from ..patching import patch_method
from ..pruners.llm_base import PrefillContext, PrefillPruner
from ..stats import CompressionStats, kv_cache_bytes, kv_entry_bytes, prefill_flops, prompt_costs

SUPPORTED_ATTENTION = ("sdpa", "eager")


def pack(mask: torch.Tensor, dummy: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of ``mask`` [B, S], left-aligned and padded: (index [B, n], real [B, n]).

    Padding entries point at ``dummy`` (an extra row the caller appends) so gathers and scatters never collide.
    """
    counts = mask.sum(dim=1)
    n = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n]
    real = torch.arange(n, device=mask.device)[None, :] < counts[:, None]
    return torch.where(real, order, dummy), real


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer keywords for a checkpointed call: no cache (a recompute would write it twice), as transformers does."""
    call = {k: v for k, v in kwargs.items() if k not in compat.CACHE_ARGUMENTS}
    if "use_cache" in call:
        call["use_cache"] = False
    return call


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B or 1, S(+1), ...]; index: [B, n] → [B, n, ...]."""
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = index.shape + (1,) * (x.dim() - 2)
    return torch.gather(x, 1, index.view(shape).expand(*index.shape, *x.shape[2:]))


def _with_dummy(x: torch.Tensor) -> torch.Tensor:
    """Append one zero row along dim 1 (the target of padding entries)."""
    return torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[2:])], dim=1)


def _reading(index: torch.Tensor, s: int) -> torch.Tensor:
    """A :func:`pack` index [B, n] for gathers from a tensor of ``s`` rows: padding entries (``s``) read the last
    row instead of a dummy one (what a padding row computes is never kept), so no full-size copy with a dummy row
    is made."""
    return index.clamp(max=s - 1)


@dataclasses.dataclass
class LayerSlots:
    """What each layer's KV cache holds: ``positions[l]`` is [B, K_l], the sequence index of every cache slot
    of layer ``l`` (-1 for padding slots of ragged per-sample sets). ``valid`` [B, T]: non-padding per sequence
    index over everything seen so far. ``length``: sequence indices seen before the current call.
    ``key_valid[l]`` [B, K_l]: which of layer ``l``'s slots hold a non-padding token, kept incrementally during
    decoding (one column appended per step, dropped by a cache edit and rebuilt once) instead of gathered anew from
    ``valid`` each step (issue #21). ``dense[l]``: host-side, every slot of ``key_valid[l]`` is valid, so a decode
    step needs no mask there (the stock model's path: SDPA without a mask); ``step_valid``: the current step's new
    tokens are all valid (one device sync per step, not per layer).
    """

    positions: list[torch.Tensor | None]
    valid: torch.Tensor
    length: int = 0
    reshaped: bool = False  # some layer's cache differs from "every token so far" (pruned or evicted)
    key_valid: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    dense: dict[int, bool] = dataclasses.field(default_factory=dict)
    step_valid: bool = True

    def allowed(self, layer: int, query_positions: torch.Tensor) -> torch.Tensor:
        """[B, Q, K] which of layer ``layer``'s slots each query (sequence indices [B, Q]) may attend to."""
        keys = self.positions[layer]
        real = (keys >= 0) & torch.gather(self.valid, 1, keys.clamp(min=0))
        causal = keys[:, None, :] <= query_positions[:, :, None]
        itself = keys[:, None, :] == query_positions[:, :, None]
        return (real[:, None, :] & causal) | itself

    def step_allowed(self, layer: int, query_positions: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, K] :meth:`allowed` for one decode step whose query [B, 1] was just appended to layer ``layer``;
        ``None`` when every slot is allowed (no mask needed).

        Every cached slot precedes the query, so causality holds for all of them and only validity matters: the
        layer's ``key_valid`` grows by the query's column (built in full once after a prefill or a cache edit).
        """
        keys = self.positions[layer]
        known = self.key_valid.get(layer)
        if known is None or known.shape[1] != keys.shape[1] - 1:
            valid = (keys >= 0) & torch.gather(self.valid, 1, keys.clamp(min=0))
            self.dense[layer] = bool(valid.all())
        else:
            valid = torch.cat([known, torch.gather(self.valid, 1, query_positions)], dim=1)
            self.dense[layer] = self.dense.get(layer, False) and self.step_valid
        self.key_valid[layer] = valid
        if self.dense[layer]:
            return None
        allowed = valid.clone()
        allowed[:, -1] = True  # a query always sees itself (padding rows stay finite)
        return allowed[:, None, :]

    def cached_tokens(self, layer: int) -> torch.Tensor:
        """[B] non-padding tokens in layer ``layer``'s cache."""
        keys = self.positions[layer]
        return ((keys >= 0) & torch.gather(self.valid, 1, keys.clamp(min=0))).sum(dim=1)


@dataclasses.dataclass
class LayerPlan:
    """How one decoder layer runs on the prompt: enough to run it again identically, as a gradient checkpoint does
    in backward after the prompt's bookkeeping has moved on.

    call: the original layer's keyword arguments. index: [B, n] gathered positions (padding → S), ``None`` when the
    layer processes every token. active: [B, S] processed tokens. scales / layer_scales: p-MoD's STRing weights
    over [B, S] / over the processed rows. padded: some row of ``index`` is padding (samples process different
    counts), so the scatter back needs a dummy row.
    """

    call: dict[str, Any]
    index: torch.Tensor | None
    active: torch.Tensor
    scales: torch.Tensor | None
    layer_scales: torch.Tensor | None
    padded: bool = False


@dataclasses.dataclass
class PromptCounts:
    """[B][L] lists: tokens each layer processed, of which visual, and prompt tokens each layer's cache holds now
    (after any decode-stage eviction); non-padding tokens only."""

    tokens: list[list[int]]
    visual: list[list[int]]
    cached: list[list[int]]


@dataclasses.dataclass
class PrefillRecord:
    """Per-layer token counts of the last prefill, [L] lists of [B] tensors (non-padding tokens only)."""

    tokens: list[torch.Tensor]
    visual: list[torch.Tensor]
    select_s: float = 0.0
    step_select_s: float = 0.0  # decode policies' per-step scoring, summed over the steps since the prompt


class PromptLayerView:
    """:class:`~vlm_compress.pruners.llm_base.LayerView` of decoder layer ``i`` right after it ran on the prompt.

    hidden: [B, S, D] the layer's input; out: [B, S, D] its output (skipped tokens passed through); layer_hidden:
    [B, n, D] the input rows it processed, at ``layer_positions`` [B, n] (-1: padding), with their rotary tables.
    Keys, queries and the final norm are computed on first use, once per layer, so methods that do not ask pay nothing.
    """

    def __init__(self, stage: "PrefillStage", i: int, hidden: torch.Tensor, out: torch.Tensor,
                 layer_hidden: torch.Tensor, layer_positions: torch.Tensor, layer_cos: torch.Tensor,
                 layer_sin: torch.Tensor, kwargs: dict, layer_queries: torch.Tensor | None = None):
        self.stage, self.i, self.hidden, self.out = stage, i, hidden, out
        self.layer_hidden, self.layer_positions = layer_hidden, layer_positions
        self.layer_cos, self.layer_sin, self.kwargs = layer_cos, layer_sin, kwargs
        self.layer_queries = layer_queries  # [B, n, H·hd] the layer's own q_proj output on its rows (before RoPE)
        self._layer_keys: torch.Tensor | None = None
        self._normed: torch.Tensor | None = None
        self._row_of: torch.Tensor | None = None

    @property
    def layer(self) -> nn.Module:
        return self.stage.layers[self.i]

    def layer_keys(self) -> torch.Tensor:
        """[B, H_kv, n, hd] the keys of the processed rows, RoPE applied (read from the cache when there is one)."""
        if self._layer_keys is None:
            cache = compat.cache_of_call(self.kwargs)
            if self.kwargs.get("use_cache") and compat.has_layer_entries(cache):
                self._layer_keys = compat.layer_keys(cache, self.i)
            else:
                self._layer_keys = project_keys(self.layer, self.layer_hidden, self.layer_cos, self.layer_sin)
        return self._layer_keys

    def _scatter_target(self) -> torch.Tensor:
        """[B, n] the prompt position of each processed row; padding rows → S (a dummy column or row)."""
        return torch.where(self.layer_positions >= 0, self.layer_positions, self.hidden.shape[1])

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, S] → attention of those rows over the layer's keys, scattered to prompt positions [B, R, S]."""
        queries, allowed, _, _ = self._rows(rows)
        probs = row_attention(self.layer, queries, self.layer_keys(), allowed)  # [B, R, K]
        s = self.hidden.shape[1]
        out = probs.new_zeros(probs.shape[0], probs.shape[1], s + 1)
        out.scatter_(2, self._scatter_target()[:, None, :].expand_as(probs), probs)
        return out[..., :s]

    def received(self, *groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """groups: masks [B, S] → per group [B, S], the attention its rows give each prompt position, summed over
        the rows: one attention pass over the union of the groups' rows, contracted with the groups' 0/1
        memberships as it goes (no [B, R, K] rows, no [B, R, S] scatter)."""
        rows = torch.stack(groups).any(dim=0)
        queries, allowed, index, real = self._layer_rows() if self._covers_most(rows) else self._rows(rows)
        s = self.hidden.shape[1]
        member = torch.stack([torch.gather(g, 1, index.clamp(max=s - 1)) & real for g in groups], dim=1)  # [B, G, R]
        summed = row_attention_received(self.layer, queries, self.layer_keys(), allowed, member.float())  # [B, G, K]
        target = self._scatter_target()[:, None, :].expand_as(summed)
        out = summed.new_zeros(summed.shape[0], len(groups), s + 1).scatter_(2, target, summed)[..., :s]
        return tuple(out.unbind(1))

    def _rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(queries [B, H, R, hd] with RoPE, allowed keys [B, R, K], pack index [B, R], real [B, R]) for rows [B, S]."""
        s = self.hidden.shape[1]
        index, real = pack(rows, dummy=s)
        cos, sin = compat.rotary_tables(self.kwargs)
        at = _reading(index, s)
        q_cos, q_sin = _gather_rows(cos, at), _gather_rows(sin, at)
        queries = self._own_queries(index, real, q_cos, q_sin)
        if queries is None:
            queries = project_queries(self.layer, _gather_rows(self.hidden, at), q_cos, q_sin)
        query_positions = torch.where(real, index, -1)
        allowed = self.stage.slots.allowed(self.i, query_positions) & real[:, :, None]
        return queries, allowed, index, real

    def _covers_most(self, rows: torch.Tensor) -> bool:
        """Whether ``rows`` [B, S] are all among the layer's processed rows and at least half of them: then summing
        over every processed row with 0/1 weights is cheaper than gathering the requested ones (ATP: all visual)."""
        if self.layer_queries is None:
            return False
        processed = self.layer_positions >= 0
        inside = torch.gather(rows, 1, self.layer_positions.clamp(min=0)) & processed
        wanted, found, total = torch.stack([rows.sum(), inside.sum(), processed.sum()]).tolist()  # one host sync
        return found == wanted and 2 * wanted >= total

    def _layer_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_rows` for every row the layer processed, in its own order (no gathers)."""
        real = self.layer_positions >= 0
        index = torch.where(real, self.layer_positions, self.hidden.shape[1])
        b, n, _ = self.layer_queries.shape
        q = self.layer_queries.view(b, n, -1, self.layer.self_attn.head_dim).transpose(1, 2)
        queries = apply_rope(q, self.layer_cos, self.layer_sin)
        allowed = self.stage.slots.allowed(self.i, self.layer_positions) & real[:, :, None]
        return queries, allowed, index, real

    def _own_queries(self, index: torch.Tensor, real: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor | None:
        """[B, H, R, hd] the queries of the rows at ``index`` [B, R] taken from the layer's own projection (RoPE
        applied here), or ``None`` when some requested row was not processed by the layer (then recomputed)."""
        if self.layer_queries is None:
            return None
        if self._row_of is None:  # prompt position → the layer's row holding it (-1: not processed)
            b, n = self.layer_positions.shape
            row_of = torch.full((b, self.hidden.shape[1] + 1), -1, dtype=torch.long, device=index.device)
            processed = self.layer_positions >= 0
            rows = torch.arange(n, device=index.device).expand(b, n)
            row_of.scatter_(1, torch.where(processed, self.layer_positions, self.hidden.shape[1]),
                            torch.where(processed, rows, -1))
            row_of[:, -1] = -1
            self._row_of = row_of
        at = torch.gather(self._row_of, 1, index)
        if bool((at[real] < 0).any()):
            return None
        picked = _gather_rows(self.layer_queries, at.clamp(min=0))  # padding rows: any row, masked later
        b, r, _ = picked.shape
        q = picked.view(b, r, -1, self.layer.self_attn.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin)

    def keys(self) -> torch.Tensor:
        """[B, S, H_kv·hd] the layer's post-RoPE keys, heads concatenated, at prompt positions (zeros elsewhere)."""
        keys = self.layer_keys()
        b, h, n, hd = keys.shape
        flat = keys.transpose(1, 2).reshape(b, n, h * hd)
        out = flat.new_zeros(b, self.hidden.shape[1] + 1, h * hd)
        out.scatter_(1, self._scatter_target()[..., None].expand_as(flat), flat)
        return out[:, :-1]

    def output(self, normed: bool = False) -> torch.Tensor:
        """[B, S, D] the layer's output; ``normed``: through the LLM's final norm (``Adapter.final_norm``)."""
        if not normed:
            return self.out
        if self._normed is None:
            self._normed = self.stage.adapter.final_norm()(self.out)
        return self._normed


class StepLayerView:
    """:class:`~vlm_compress.pruners.llm_base.StepView` of decoder layer ``i`` right after it ran on a one-token
    decode step: the step's query (``q_proj``'s output [B, 1, H·hd], kept by the stage's ``q_proj`` patch, so no
    projection is recomputed) against the layer's cache, which now ends with the step's own slot. ``allowed``:
    [B, K] the step's mask row (``None``: every slot)."""

    def __init__(self, layer: nn.Module, i: int, query: torch.Tensor, kwargs: dict, allowed: torch.Tensor | None):
        self.layer, self.i, self.query, self.kwargs, self.allowed = layer, i, query, kwargs, allowed
        self._probs: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self._probs is None:
            attn = self.layer.self_attn
            b = self.query.shape[0]
            cos, sin = compat.rotary_tables(self.kwargs)
            q = self.query.view(b, 1, -1, attn.head_dim).transpose(1, 2)
            q = apply_rope(q, cos.expand(b, -1, -1), sin.expand(b, -1, -1))
            keys = compat.layer_keys(compat.cache_of_call(self.kwargs), self.i)
            allowed = self.allowed[:, None, :] if self.allowed is not None else None
            self._probs = row_attention(self.layer, q, keys, allowed)[:, 0]
        return self._probs


class PrefillStage:
    """Runs one :class:`PrefillPruner` inside the decoder layers of an adapter's LLM."""

    def __init__(self, adapter: Any, config: PrefillPruner | None):
        self.adapter = adapter
        self.config = config
        self.layers: list[nn.Module] = list(adapter.decoder_layers())
        for layer in self.layers:
            check_decoder_layer(layer)
        attn = getattr(adapter.text_config, "_attn_implementation", "sdpa") or "sdpa"
        if attn not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"in-LLM compression needs attn_implementation in {SUPPORTED_ATTENTION} (explicit per-layer masks); "
                f"the model uses {attn!r}. Load it with attn_implementation='sdpa'."
            )
        self.attn_implementation = attn
        if config is not None:
            config.check(len(self.layers))
            config.check_text_config(adapter.text_config)
        self.scoring = set(config.scoring_layers(len(self.layers))) if config is not None else set()
        self.ctx: PrefillContext | None = None
        self.slots: LayerSlots | None = None
        self.record: PrefillRecord | None = None
        self.prefilling = False
        self.policies: list[Any] = []  # decode-stage methods (pruners.llm_base.DecodePolicy)
        self._step_queries: dict[int, torch.Tensor] = {}  # q_proj outputs kept for scoring (prompt or step)
        self._capture: int | None = None  # the layer whose q_proj output is kept now
        self._mlp_scales: dict[int, torch.Tensor | None] = {}
        self.active = False  # inside a call of the compressed model (a direct call of the LLM runs untouched)
        self._checkpoint: dict[int, Callable[..., Any]] = {}  # layers whose gradient checkpointing we run ourselves

    def __deepcopy__(self, memo: dict) -> "PrefillStage":
        """A copy for a copied model: the same method and policies on the copy's layers, without the last call's
        per-call state (``ctx``, ``slots``, ``record``: tensors that may be in an autograd graph)."""
        other = copy.copy(self)
        memo[id(self)] = other
        for name, value in vars(self).items():
            scratch = name in ("ctx", "slots", "record", "prefilling", "active", "_mlp_scales", "_checkpoint",
                               "_step_queries", "_capture")
            setattr(other, name, None if scratch else copy.deepcopy(value, memo))
        other.prefilling, other.active, other._mlp_scales, other._checkpoint = False, False, {}, {}
        other._step_queries, other._capture = {}, None
        return other

    def add_decode_policy(self, policy: Any) -> None:
        """A decode-stage method: observes the prompt's layers, then edits the caches after every forward."""
        policy.check(len(self.layers))
        self.policies.append(policy)

    # -- patching ------------------------------------------------------------------------------------------
    def attach(self) -> list[nn.Module]:
        scales = self.config is not None and type(self.config).token_scales is not PrefillPruner.token_scales
        steps = any(policy.observes_steps() for policy in self.policies)
        for index, layer in enumerate(self.layers):
            patch_method(layer, "forward", functools.partial(self._layer_forward, index))
            if scales:
                patch_method(layer.mlp, "forward", functools.partial(self._mlp_forward, index))
            if steps or self.policies or index in self.scoring:
                patch_method(layer.self_attn.q_proj, "forward", functools.partial(self._q_forward, index))
        return self.layers

    def _q_forward(self, index: int, q_proj: nn.Module, original: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s query projection at a layer something scores: keeps the queries it computes
        ([B, n, H·hd], the prompt rows the layer processed, or a decode step's one row) for
        :class:`PromptLayerView` / :class:`StepLayerView`, so scoring never projects them again (a
        :class:`~vlm_compress.patching.Patched` impl)."""
        out = original(x)
        if self._capture == index:
            self._step_queries[index] = out
        return out

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search reordered the cache's rows (row ``i`` ← old row ``beam_idx[i]``): reorder the slot
        bookkeeping, the prompt's masks and the policies' per-row state the same way."""
        slots, ctx = self.slots, self.ctx
        if slots is None or beam_idx.shape[0] != slots.valid.shape[0]:
            return
        idx = beam_idx.to(slots.valid.device)
        slots.positions = [p.index_select(0, idx) if p is not None else None for p in slots.positions]
        slots.valid = slots.valid.index_select(0, idx)
        slots.key_valid = {layer: v.index_select(0, idx) for layer, v in slots.key_valid.items()}
        for name in ("visual", "valid", "alive", "protected", "images"):
            setattr(ctx, name, getattr(ctx, name).index_select(0, idx))
        for policy in self.policies:
            policy.reorder(ctx, idx)

    # -- per call --------------------------------------------------------------------------------------------
    def begin(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, cache_length: int,
        protected: torch.Tensor | None = None,
    ) -> None:
        """Called by the model-level wrapper before each forward: a new prompt (empty cache) or a further step.

        ``protected`` [B, S]: visual tokens no in-LLM method may drop (the encoder stage's key set).
        """
        if cache_length == 0:
            self._begin_prompt(input_ids, attention_mask, protected)
        elif self.slots is not None:
            self._begin_step(input_ids.shape[1], attention_mask)

    def end(self, steps: int, cache: Any) -> None:
        if self.slots is None:
            return
        prompt, self.prefilling = self.prefilling, False
        self.slots.length += steps
        if self.config is not None and prompt:
            self.config.finish(self, cache)
        started = time.perf_counter()
        for policy in self.policies:
            policy.apply(self, cache, prompt)
        if not prompt and self.record is not None:
            self.record.step_select_s += time.perf_counter() - started

    def _begin_prompt(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, protected: torch.Tensor | None
    ) -> None:
        self.ctx = self.slots = self.record = None
        self._mlp_scales = {}
        if input_ids is None:
            raise ValueError("in-LLM compression needs input_ids (not inputs_embeds) to find the image tokens")
        visual = self.adapter.visual_mask(input_ids)
        if not visual.any():
            return  # text-only prompt: every layer runs untouched
        b, s = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
        images = self.adapter.images_per_sample(input_ids)
        self.ctx = PrefillContext(
            visual=visual, valid=valid, alive=torch.ones_like(visual),
            protected=(protected & visual) if protected is not None else torch.zeros_like(visual),
            images=images, num_layers=len(self.layers),
        )
        self.slots = LayerSlots(positions=[None] * len(self.layers), valid=valid)
        self.record = PrefillRecord(tokens=[], visual=[])
        self.prefilling = True
        if self.config is not None:
            started = time.perf_counter()
            self.config.start(self.ctx)
            self.record.select_s += time.perf_counter() - started

    def _begin_step(self, new: int, attention_mask: torch.Tensor | None) -> None:
        self._mlp_scales = {}
        total = self.slots.length + new
        if attention_mask is not None and attention_mask.shape[1] == total:
            self.slots.valid = attention_mask.bool()
        else:
            ones = self.slots.valid.new_ones(self.slots.valid.shape[0], total - self.slots.valid.shape[1])
            self.slots.valid = torch.cat([self.slots.valid, ones], dim=1)[:, :total]
        self.slots.step_valid = bool(self.slots.valid[:, -new:].all())

    # -- the layer wrapper -----------------------------------------------------------------------------------
    def _layer_forward(self, index: int, layer: nn.Module, original: Callable[..., Any], hidden_states: torch.Tensor,
                       *args: Any, **kwargs: Any) -> Any:
        """Decoder layer ``index``'s forward while compressed (a :class:`~vlm_compress.patching.Patched` impl)."""
        if not self.active or self.slots is None:  # a direct call of the LLM, or a prompt without images
            if index in self._checkpoint and self.active:
                return self._checkpointed(index, lambda h: original(h, *args, **_without_cache(kwargs)), hidden_states)
            return original(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("the compressed decoder layer expects keyword arguments after hidden_states")
        if self.prefilling:
            return self._prefill_layer(index, original, hidden_states, kwargs)
        return self._step_layer(index, original, hidden_states, kwargs)

    def _mask(self, allowed: torch.Tensor, dtype: torch.dtype, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Q, K] bool (and an optional [B, K] additive bias per key) → the 4-D mask the attention takes."""
        allowed = allowed[:, None]
        if self.attn_implementation == "sdpa" and key_bias is None:
            return allowed
        if key_bias is None:
            bias = torch.zeros((), dtype=dtype, device=allowed.device)
        else:
            bias = key_bias[:, None, None, :].to(dtype)
        return torch.where(allowed, bias, torch.finfo(dtype).min)

    def _prefill_layer(self, i: int, original: Callable[..., Any], hidden: torch.Tensor, kwargs: dict) -> Any:
        ctx, slots = self.ctx, self.slots
        b, s, _ = hidden.shape
        active = self.config.layer_tokens(i, ctx, hidden) if self.config is not None else None
        active = (ctx.alive if active is None else active) | ~ctx.visual
        scales = self.config.token_scales(i, ctx) if self.config is not None else None
        bias = self.config.key_bias(i, ctx) if self.config is not None else None
        positions = torch.arange(s, device=hidden.device).expand(b, s)
        cos, sin = compat.rotary_tables(kwargs)
        if bool(active.all()) and bias is None:
            plan = LayerPlan(call=kwargs, index=None, active=active, scales=scales, layer_scales=scales)
            slots.positions[i] = positions
            layer_positions, layer_cos, layer_sin = positions, cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        else:
            index, real = pack(active, dummy=s)
            at = _reading(index, s)
            layer_cos, layer_sin = _gather_rows(cos, at), _gather_rows(sin, at)
            layer_positions = torch.where(real, index, -1)
            slots.positions[i] = layer_positions
            slots.reshaped = True
            call = compat.with_rotary_tables(kwargs, layer_cos, layer_sin)
            if call.get("position_ids") is not None:
                call["position_ids"] = _gather_rows(call["position_ids"].expand(b, -1)[..., None], at)[..., 0]
            # padding rows (-1) see only padding slots: finite outputs, which the scatter then discards
            key_bias = _gather_rows(bias[..., None], at)[..., 0] if bias is not None else None
            call["attention_mask"] = self._mask(slots.allowed(i, layer_positions), hidden.dtype, key_bias)
            layer_scales = _gather_rows(scales[..., None], at)[..., 0] if scales is not None else None
            plan = LayerPlan(call=call, index=index, active=active, scales=scales, layer_scales=layer_scales,
                             padded=not bool(real.all()))
        observed = i in self.scoring or bool(self.policies)
        self._capture = i if observed else None
        try:
            if i in self._checkpoint:
                plan.call = _without_cache(plan.call)
                out, layer_hidden = self._checkpointed(i, functools.partial(self._run_plan, i, original, plan=plan),
                                                       hidden)
            else:
                out, layer_hidden = self._run_plan(i, original, hidden, plan)
        finally:
            self._capture = None
        layer_queries = self._step_queries.pop(i, None)
        counted = active & ctx.valid
        self.record.tokens.append(counted.sum(dim=1))
        self.record.visual.append((counted & ctx.visual).sum(dim=1))
        if i in self.scoring or self.policies:
            started = time.perf_counter()
            attention = PromptLayerView(
                self, i, hidden, out, layer_hidden, layer_positions, layer_cos, layer_sin, kwargs, layer_queries
            )
            for policy in self.policies:
                policy.observe(i, ctx, attention)
            if i in self.scoring:
                self.config.after_layer(i, ctx, attention)
                ctx.alive = ctx.alive | ~ctx.visual | (ctx.protected & ctx.visual)
            self.record.select_s += time.perf_counter() - started
        return out

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """The scope of one call of the compressed model: layer wrappers act only inside it. Layers with gradient
        checkpointing on (``gradient_checkpointing_enable``) have it switched off for the call and are checkpointed
        by the wrapper around the layer's own computation instead, so a recompute in backward runs the same plan
        (transformers <= 5.23 checkpoints a layer's ``__call__``, around the wrapper; 5.24 its class ``forward``,
        inside it; either way the plan's bookkeeping and the scoring would run again, or not at all)."""
        self._checkpoint = {}
        if torch.is_grad_enabled():
            for i, layer in enumerate(self.layers):
                function = compat.layer_checkpointing(layer)
                if function is not None:
                    self._checkpoint[i] = function
                    compat.set_layer_checkpointing(layer, False)
        self.active = True
        try:
            yield
        finally:
            self.active = False
            for i in self._checkpoint:
                compat.set_layer_checkpointing(self.layers[i], True)
            self._checkpoint = {}

    def _checkpointed(self, i: int, function: Callable[[torch.Tensor], Any], hidden: torch.Tensor) -> Any:
        """``function(hidden)`` under layer ``i``'s gradient checkpointing function; the layer's own checkpointing
        stays off inside, in the recompute too (5.24 checks it in the layer's forward)."""
        layer = self.layers[i]

        def run(h: torch.Tensor) -> Any:
            compat.set_layer_checkpointing(layer, False)
            try:
                return function(h)
            finally:  # inside the call (active) the call keeps it off; in a backward recompute it was on
                compat.set_layer_checkpointing(layer, not self.active)

        return self._checkpoint[i](run, hidden)

    def _run_plan(self, i: int, original: Callable[..., Any], hidden: torch.Tensor,
                  plan: "LayerPlan") -> tuple[torch.Tensor, torch.Tensor]:
        """Run decoder layer ``i`` as ``plan`` says, with no bookkeeping: (output [B, S, D], the layer's own input
        rows [B, n, D]). Called once per prompt, and again by a gradient checkpoint's recompute."""
        if plan.index is None:
            return self._call(i, original, hidden, plan.call, plan.layer_scales), hidden
        s = hidden.shape[1]
        layer_hidden = _gather_rows(hidden, _reading(plan.index, s))
        layer_out = self._call(i, original, layer_hidden, plan.call, plan.layer_scales)
        # skipped tokens pass through (STRing: scaled by their weight); processed ones are overwritten below
        skipped = hidden * plan.scales[..., None].to(hidden.dtype) if plan.scales is not None else hidden
        if plan.padded:
            out = _with_dummy(skipped)
        else:
            out = skipped.clone() if skipped is hidden else skipped
        out.scatter_(1, plan.index[..., None].expand_as(layer_out), layer_out)
        return (out[:, :s] if plan.padded else out), layer_hidden

    def _call(self, i: int, original: Callable[..., Any], hidden: torch.Tensor, kwargs: dict,
              scales: torch.Tensor | None) -> Any:
        """The original layer; with ``scales`` [B, n] its MLP output is multiplied by them (p-MoD's STRing).

        The weights stay set after the call (until the next prompt or decode step), so a gradient checkpoint that
        recomputes the layer during backward scales it the same way."""
        self._mlp_scales[i] = scales[..., None].to(hidden.dtype) if scales is not None else None
        return original(hidden, **kwargs)

    def _mlp_forward(self, index: int, mlp: nn.Module, original: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``index``'s MLP while a method scales outputs (a :class:`~vlm_compress.patching.Patched`)."""
        out = original(x)
        weights = self._mlp_scales.get(index)
        return out * weights if weights is not None else out

    def _step_layer(self, i: int, original: Callable[..., Any], hidden: torch.Tensor, kwargs: dict) -> Any:
        slots = self.slots
        b, q, _ = hidden.shape
        query = slots.length + torch.arange(q, device=hidden.device).expand(b, q)
        slots.positions[i] = torch.cat([slots.positions[i], query], dim=1)
        if not slots.reshaped:
            return original(hidden, **kwargs)
        call = dict(kwargs)
        allowed = slots.step_allowed(i, query) if q == 1 else slots.allowed(i, query)
        call["attention_mask"] = self._mask(allowed, hidden.dtype) if allowed is not None else None
        observers = [p for p in self.policies if p.observes_steps()] if q == 1 else []
        if not observers:
            return original(hidden, **call)
        self._capture = i
        try:
            out = original(hidden, **call)
        finally:
            self._capture = None
        started = time.perf_counter()
        query = self._step_queries.pop(i, None)
        if query is None:
            raise RuntimeError(
                f"decoder layer {i} did not call self_attn.q_proj during the decode step; step-observing decode "
                "policies (h2o with rolling=True) need Llama-style attention — pass rolling=False"
            )
        view = StepLayerView(self.layers[i], i, query, kwargs, allowed[:, 0] if allowed is not None else None)
        for policy in observers:
            policy.observe_step(i, self.ctx, view)
        self.record.step_select_s += time.perf_counter() - started
        return out

    # -- cache edits (decode policies, MustDrop's stage 3) ---------------------------------------------------
    def keep_slots(self, cache: Any, layer: int, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the ``keep`` [B, K] slots of layer ``layer``'s cache (and their slot positions), in order.

        Samples keeping fewer slots than the batch maximum are padded with dropped slots re-marked as padding (-1).
        Returns (index [B, K'], real [B, K']): the old slot each new one holds, and which are not padding, for
        callers that keep per-slot state of their own.
        """
        slots = self.slots
        index, real = pack(keep, dummy=0)  # padding entries re-use slot 0, re-marked as padding below
        slots.positions[layer] = torch.where(real, torch.gather(slots.positions[layer], 1, index), -1)
        slots.key_valid.pop(layer, None)  # rebuilt from the new positions at the next step
        keys, values = compat.layer_entries(cache, layer)
        gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        compat.replace_layer_entries(cache, layer, torch.gather(keys, 2, gather), torch.gather(values, 2, gather))
        slots.reshaped = True
        return index, real

    def replace_with_last(self, cache: Any, layer: int, drop: torch.Tensor,
                          state: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        """Evict slot ``drop[b]`` [B] of every row of layer ``layer``'s cache by moving the row's last slot (the
        step's own entry) into it, then dropping the last column: one slot out per row at the cost of one entry's
        copy, not the whole cache's. Slot order carries no meaning (masks come from slot positions). ``state``:
        the caller's per-slot tensors [B, K], moved the same way and returned [B, K - 1]."""
        slots = self.slots
        at = drop[:, None]
        k = slots.positions[layer].shape[1] - 1

        def moved(x: torch.Tensor, dim: int) -> torch.Tensor:
            """x with its last entry along ``dim`` written over entry ``drop[b]`` of row b, then cut to k."""
            shape = list(x.shape)
            shape[dim] = 1
            index = at.view([x.shape[0]] + [1] * (x.dim() - 1)).expand(shape)
            last = x.narrow(dim, k, 1).clone()  # not a view of what the scatter writes
            x = x.scatter(dim, index, last) if x.requires_grad else x.scatter_(dim, index, last)
            return x.narrow(dim, 0, k)

        slots.positions[layer] = moved(slots.positions[layer], 1)
        known = slots.key_valid.get(layer)
        if known is not None and known.shape[1] == k + 1:
            slots.key_valid[layer] = moved(known, 1)
        else:
            slots.key_valid.pop(layer, None)
        keys, values = compat.layer_entries(cache, layer)
        compat.replace_layer_entries(cache, layer, moved(keys, 2), moved(values, 2))
        return tuple(moved(x, 1) for x in state)

    # -- statistics ------------------------------------------------------------------------------------------
    def last_prompt_counts(self) -> "PromptCounts | None":
        """Per sample and layer, the last prompt's processed, visual and cached tokens (``None`` without one)."""
        if self.record is None or len(self.record.tokens) != len(self.layers) or self.slots is None:
            return None
        s = self.ctx.visual.shape[1]
        cached = []
        for positions in self.slots.positions:
            prompt = (positions >= 0) & (positions < s)
            prompt &= torch.gather(self.ctx.valid, 1, positions.clamp(0, s - 1))
            cached.append(prompt.sum(dim=1))
        return PromptCounts(
            tokens=torch.stack(self.record.tokens, dim=1).tolist(),
            visual=torch.stack(self.record.visual, dim=1).tolist(),
            cached=torch.stack(cached, dim=1).tolist(),
        )

    def cache_bytes(self, element_size: int) -> int:
        """Bytes of K and V now held for non-padding tokens, over all layers and samples."""
        if self.slots is None or any(p is None for p in self.slots.positions):
            return 0
        tokens = sum(int(self.slots.cached_tokens(i).sum()) for i in range(len(self.layers)))
        return tokens * kv_entry_bytes(self.adapter.text_config, element_size)

    def stats(self, base: CompressionStats | None, element_size: int) -> CompressionStats | None:
        """The last prefill's stats: ``base`` (the encoder stage's, if any) with the in-LLM costs filled in."""
        if self.record is None or len(self.record.tokens) != len(self.layers):
            return base
        ctx, text_config = self.ctx, self.adapter.text_config
        tokens = torch.stack(self.record.tokens, dim=1).tolist()  # [B][L]
        visual = torch.stack(self.record.visual, dim=1).double()  # [B, L]
        images = max(int(ctx.images.sum()), 1)
        if base is None:
            lengths = ctx.valid.sum(dim=1).tolist()
            flops_full, kv_full = prompt_costs(lengths, text_config, element_size)
            entering = (ctx.visual & ctx.valid).sum(dim=1)
            per_image = [int(n) // max(int(k), 1) for n, k in zip(entering.tolist(), ctx.images.tolist()) for _ in range(int(k))]
            base = CompressionStats(
                images=images, visual_tokens_in=int(entering.sum()), visual_tokens_kept=int(entering.sum()),
                layer_avg_visual_tokens=0.0, prompt_tokens_in=sum(lengths), prompt_tokens_llm=sum(lengths),
                prefill_flops=flops_full, prefill_flops_full=flops_full, kv_cache_bytes=kv_full,
                kv_cache_bytes_full=kv_full, encode_ms=0.0, select_ms=0.0, kept_per_image=per_image,
            )
        per_layer = (visual.sum(dim=0) / images).tolist()
        return dataclasses.replace(
            base,
            layer_avg_visual_tokens=sum(per_layer) / len(per_layer),
            layer_visual_tokens=per_layer,
            prefill_flops=prefill_flops(tokens, text_config),
            kv_cache_bytes=kv_cache_bytes(tokens, text_config, element_size),
            select_ms=base.select_ms + self.record.select_s * 1e3,
        )

"""Base of in-LLM ("prefill" stage) methods: a token plan decided layer by layer while the prompt is prefilled.

A method sees a :class:`PrefillContext` (which prompt positions are visual, valid, still alive) and answers two
questions: which tokens layer ``l`` processes (:meth:`PrefillPruner.layer_tokens`, default: the alive set), and,
after a layer it scores at, which tokens survive (:meth:`PrefillPruner.after_layer`). Gathering, masks, RoPE and
the per-layer KV caches are the stage's job (``stages/prefill.py``), never the method's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import torch

from ..config import MethodConfig


@dataclasses.dataclass
class PrefillContext:
    """One prompt batch as the LLM sees it. All masks are ``[B, S]`` over the (possibly encoder-shortened) prompt.

    ``visual``: image placeholder positions (newlines included). ``valid``: non-padding. ``alive``: tokens the
    next layer processes under a monotone plan; methods shrink it in :meth:`PrefillPruner.after_layer`.
    ``protected``: visual tokens a method must never drop (MustDrop's key set), all False by default.
    ``images``: [B] images per sample. ``num_layers``: decoder layers.
    """

    visual: torch.Tensor
    valid: torch.Tensor
    alive: torch.Tensor
    protected: torch.Tensor
    images: torch.Tensor
    num_layers: int
    extras: dict = dataclasses.field(default_factory=dict)  # per-method scratch space for one prompt

    @property
    def text_after_image(self) -> torch.Tensor:
        """[B, S] valid tokens after each sample's last visual token (MustDrop's text rows)."""
        s = self.visual.shape[1]
        positions = torch.arange(s, device=self.visual.device)
        last = torch.where(self.visual, positions, -1).amax(dim=1, keepdim=True)
        return self.valid & (positions > last) & (last >= 0)

    @property
    def last_token(self) -> torch.Tensor:
        """[B, S] the last valid position of each sample (FastV's scoring row)."""
        s = self.visual.shape[1]
        positions = torch.arange(s, device=self.visual.device)
        last = torch.where(self.valid, positions, -1).amax(dim=1, keepdim=True)
        return positions == last

    @property
    def visual_alive(self) -> torch.Tensor:
        """[B] visual tokens still alive per sample."""
        return (self.alive & self.visual).sum(dim=1)


class LayerView(Protocol):
    """What a method may read of one decoder layer right after it ran on the prompt (given to
    :meth:`PrefillPruner.after_layer` and :meth:`DecodePolicy.observe`; ``stages/prefill.py`` implements it).

    Everything is computed on first use only, so a method pays for what it asks and nothing else. Prompt positions
    the layer did not process are zeros (``keys``) or their pass-through hidden state (``output``).
    """

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, S] bool → head-mean post-softmax attention of those rows over the layer's keys, scattered to
        prompt positions: [B, R, S] (R = the most rows of any sample; padding rows are zero)."""

    def received(self, *groups: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """groups: masks [B, S] → for each, [B, S] the attention its rows give every prompt position, summed over
        the group's rows (``self(group).sum(dim=1)``, from one pass over all the groups' rows together)."""

    def keys(self) -> torch.Tensor:
        """[B, S, H_kv·hd] the layer's keys as its KV cache holds them (RoPE applied), heads concatenated, at
        their prompt positions."""

    def output(self, normed: bool = False) -> torch.Tensor:
        """[B, S, D] the layer's output hidden states; ``normed``: passed through the LLM's final norm (the one
        before the LM head)."""



@dataclasses.dataclass
class PrefillPruner(MethodConfig):
    """Base config of an in-LLM method. Subclasses override the hooks they need."""

    stage: ClassVar[str] = "prefill"

    def check(self, num_layers: int) -> None:
        """Raise a ``ValueError`` naming the fix if the method cannot run on an LLM of ``num_layers`` layers."""

    def check_text_config(self, text_config: Any) -> None:
        """Raise a ``ValueError`` if trained parts of the method (e.g. routers) do not fit this LLM."""

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers after which :meth:`after_layer` is called (with a :class:`LayerView` of that layer)."""
        return ()

    def start(self, ctx: PrefillContext) -> None:
        """Called once per prompt batch, before layer 0."""

    def layer_tokens(self, layer: int, ctx: PrefillContext, hidden: torch.Tensor) -> torch.Tensor | None:
        """[B, S] bool: the tokens layer ``layer`` processes; ``None`` means ``ctx.alive``."""
        return None

    def token_scales(self, layer: int, ctx: PrefillContext) -> torch.Tensor | None:
        """[B, S] per-token weights for layer ``layer`` (p-MoD's STRing), asked right after :meth:`layer_tokens`:
        the MLP output of processed tokens and the hidden state of skipped ones are multiplied by them."""
        return None

    def key_bias(self, layer: int, ctx: PrefillContext) -> torch.Tensor | None:
        """[B, S] additive attention bias on each key in layer ``layer`` (log of a soft keep mask, for training
        methods with differentiable pruning such as ATP); ``None``: plain masks."""
        return None

    def after_layer(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        """Update ``ctx.alive`` (and anything else) after scoring layer ``layer`` ran; ``attention(rows)`` gives
        row attention, ``attention.keys()`` / ``attention.output()`` the layer's keys and outputs."""

    def finish(self, stage: Any, cache: Any) -> None:
        """Called once after the prompt's last layer (MustDrop's stage 3 shrinks the caches here)."""


@dataclasses.dataclass
class DecodePolicy(MethodConfig):
    """Base of decode-stage methods: observe the prompt's attention while it is prefilled, then edit the caches
    after every forward through ``stage.keep_slots`` (the per-layer slot bookkeeping of ``stages/prefill.py``).

    A decode policy never changes what the prompt's prefill computes (its first-token logits are the uncompressed
    model's); it shrinks what later steps attend to, and so the KV memory and the per-step attention cost.
    """

    stage: ClassVar[str] = "decode"

    def check(self, num_layers: int) -> None:
        """Raise a ``ValueError`` naming the fix if the policy cannot run on this LLM."""

    def observe(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        """Called after every layer of a prompt's prefill, with a :class:`LayerView` of that layer."""

    def apply(self, stage: Any, cache: Any, prompt: bool) -> None:
        """Called after every forward (``prompt`` for the prefill) to edit ``cache``'s layers."""

    def observes_steps(self) -> bool:
        """Whether :meth:`observe_step` is called on every decode step (the stage then keeps each step's query)."""
        return False

    def observe_step(self, layer: int, ctx: PrefillContext, attention: "StepView") -> None:
        """Called after layer ``layer`` ran on a one-token decode step whose layers hold edited caches."""

    def reorder(self, ctx: PrefillContext, beam_idx: torch.Tensor) -> None:
        """Beam search moved cache rows: row ``i`` is now old row ``beam_idx[i]``; reorder per-row state kept
        outside ``ctx``'s masks (the stage reorders those and its slot bookkeeping itself)."""


class StepView(Protocol):
    """What a decode policy may read of one decoder layer right after it ran on a one-token decode step (given to
    :meth:`DecodePolicy.observe_step`; ``stages/prefill.py`` implements it)."""

    def __call__(self) -> torch.Tensor:
        """[B, K] head-mean post-softmax attention of the step's query over the layer's cache slots, in slot order
        (the new token's own slot last); padding slots are zero."""

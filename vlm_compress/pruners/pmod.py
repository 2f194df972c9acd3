"""``pmod``: p-MoD's Mixture-of-Depths routing of visual tokens (Zhang et al., arXiv 2412.04449, ICCV 2025;
reference trained-tokenizers-speculative §1).

In every MoD layer a trained router scores the layer's input, ``w = 0.2·tanh(r) + 1`` (TanhNorm), and only the
``trunc(V·ratio_l)`` visual tokens with the highest scores go through the layer; text tokens always do. STRing
scales by ``w``: a processed visual token becomes ``x + Attn(x) + w·MLP(…)``, a skipped one ``w·x``. The ratio
decays with depth by the shifted-cosine schedule (:func:`~vlm_compress.modules.pmod.shifted_cos_ratios`). Routing
happens only while the prompt is prefilled; each layer's KV cache holds the tokens it processed, and decode
steps run every layer on the new token. Unlike token dropping, a token skipped by one layer can be processed by
the next (a non-monotone plan).

Needs routers trained with the LLM: ``routers=PATH`` (default: the embedded ``tiny-llava-pmod``, fine-tuned by
``python -m vlm_compress.bench.train_pmod``; load its model with :func:`~vlm_compress.modules.pmod.load_pmod_model`).
On a model not fine-tuned with them the routing runs but its choices mean nothing.

The last layer's router never learns: its weights only scale the visual tokens' MLP outputs and skipped states,
which nothing after the last layer reads (the loss sits on text positions, and that layer's keys come from its
input). It stays at zero, so the last layer keeps the first visual tokens by position (ties go to the lower
index). By our reading of the official code (loss on text positions only, weight decay 0) the released 32-layer
models' layer-31 routers are zero too.

Budget: the layer-averaged share of visual tokens. The schedule's ``R̄`` is solved so the average does not exceed
the budget (the official ``R̄ = 0.5`` on 32 layers is a budget of 0.537); ``router_factor`` sets ``R̄`` directly
and ``ratios`` sets every layer's share (``None`` for a dense layer), both overriding the budget.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from ..budget import visual_share
from ..modules.pmod import TokenRouters, router_factor_for, shifted_cos_ratios, tanh_norm
from ..registry import register_method
from .fastv import top_visual
from .llm_base import PrefillContext, PrefillPruner

EMBEDDED_ROUTERS = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava-pmod"


@functools.lru_cache(maxsize=4)
def load_routers(path: str) -> TokenRouters:
    """The routers at ``path``, loaded once per process (training updates this very module)."""
    return TokenRouters.load(path)


@register_method("pmod")
@dataclasses.dataclass
class PModPruner(PrefillPruner):
    """p-MoD: trained routers pick the visual tokens each layer processes; STRing scales by the router weight."""

    routers: str = dataclasses.field(
        default=str(EMBEDDED_ROUTERS),
        metadata={"help": "Directory of trained routers (pmod_config.json + routers.safetensors)."},
    )
    router_factor: float | None = dataclasses.field(
        default=None, metadata={"help": "R̄ of the schedule (official 0.5); overrides the budget."}
    )
    ratios: tuple[float | None, ...] | None = dataclasses.field(
        default=None, metadata={"help": "Per-layer share of visual tokens processed (None: dense); overrides both."}
    )
    max_ratio: float = dataclasses.field(
        default=0.85, metadata={"help": "Layers above this ratio stay dense (official).", "range": (0, 1)}
    )
    min_ratio: float = dataclasses.field(default=0.15, metadata={"help": "Floor of the ratio (official).", "range": (0, 1)})
    weight_scale: float = dataclasses.field(default=0.2, metadata={"help": "TanhNorm α: w = α·tanh(r) + 1 (official)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratios is not None:
            if any(r is not None and not 0.0 <= r <= 1.0 for r in self.ratios):
                raise ValueError(f"pmod ratios must be None (dense) or in [0, 1], got {self.ratios}")

    def module(self) -> TokenRouters:
        try:
            return load_routers(str(self.routers))
        except ValueError as err:
            raise ValueError(f"{err}; pass routers=PATH, or train the embedded ones with "
                             "python -m vlm_compress.bench.train_pmod") from None

    def schedule(self, num_layers: int, share: float) -> list[float | None]:
        """Per-layer share of visual tokens processed (``None``: dense) for a layer-averaged ``share``."""
        if self.ratios is not None:
            return list(self.ratios)
        factor = self.router_factor
        if factor is None:
            factor = router_factor_for(share, num_layers, self.max_ratio, self.min_ratio)
        ratios = shifted_cos_ratios(num_layers, factor, self.max_ratio, self.min_ratio)
        return [None if r >= 1.0 else r for r in ratios]

    def _check_schedule(self, schedule: list[float | None], num_layers: int) -> None:
        if len(schedule) != num_layers:
            raise ValueError(f"pmod ratios give {len(schedule)} layers; the LLM has {num_layers}")
        routed = [layer for layer, r in enumerate(schedule) if r is not None]
        missing = sorted(set(routed) - set(self.module().layers))
        if missing:
            raise ValueError(
                f"the schedule routes layers {routed} but the routers at {self.routers} cover {self.module().layers} "
                f"(missing {missing}); raise the budget or pass routers trained for those layers"
            )

    def check(self, num_layers: int) -> None:
        if isinstance(self.budget, float) or self.ratios is not None or self.router_factor is not None:
            share = self.budget if isinstance(self.budget, float) else 1.0
            if self.ratios is None and self.router_factor is None and share < self.min_ratio:
                raise ValueError(f"budget {share} is below pmod's floor min_ratio={self.min_ratio}; lower min_ratio")
            self._check_schedule(self.schedule(num_layers, share), num_layers)

    def check_text_config(self, text_config) -> None:
        if self.module().hidden_size != text_config.hidden_size:
            raise ValueError(f"the routers at {self.routers} take {self.module().hidden_size}-d inputs; this LLM is "
                             f"{text_config.hidden_size}-d: pass routers=PATH trained for it")

    def start(self, ctx: PrefillContext) -> None:
        rows = []
        for share in visual_share(self.budget, ctx.visual_alive, ctx.images).tolist():
            schedule = self.schedule(ctx.num_layers, share)
            self._check_schedule(schedule, ctx.num_layers)
            rows.append([float("nan") if r is None else r for r in schedule])
        ctx.extras["pmod_ratios"] = torch.tensor(rows, dtype=torch.float64)  # [B, L], NaN: dense

    def layer_tokens(self, layer: int, ctx: PrefillContext, hidden: torch.Tensor) -> torch.Tensor | None:
        ratio = ctx.extras["pmod_ratios"][:, layer]
        if bool(ratio.isnan().all()):
            return None
        targets = ctx.visual & ctx.valid
        ratio = ratio.to(hidden.device)
        routes = ~ratio.isnan()  # samples whose schedule routes this layer
        logits = self.module().to(hidden.device)(layer, hidden)  # [B, S]
        count = torch.floor(targets.sum(dim=1).double() * ratio.nan_to_num(1.0)).long()  # official: trunc
        chosen = top_visual(logits.detach().float(), targets, count)
        weights = tanh_norm(logits, self.weight_scale)
        ctx.extras["pmod_weights"] = torch.where(targets & routes[:, None], weights, torch.ones_like(weights))
        return torch.where(routes[:, None], chosen, targets) | ~ctx.visual

    def token_scales(self, layer: int, ctx: PrefillContext) -> torch.Tensor | None:
        return ctx.extras.pop("pmod_weights", None)

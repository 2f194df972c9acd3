"""``atp``: ATP-LLaVA's instance- and layer-wise adaptive pruning with Spatial Augmented Pruning (Ye et al.,
CVPR 2025, arXiv 2412.00447; reference pruning-methods §4). Not the official method: no code or weights exist.

After each ATP layer, every alive visual token gets two scores from that layer's attention (computed from q/k,
head mean, post-softmax):

* redundancy: ``S_red = (S_self + S_cross)/2``, with ``S_cross`` the mean attention the text after the image gives
  the token and ``S_self`` the mean attention the visual tokens give it;
* spatial: ``S_spat``, a coarse-to-fine lattice order of the image grid (1 for the coarsest cell, falling towards 0
  for the finest), so ``S_spat > θ_s`` keeps a uniform spatial sample whose density grows as ``θ_s`` falls.

A token survives iff ``S_red > θ_r`` or ``S_spat > θ_s`` (SAP's OR of the two criteria). Thresholds:

* learned (``heads=PATH``, default the embedded ones): ``(θ_r, θ_s) = sigmoid(MLP([mean S_self, mean S_cross, β]))``
  per sample and ATP layer, so the number kept adapts to the instance; the budget ``β`` is met on average over the
  data the heads were trained on (``python -m vlm_compress.bench.train_atp``), not per prompt;
* training-free (``heads=None``): per sample and stage, ``θ_s`` keeps ``spatial_share`` of the stage's target
  count by the lattice order and ``θ_r`` the rest by ``S_red``; the target counts meet the layer-averaged budget
  as MustDrop's budget mode does (each stage keeps the same share of the previous one's tokens).

Our guesses, since the paper text and code were not available to us:

1. ATP layers: ``(2, 8, 16)`` of 32 scaled to the depth (``round(l·L/32)``, at most ``L − 2``).
2. Scores are post-softmax probabilities for both terms (the reimplementation uses logits for ``S_self``; head
   means of logits rank badly on our models, see ``eval/results/investigate_encoder_scores.md``). ``S_self`` is
   divided by the number of visual queries that can see each key (causal masking would favour early tokens), and
   both scores are divided by their maximum over the sample's alive visual tokens, so thresholds live in [0, 1].
3. The spatial order: cells whose row and column are both multiples of a larger power of two come first; ties in
   raster order. Non-square images (AnyRes with newlines) use the 1-D index.
4. The threshold MLP takes the budget as a third input (one head for every budget); 3 → 16 → 2, GELU.
5. Training (``soft=True``): the masks are ``max(σ((S_red − θ_r)·T), σ((S_spat − θ_s)·T))``, multiplied over ATP
   layers and applied as a log-bias on the attention to each visual key in the later layers; nothing is dropped.
   ``T = 50``: the reimplementation's ``T = 10`` on our [0, 1] scores leaves masks so soft that the heads learn
   thresholds the hard rule pays for (tiny-llava, 10 min each, validation split at the last step: 0.848 at a
   layer-averaged share of 0.52 with ``T = 10`` against 0.906 at 0.51 with ``T = 50``). The budget loss is
   ``(layer-averaged soft share − β)²`` over the batch (the paper's "budget-constrained loss"; its exact form is
   unknown to us).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

from ..budget import visual_share
from ..modules.atp import ThresholdHeads
from ..registry import register_method
from .fastv import top_visual
from .llm_base import PrefillContext, PrefillPruner, LayerView
from .mustdrop_llm import staged_counts

EMBEDDED_HEADS = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava-atp"
EMBEDDED = "embedded"  # the default `heads`: the ones shipped for tiny-llava, refused on other LLMs
_TRAINED_FOR = Path(__file__).resolve().parents[1] / "assets" / "tiny-llava" / "config.json"
_LLM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@functools.lru_cache(maxsize=4)
def load_heads(path: str) -> ThresholdHeads:
    """The heads at ``path``, loaded once per process (training updates this very module)."""
    return ThresholdHeads.load(path)


@functools.lru_cache(maxsize=32)
def lattice_order(n: int) -> torch.Tensor:
    """[n] spatial score in (0, 1] of each token of an image of ``n`` tokens in raster order: coarse lattice first.

    A square grid ranks cell (r, c) by the largest power of two dividing both r and c (0 counts as divisible by
    all), then by raster index; other sizes rank the 1-D index the same way. Score = 1 − rank/n. Cached: do not
    modify the result.
    """
    g = math.isqrt(n)
    index = torch.arange(n)
    rows, cols = (index // g, index % g) if g * g == n else (torch.zeros_like(index), index)

    def twos(x: torch.Tensor) -> torch.Tensor:  # trailing zero bits, 0 → 31
        return torch.where(x == 0, 31, (x & -x).float().log2().round().long())

    level = torch.minimum(twos(rows), twos(cols))
    order = torch.argsort(-level * n + index)  # coarser level first, then raster index
    rank = torch.empty(n)
    rank[order] = torch.arange(n, dtype=torch.float32)
    return 1.0 - rank / n


def spatial_scores(visual: torch.Tensor) -> torch.Tensor:
    """[B, S] :func:`lattice_order` of every contiguous run of visual tokens (one run per image), 0 elsewhere."""
    b, s = visual.shape
    position = torch.arange(s, device=visual.device).expand(b, s)
    before = torch.cat([visual.new_zeros(b, 1), visual[:, :-1]], dim=1)
    after = torch.cat([visual[:, 1:], visual.new_zeros(b, 1)], dim=1)
    start = torch.where(visual & ~before, position, -1).cummax(dim=1).values  # first position of each token's run
    end = torch.where(visual & ~after, position, s).flip(1).cummin(dim=1).values.flip(1)  # its last position
    length, offset = end - start + 1, position - start
    out = torch.zeros(visual.shape, dtype=torch.float32, device=visual.device)
    for n in length[visual].unique().tolist():  # one lookup per distinct image size
        members = visual & (length == n)
        out[members] = lattice_order(n).to(visual.device)[offset[members]]
    return out


def _normalised(score: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    score = score.masked_fill(~where, 0.0)
    return score / score.amax(dim=1, keepdim=True).clamp(min=1e-12)


@register_method("atp")
@dataclasses.dataclass
class ATPPruner(PrefillPruner):
    """ATP: learned (or solved) per-instance thresholds on redundancy and spatial scores at a few LLM layers."""

    heads: str | None = dataclasses.field(
        default=EMBEDDED,
        metadata={"help": "Directory of trained threshold heads; 'embedded': the ones trained for the embedded "
                          "tiny-llava (refused on other LLMs unless passed as a path); None: training-free thresholds."},
    )
    layers_of_32: tuple[int, ...] = dataclasses.field(
        default=(2, 8, 16), metadata={"help": "ATP layers of a 32-layer LLM, scaled to the depth (our guess)."}
    )
    spatial_share: float = dataclasses.field(
        default=0.25, metadata={"help": "Training-free: share of each stage's kept tokens sampled spatially (guess).",
                                "range": (0, 1)}
    )
    temperature: float = dataclasses.field(
        default=50.0, metadata={"help": "Soft-mask temperature T in training (module docstring, guess 5).", "above": 0}
    )
    soft: bool = dataclasses.field(
        default=False, metadata={"help": "Training: soft masks as attention bias, no drops."}
    )

    def heads_path(self) -> str | None:
        return str(EMBEDDED_HEADS) if self.heads == EMBEDDED else self.heads

    def check_text_config(self, text_config) -> None:
        if self.heads != EMBEDDED:
            return  # the user chose these heads
        trained = json.loads(_TRAINED_FOR.read_text())["text_config"]
        differ = [f for f in _LLM_FIELDS if trained.get(f) != getattr(text_config, f, None)]
        if differ:
            raise ValueError(
                f"atp's default heads were trained for the embedded tiny-llava, whose LLM differs from this one "
                f"({', '.join(differ)}); pass heads=PATH trained for this model (python -m vlm_compress.bench."
                f"train_atp), heads=None for training-free thresholds, or heads={str(EMBEDDED_HEADS)!r} to use them anyway"
            )

    def module(self) -> ThresholdHeads:
        try:
            return load_heads(str(self.heads_path()))
        except ValueError as err:
            raise ValueError(f"{err}; pass heads=PATH, heads=None for the training-free variant, or train the "
                             "embedded ones with python -m vlm_compress.bench.train_atp") from None

    def scoring_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(sorted({min(num_layers - 2, round(l * num_layers / 32)) for l in self.layers_of_32}))

    def check(self, num_layers: int) -> None:
        if num_layers < 2:
            raise ValueError("atp needs an LLM of at least 2 layers")
        layers = self.scoring_layers(num_layers)
        first = layers[0] + 1
        if isinstance(self.budget, float) and self.budget < first / num_layers:
            raise ValueError(
                f"budget {self.budget} is below what atp can reach on a {num_layers}-layer LLM (minimum "
                f"{first / num_layers:.3f}: layers up to the first ATP layer see every token); raise the budget"
            )
        if self.heads is not None:
            missing = sorted(set(layers) - set(self.module().layers))
            if missing:
                raise ValueError(f"the heads at {self.heads} cover layers {self.module().layers}; this LLM's ATP "
                                 f"layers are {list(layers)}: pass heads trained for it, or heads=None")

    def start(self, ctx: PrefillContext) -> None:
        ctx.extras["atp_spatial"] = spatial_scores(ctx.visual)
        ctx.extras["atp_share"] = visual_share(self.budget, ctx.visual_alive, ctx.images)
        ctx.extras["atp_stage"] = 0
        if self.soft:
            ctx.extras["atp_soft"] = torch.ones(ctx.visual.shape, device=ctx.visual.device)
            ctx.extras["atp_soft_after"] = {}
        if self.heads is None:
            first_drop = [layer + 1 for layer in self.scoring_layers(ctx.num_layers)]
            ctx.extras["atp_counts"] = staged_counts(ctx.visual_alive, ctx.extras["atp_share"], first_drop,
                                                     ctx.num_layers)

    def scores(self, ctx: PrefillContext, attention: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_self, S_cross), each [B, S] in [0, 1] over the alive visual tokens (0 elsewhere)."""
        alive = ctx.alive & ctx.visual
        text = ctx.text_after_image
        received_cross, received_self = attention.received(text, alive)
        cross = received_cross / text.sum(dim=1, keepdim=True).clamp(min=1)
        seen_by = torch.flip(torch.cumsum(torch.flip(alive.long(), [1]), dim=1), [1])  # alive visual rows at ≥ j
        self_ = received_self / seen_by.clamp(min=1)
        return _normalised(self_.detach(), alive), _normalised(cross.detach(), alive)

    def thresholds(self, layer: int, ctx: PrefillContext, s_self: torch.Tensor, s_cross: torch.Tensor) -> torch.Tensor:
        """[B, 2] (θ_r, θ_s) from the learned head of ``layer``."""
        alive = (ctx.alive & ctx.visual).float()
        count = alive.sum(dim=1).clamp(min=1)
        stats = torch.stack([(s_self * alive).sum(1) / count, (s_cross * alive).sum(1) / count,
                             ctx.extras["atp_share"].to(alive)], dim=1)
        return self.module().to(stats.device)(layer, stats).float()

    def after_layer(self, layer: int, ctx: PrefillContext, attention: LayerView) -> None:
        if bool((ctx.extras["atp_share"] >= 1.0).all()) and not self.soft:
            return  # a full budget keeps every token: nothing to score
        s_self, s_cross = self.scores(ctx, attention)
        redundancy, spatial = (s_self + s_cross) / 2, ctx.extras["atp_spatial"]
        alive = ctx.alive & ctx.visual
        stage = ctx.extras["atp_stage"]
        ctx.extras["atp_stage"] = stage + 1
        if self.heads is None:
            keep = self._solved_keep(ctx, alive, redundancy, spatial, ctx.extras["atp_counts"][:, stage])
        else:
            theta = self.thresholds(layer, ctx, s_self, s_cross)
            if self.soft:
                t = self.temperature
                mask = torch.maximum(torch.sigmoid((redundancy - theta[:, :1]) * t),
                                     torch.sigmoid((spatial - theta[:, 1:]) * t))
                ctx.extras["atp_soft"] = ctx.extras["atp_soft"] * torch.where(ctx.visual, mask, 1.0)
                ctx.extras["atp_soft_after"][layer] = ctx.extras["atp_soft"]
                return
            keep = alive & ((redundancy > theta[:, :1]) | (spatial > theta[:, 1:]))
            keep |= alive & (ctx.extras["atp_share"] >= 1.0).to(alive.device)[:, None]  # a full budget keeps all
        ctx.alive = (ctx.alive & ~ctx.visual) | keep | (alive & ctx.protected)

    def _solved_keep(self, ctx: PrefillContext, alive: torch.Tensor, redundancy: torch.Tensor,
                     spatial: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        candidates = alive & ~ctx.protected
        target = (target - (alive & ctx.protected).sum(dim=1)).clamp(min=0)
        by_space = top_visual(spatial, candidates, torch.floor(target * self.spatial_share + 0.5).long())
        rest = target - by_space.sum(dim=1)
        return by_space | top_visual(redundancy, candidates & ~by_space, rest)

    def key_bias(self, layer: int, ctx: PrefillContext) -> torch.Tensor | None:
        if not self.soft or not ctx.extras.get("atp_soft_after"):
            return None
        return torch.log(ctx.extras["atp_soft"].clamp(min=1e-6))

    def soft_layer_average(self, ctx: PrefillContext) -> torch.Tensor:
        """[B] training: the layer-averaged soft share of visual tokens (1 before the first ATP layer)."""
        visual = (ctx.visual & ctx.valid).float()
        count = visual.sum(dim=1).clamp(min=1)
        after = ctx.extras["atp_soft_after"]
        total, current = 0.0, torch.ones(visual.shape[0], device=visual.device)
        for layer in range(ctx.num_layers):
            total = total + current
            if layer in after:
                current = (after[layer] * visual).sum(dim=1) / count
        return total / ctx.num_layers

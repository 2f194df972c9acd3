"""p-MoD's trained parts (Zhang et al., arXiv 2412.04449, ICCV 2025; reference trained-tokenizers-speculative §1).

* :func:`shifted_cos_ratios`: progressive ratio decay, the official ``shifted_cos_with_ratio`` schedule with the
  hard-coded ``31`` generalised to ``L − 1`` (§1.3, §1.9).
* :func:`tanh_norm`: TanhNorm, ``w = 0.2·tanh(r) + 1`` (``mod_weight_norm = "tanh_0.2_1"``, §1.2).
* :class:`TokenRouters`: one zero-initialised ``Linear(d, 1, bias=True)`` per MoD layer (``mod_special_init``).
* Weight deltas: p-MoD fine-tunes the LLM together with the routers; a checkpoint here is the routers plus the
  fine-tuned decoder layers stored as fp16 differences from a base model (:func:`load_pmod_model`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

CONFIG = "pmod_config.json"
ROUTERS = "routers.safetensors"
DELTAS = "llm_delta.safetensors"


def shifted_cos_ratios(num_layers: int, router_factor: float = 0.5, max_ratio: float = 0.85,
                       min_ratio: float = 0.15) -> list[float]:
    """Share of the target (visual) tokens each layer processes; 1.0 marks a dense layer.

    ``R(l) = cos(l·π/(L−1))/2 + R̄``; layers with ``R(l) > max_ratio`` stay dense, the others keep
    ``max(R(l), min_ratio)``. Defaults: ``shiftedcos_decay_0.85_0.15`` with ``R̄ = 0.5`` (p-MoD training scripts).
    """
    if num_layers < 2:
        raise ValueError(f"the shifted-cosine schedule needs at least 2 layers, got {num_layers}")
    ratios = []
    for layer in range(num_layers):
        r = math.cos(layer * math.pi / (num_layers - 1)) / 2 + router_factor
        ratios.append(1.0 if r > max_ratio else max(r, min_ratio))
    return ratios


def router_factor_for(budget: float, num_layers: int, max_ratio: float = 0.85, min_ratio: float = 0.15) -> float:
    """The largest ``R̄`` whose schedule's layer-averaged share does not exceed ``budget`` (bisection).

    The average is monotone in ``R̄`` but jumps where a layer turns dense, so it can fall short of ``budget``.
    """
    def average(factor: float) -> float:
        return sum(shifted_cos_ratios(num_layers, factor, max_ratio, min_ratio)) / num_layers

    lo, hi = -1.0, 2.0  # average(lo) = min_ratio, average(hi) = 1
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) <= budget else (lo, mid)
    return lo


def tanh_norm(logits: torch.Tensor, scale: float = 0.2) -> torch.Tensor:
    """TanhNorm: router logits → token weights in ``(1 − scale, 1 + scale)``, exactly 1 for a zero router."""
    return scale * torch.tanh(logits) + 1.0


class TokenRouters(nn.Module):
    """One ``Linear(d, 1)`` router per MoD layer, zero-initialised so every weight starts at exactly 1.

    ``layers``: the decoder layers that route (the schedule's non-dense layers when trained).
    """

    def __init__(self, hidden_size: int, layers: list[int]):
        super().__init__()
        self.hidden_size = hidden_size
        self.layers = list(layers)
        self.routers = nn.ModuleDict({str(layer): nn.Linear(hidden_size, 1, bias=True) for layer in self.layers})
        for router in self.routers.values():
            nn.init.zeros_(router.weight)
            nn.init.zeros_(router.bias)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits of layer ``layer`` for its input ``hidden`` [B, S, D] (before RMSNorm): [B, S]."""
        router = self.routers[str(layer)]
        return router(hidden.to(router.weight.dtype))[..., 0]

    def save(self, path: str | Path, **config) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {**self._read_config(path), **config, "hidden_size": self.hidden_size, "layers": self.layers}
        (path / CONFIG).write_text(json.dumps(meta, indent=1))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path / ROUTERS)

    @staticmethod
    def _read_config(path: Path) -> dict:
        return json.loads((path / CONFIG).read_text()) if (path / CONFIG).exists() else {}

    @classmethod
    def load(cls, path: str | Path) -> "TokenRouters":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG).exists() or not (path / ROUTERS).exists():
            raise ValueError(f"{path} holds no p-MoD routers ({CONFIG} + {ROUTERS})")
        meta = cls._read_config(path)
        module = cls(meta["hidden_size"], meta["layers"])
        module.load_state_dict(load_file(path / ROUTERS))
        return module.eval()


def decoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM decoder layers' parameters of a LLaVA-style model, by name."""
    return {name: p for name, p in model.named_parameters() if ".language_model.layers." in name}


def save_deltas(model: nn.Module, base: nn.Module, path: str | Path) -> int:
    """Store ``model``'s decoder-layer weights as fp16 differences from ``base``'s; returns the file's bytes."""
    from safetensors.torch import save_file

    base_state = decoder_state(base)
    deltas = {name: (p.detach().float() - base_state[name].detach().float()).half().contiguous()
              for name, p in decoder_state(model).items()}
    file = Path(path) / DELTAS
    save_file(deltas, file)
    return file.stat().st_size


def is_pmod_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds p-MoD routers with decoder deltas (a fine-tuned model, not routers alone)."""
    return (Path(path) / CONFIG).exists() and (Path(path) / DELTAS).exists()


def pmod_base(path: str | Path) -> Path:
    """The base checkpoint a p-MoD checkpoint's deltas apply to (``base`` in its config, relative to ``path``)."""
    meta = TokenRouters._read_config(Path(path))
    if "base" not in meta:
        raise ValueError(f"{Path(path) / CONFIG} names no base model; pass base=PATH")
    return (Path(path) / meta["base"]).resolve()


def load_pmod_model(path: str | Path, base: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A p-MoD fine-tuned LLaVA model: the base checkpoint (``base``, else the one named in ``pmod_config.json``,
    relative to ``path``) with the stored decoder-layer deltas added. Route it with ``method="pmod"`` and
    ``routers=path``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    base = pmod_base(path) if base is None else base
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in load_file(path / DELTAS).items():
            if name not in params:
                raise ValueError(f"delta {name!r} does not match the base model at {base}")
            params[name].add_(delta.float())
    return model.to(dtype).eval()

"""ATP-LLaVA's learned threshold heads (Ye et al., CVPR 2025, arXiv 2412.00447; reference pruning-methods §4).

No official code or weights exist. What is ours (each a guess, documented in :mod:`vlm_compress.pruners.atp`):

* one head per ATP layer, ``MLP([mean S_self, mean S_cross, β]) → sigmoid → (θ_r, θ_s)``: the reference's
  two-statistic input plus the target budget ``β`` as a third input, so one trained head serves every budget;
* sizes: 3 → 16 → 2 with GELU.

The heads are tiny (~100 parameters per layer) and are trained with the LLM frozen (the paper's Tab. 3 reports
that training only the ATP modules works), so they run on the unchanged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CONFIG = "atp_config.json"
WEIGHTS = "atp.safetensors"


class ThresholdHeads(nn.Module):
    """Per ATP layer: statistics [B, 3] → thresholds (θ_r, θ_s) in (0, 1), [B, 2]."""

    def __init__(self, layers: list[int], hidden: int = 16, init_thresholds: tuple[float, float] = (0.5, 0.9)):
        super().__init__()
        self.layers = list(layers)
        self.hidden = hidden
        self.heads = nn.ModuleDict({str(layer): nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, 2))
                                    for layer in self.layers})
        for head in self.heads.values():  # start at fixed thresholds, whatever the statistics
            nn.init.zeros_(head[2].weight)
            head[2].bias.data = torch.logit(torch.tensor(init_thresholds))

    def forward(self, layer: int, stats: torch.Tensor) -> torch.Tensor:
        head = self.heads[str(layer)]
        return torch.sigmoid(head(stats.to(head[0].weight.dtype)))

    def save(self, path: str | Path, **config) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps({**config, "layers": self.layers, "hidden": self.hidden}, indent=1))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path / WEIGHTS)

    @classmethod
    def load(cls, path: str | Path) -> "ThresholdHeads":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
            raise ValueError(f"{path} holds no ATP threshold heads ({CONFIG} + {WEIGHTS})")
        meta = json.loads((path / CONFIG).read_text())
        module = cls(meta["layers"], meta["hidden"])
        module.load_state_dict(load_file(path / WEIGHTS))
        return module.eval()

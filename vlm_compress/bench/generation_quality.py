"""Quality proxies for generated class scenes (:mod:`.generation_data`): what FID and a classifier's accuracy are for
ImageNet generators, at the size of this toolkit's embedded models.

* :class:`TowerFeatures` — image features from the embedded ``tiny-llava``'s trained CLIP tower (the layer its
  projector reads, ``vision_feature_layer = -2``, averaged over patches; 64×64 scenes resized to its 96×96 input).
* :func:`frechet_distance` — the Fréchet distance between Gaussians fitted to two feature sets (FID's formula,
  Heusel et al. 2017, on these features instead of Inception's).
* :class:`SceneClassifier` — a small CNN trained on real class scenes and their ``tiny-vq`` reconstructions
  (``tiny-scene-classifier``): the share of generated images it assigns to the class they were generated for
  (:func:`accuracies`: the whole class, and its colour alone — the codes keep colour far better than shape).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import model_folder
from .generation_data import CLASSES, NUM_CLASSES

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER = ASSETS / "tiny-scene-classifier"
TOWER_MODEL = ASSETS / "tiny-llava"


@dataclasses.dataclass
class ClassifierConfig:
    num_classes: int = dataclasses.field(default=NUM_CLASSES, metadata={"help": "Classes predicted."})
    widths: list = dataclasses.field(default_factory=lambda: [32, 64, 128], metadata={
        "help": "Channels of the stride-2 convolution stages."})


class SceneClassifier(nn.Module):
    """Stride-2 conv + GroupNorm + SiLU stages, global average pooling, a linear head; ``[B, 3, 64, 64]`` in [0, 1] →
    logits ``[B, num_classes]``."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers, cin = [], 3
        for width in config.widths:
            layers += [nn.Conv2d(cin, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1).mean((2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        return torch.cat([self(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])

    def save_pretrained(self, path: str | Path) -> None:
        model_folder.write(path, dataclasses.asdict(self.config), self.state_dict(), torch.float16)

    @classmethod
    def from_pretrained(cls, path: str | Path = CLASSIFIER) -> "SceneClassifier":
        path = Path(path)
        model = cls(ClassifierConfig(**json.loads((path / model_folder.CONFIG_NAME).read_text())))
        model.load_state_dict({k: v.float() for k, v in model_folder.read_weights(path).items()})
        return model.eval()


def accuracies(predicted: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    """``{"class_accuracy", "colour_accuracy"}``: shares of ``predicted`` ``[B]`` equal to ``classes`` ``[B]``, and of
    those whose colour is the requested class's (a (shape, colour) pair, :data:`.generation_data.CLASSES`)."""
    colours = list(dict.fromkeys(colour for _, colour in CLASSES))
    colour = torch.tensor([colours.index(name) for _, name in CLASSES])  # [NUM_CLASSES] class → colour id
    return {"class_accuracy": float((predicted == classes).float().mean()),
            "colour_accuracy": float((colour[predicted] == colour[classes]).float().mean())}


class TowerFeatures:
    """Features ``[B, D]`` of images ``[B, 3, S, S]`` in [0, 1] from a LLaVA checkpoint's vision tower (module
    docstring); ``path`` defaults to the embedded ``tiny-llava``."""

    def __init__(self, path: str | Path = TOWER_MODEL):
        from transformers import LlavaForConditionalGeneration

        path = Path(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
        processor = json.loads((path / "processor_config.json").read_text())["image_processor"]
        self.tower = model.model.vision_tower.eval()
        self.layer = model.config.vision_feature_layer
        self.size = model.config.vision_config.image_size
        self.mean = torch.tensor(processor["image_mean"])[None, :, None, None]
        self.std = torch.tensor(processor["image_std"])[None, :, None, None]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch):
            x = F.interpolate(images[i:i + batch].float(), size=(self.size, self.size), mode="bicubic",
                              align_corners=False).clamp(0, 1)
            hidden = self.tower((x - self.mean) / self.std, output_hidden_states=True).hidden_states[self.layer]
            out.append(hidden[:, 1:].mean(1))
        return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½)`` for feature sets ``[N, D]`` and ``[M, D]``."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):  # round-off gives tiny imaginary parts
        root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))

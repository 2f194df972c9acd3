"""Serving compressed LLaVA / LLaVA-NeXT with vLLM: the plugin's registration, method eligibility and opt-in.

vLLM fixes each image's placeholder count when the prompt is processed, before the vision tower runs, so a method
can serve only if the number of tokens it keeps is a pure function of (image size, budget) and it returns exactly
that many (``../shared/reference/serving-vllm.md`` §1; EVS's ``compute_retained_tokens_count`` is the same
contract). Here that count is :func:`vlm_compress.pruners.base.kept_count`, the one the HF encoder stage checks
every selection against; the models in :mod:`vlm_compress.integrations.vllm_models` size their placeholders with it
and run the same ``select`` as the HF path, so both keep identical indices for the same image.

Opt in, the way vLLM users expect (nothing here imports vLLM; ``register`` only names lazy classes):

* ``LLM(model=path, hf_overrides=vllm_overrides(path, "cls_attn", 0.2))``, which is
  ``{"architectures": ["VlmCompressLlavaForConditionalGeneration"], "vlm_compress": {"method": ..., "budget": ...}}``;
* or ``vlm-compress export-vllm SRC DST --method cls_attn --budget 0.2``, then ``vllm serve DST`` unchanged.

Eligible (:data:`ELIGIBLE`): encoder-stage methods with a fixed count. MustDrop's stage 1 merges a data-dependent
number of windows; under vLLM it runs with ``fixed_count=True`` (the most similar windows only, as many as keep the
budget). CDPruner needs the prompt's text, which vLLM's image path never sees; QuoTA is a video method and MQT a
trained resampler outside the checkpoint; in-LLM and decode methods have no hook in vLLM's paged-KV scheduler. All of
them are refused at load with the list of what works. ``budget="auto"`` is refused too (counts known only after
encoding).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

ARCHITECTURES = {
    "llava": "VlmCompressLlavaForConditionalGeneration",
    "llava_next": "VlmCompressLlavaNextForConditionalGeneration",
}
ELIGIBLE = ("cls_attn", "divprune", "fopru", "globalcom2", "hired", "m3", "mustdrop", "pool", "random", "scope",
            "visionzip")
CONFIG_KEY = "vlm_compress"  # the config attribute that holds {"method", "budget", "options"}
_WHY_NOT = {
    "cdpruner": "its relevance term reads the prompt's instruction, which vLLM's image path does not see",
    "quota": "it assigns tokens over video frames; the vLLM LLaVA models take images",
    "mqt": "it runs a trained resampler that is not part of the vLLM checkpoint",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: name the two model classes (imported lazily by vLLM)."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"vlm_compress.integrations.vllm_models:{arch}")


def method_spec(method: str, budget: float | int, **options: Any) -> dict[str, Any]:
    """The ``vlm_compress`` config entry for ``method`` at ``budget`` (checked: :func:`pruner_from_spec`)."""
    spec = {"method": method, "budget": budget, "options": dict(options)}
    pruner_from_spec(spec)
    return spec


def pruner_from_spec(spec: Any):
    """The encoder pruner a ``vlm_compress`` config entry describes, ready for vLLM; a ``ValueError`` naming the
    eligible methods for anything that cannot serve (unknown name, in-LLM / decode stage, adaptive or auto count)."""
    from ..api import _resolve_configs
    from ..budget import is_auto
    from ..registry import get_method

    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"the model config's {CONFIG_KEY!r} entry must be a dict with 'method' and 'budget', e.g. "
                         f"{{'method': 'cls_attn', 'budget': 0.2}}; got {spec!r}")
    name, budget, options = spec["method"], spec.get("budget"), dict(spec.get("options") or {})
    works = f"methods that serve with vLLM: {', '.join(ELIGIBLE)}"
    cls = get_method(name)  # unknown names: a did-you-mean error
    if cls.stage != "encoder":
        raise ValueError(f"{name!r} is a {cls.stage}-stage method: it prunes inside the LLM, where vLLM's paged KV "
                         f"cache and scheduler offer no hook; {works}")
    if name not in ELIGIBLE:
        raise ValueError(f"{name!r} cannot serve with vLLM: {_WHY_NOT.get(name, 'its token count is not fixed')}; {works}")
    if budget is None or is_auto(budget):
        raise ValueError(f"vLLM needs a float or int budget (placeholder counts are fixed before the image is "
                         f"encoded), got {budget!r}")
    if name == "mustdrop":
        options.setdefault("fixed_count", True)
    (pruner,) = _resolve_configs(name, budget, options)
    if not pruner.exact_count():
        raise ValueError(f"{name!r} with {options} returns a data-dependent token count; "
                         + ("set fixed_count=True" if name == "mustdrop" else works))
    return pruner


def architecture_for(config: dict[str, Any]) -> str:
    """The plugin's architecture name for a checkpoint config (``model_type`` llava / llava_next)."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"the vLLM plugin serves {', '.join(ARCHITECTURES)} checkpoints; this one is "
                         f"model_type={model_type!r}")
    return ARCHITECTURES[model_type]


def vllm_overrides(model: str | Path, method: str, budget: float | int, **options: Any) -> dict[str, Any]:
    """``hf_overrides`` for ``vllm.LLM(model=model, hf_overrides=...)`` that serve ``model`` compressed."""
    config = json.loads((Path(model) / "config.json").read_text())
    return {"architectures": [architecture_for(config)], CONFIG_KEY: method_spec(method, budget, **options)}


TOWER_KEY = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")


def copy_for_vllm(src: str | Path, dst: str | Path) -> Path:
    """Copy checkpoint folder ``src`` to ``dst`` with the tower's weights renamed from what recent transformers write
    (``vision_tower.*``) to what vLLM 0.32 loads (``vision_tower.vision_model.*``); other files as they are. The
    plugin's models accept both namings; stock vLLM needs this copy."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError("pass a DST folder other than SRC (a copy is written)")
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in src.glob("*.safetensors"):
        tensors = load_file(weights)
        save_file({TOWER_KEY.sub(r"\1vision_model.", k): v.contiguous() for k, v in tensors.items()},
                  dst / weights.name, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {TOWER_KEY.sub(r"\1vision_model.", k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")
    return dst


def export_vllm(src: str | Path, dst: str | Path, method: str, budget: float | int, **options: Any) -> Path:
    """Copy checkpoint folder ``src`` to ``dst`` (tower keys renamed for vLLM, :func:`copy_for_vllm`) with the
    plugin's architecture and the method config in its ``config.json``, so ``vllm serve dst`` runs compressed."""
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json; pass a checkpoint folder (save_pretrained output)")
    config = json.loads(config_path.read_text())
    overrides = {"architectures": [architecture_for(config)], CONFIG_KEY: method_spec(method, budget, **options)}
    copy_for_vllm(src, dst)
    (dst / "config.json").write_text(json.dumps({**config, **overrides}, indent=2) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    """``vlm-compress export-vllm SRC DST --method M --budget B [--option key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="vlm-compress export-vllm", description=export_vllm.__doc__)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(ELIGIBLE)}")
    parser.add_argument("--budget", required=True, help="share of visual tokens kept (0.2) or tokens per image (64)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, value as JSON (e.g. --option layer=-3)")
    args = parser.parse_args(argv)
    try:
        budget = int(args.budget) if args.budget.isdigit() else float(args.budget)
    except ValueError:
        parser.error(f"--budget {args.budget!r}: a share of visual tokens (0.2) or a token count (64)")
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    try:
        out = export_vllm(args.src, args.dst, args.method, budget, **options)
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(2, f"vlm-compress export-vllm: error: {error}\n")
    print(f"wrote {out}: serve it with `vllm serve {out}` (vlm-compress installed beside vLLM)")

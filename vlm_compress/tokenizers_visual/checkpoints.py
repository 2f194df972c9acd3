"""Reading tokenizers from local folders: our own format, and the official SEED-2 and FlexTok checkpoints.

* :func:`load_tokenizer` — a folder written by ``save_pretrained`` (``config.json`` names the kind), or the name
  of an embedded model (``"tiny-flextok"``, ``"tiny-seed"``, ``"tiny-vq"``).
* :func:`load_seed_official` — ``seed_quantizer.pt`` of ``AILab-CVC/seed-tokenizer-2`` (a flat torch state dict,
  loaded by the official code with ``strict=False``; key names in ``models/seed_qformer/qformer_quantizer.py``)
  plus, for encoding, LAVIS's ``eva_vit_g.pth`` (EVA-CLIP ViT-g/14).
* :func:`load_flextok_official` — ``model.safetensors`` of ``EPFL-VILAB/flextok_*`` (modules under
  ``encoder.module_dict.*`` / ``decoder.module_dict.*``, the hydra config in the safetensors header's
  ``__metadata__``, one ``str()``-serialised entry per top-level key; ``flextok/utils/checkpoint.py``).

Both official loaders read the architecture from the tensors' names and shapes, not from the config's
``_target_`` entries (instantiating those would run arbitrary code), and raise on any tensor they cannot place
(``strict=True``) so a layout they do not know is never half-loaded. Names and shapes: reference
``trained-tokenizers-speculative.md`` §4.1/§5.1 and the official sources cited there.
"""

from __future__ import annotations

import ast
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import model_folder
from ..model_folder import CONFIG_NAME, WEIGHTS_NAME
from .base import ImageTokenizer
from .flextok import VAE_DIR, FlexTokConfig, FlexTokTokenizer, load_vae
from .seed import TARGET_DIR, SeedConfig, SeedTokenizer, load_clip_target
from .vqgan import VQGANTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED = ("tiny-flextok", "tiny-seed", "tiny-vq")
KINDS: dict[str, type[ImageTokenizer]] = {"flextok": FlexTokTokenizer, "seed": SeedTokenizer, "vqgan": VQGANTokenizer}


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the expected layout."""


# ---- our format -------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str | Path, **kwargs) -> ImageTokenizer:
    """A tokenizer from a ``save_pretrained`` folder or an embedded name, in eval mode, float32.

    SEED folders may hold their CLIP target in ``target/`` (open_clip ``local-dir`` format), FlexTok folders their
    VAE in ``vae/`` (diffusers format); they are loaded too.
    ``kwargs`` go to the constructor (e.g. ``decoder=UnclipDecoder.from_pretrained(...)``, ``vae=...``)."""
    path = model_folder.resolve(name_or_path, EMBEDDED, ASSETS)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a tokenizer folder (no {CONFIG_NAME}); pass a folder written by save_pretrained or one "
            f"of the embedded names {list(EMBEDDED)}; official checkpoints load with load_seed_official / "
            f"load_flextok_official"
        )
    spec = json.loads((path / CONFIG_NAME).read_text())
    kind = spec.get("tokenizer")
    if kind not in KINDS:
        raise ValueError(f"{path / CONFIG_NAME} names tokenizer {kind!r}; known: {sorted(KINDS)}")
    cls = KINDS[kind]
    if cls is SeedTokenizer and (path / TARGET_DIR).is_dir() and "target" not in kwargs:
        kwargs["target"] = load_clip_target(path / TARGET_DIR)
    if cls is FlexTokTokenizer and (path / VAE_DIR).is_dir() and "vae" not in kwargs:
        kwargs["vae"] = load_vae(str(path / VAE_DIR))
    model = cls(cls.config_from_dict(spec), **kwargs)
    state = model_folder.read_weights(path, error=CheckpointError)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not model._skip_saving(k)]
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_NAME} does not match its config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    return model.float().eval()


# ---- SEED-2 -----------------------------------------------------------------------------------------------
SEED_OFFICIAL = dict(image_size=224, patch_size=14, vision_width=1408, vision_depth=39, vision_heads=16,
                     vision_mlp_ratio=6144 / 1408, train_vision=False, qformer_heads=12, decode_heads=12,
                     pixel_decoder=False)
_SEED_TOP = ("query_tokens", "ln_vision.", "quantize.embedding.weight", "encode_task_layer.", "decode_task_layer.",
             "pos_embed", "blocks.", "pos_embed_image", "blocks_image.", "image_down.", "distill_image_proj.")
_SEED_IGNORED = re.compile(r"Qformer\.bert\.embeddings\.(position_ids|word_embeddings|position_embeddings)|Qformer\.cls\."
                           r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.")


def seed_official_state(ckpt: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Official ``Blip2QformerQuantizer`` state dict → ``(our state dict, config overrides)``.

    Text-only Q-Former parts (word/position embeddings, the text FFN, the LM head) are dropped, as the official
    ``__init__`` sets them to ``None``; ``visual_encoder.*`` is left to :func:`eva_vit_state`. Anything else that
    has no place raises :class:`CheckpointError`."""
    ckpt = _unwrap(ckpt)
    state, unplaced = {}, []
    for key, value in ckpt.items():
        if key.startswith("visual_encoder.") or _SEED_IGNORED.match(key):
            continue
        if key.startswith("Qformer.bert.encoder.layer."):
            state["Qformer.layer." + key[len("Qformer.bert.encoder.layer."):]] = value
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            state["Qformer.embeddings_norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(_SEED_TOP):
            state[key] = value
        else:
            unplaced.append(key)
    if unplaced:
        raise CheckpointError(f"tensors with no place in SEED's layout: {unplaced[:10]}")
    for needed in ("query_tokens", "quantize.embedding.weight", "distill_image_proj.weight"):
        if needed not in state:
            raise CheckpointError(f"not a SEED quantizer checkpoint: no {needed!r}")
    q, d = state["query_tokens"].shape[1:]
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("Qformer.layer.")})
    cross = [i for i in layers if f"Qformer.layer.{i}.crossattention.self.key.weight" in state]
    freq = cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1)
    if cross and cross != [i for i in layers if i % freq == 0]:
        raise CheckpointError(f"cross-attention on Q-Former layers {cross}: not every {freq}-th layer")
    downs = [state[k].shape[0] for k in sorted(k for k in state if k.startswith("image_down."))]
    overrides = dict(
        num_queries=q, hidden=d, qformer_layers=len(layers), cross_attention_freq=freq,
        vision_width=state[f"Qformer.layer.{cross[0]}.crossattention.self.key.weight"].shape[1] if cross else d,
        intermediate=state["Qformer.layer.0.intermediate_query.dense.weight"].shape[0],
        codebook_size=state["quantize.embedding.weight"].shape[0], code_dim=state["quantize.embedding.weight"].shape[1],
        decode_depth=len({k.split(".")[1] for k in state if k.startswith("blocks_image.")}),
        image_down=downs, embedding_dim=state["distill_image_proj.weight"].shape[0],
    )
    if "ln_vision.weight" in state:
        overrides["vision_width"] = state["ln_vision.weight"].shape[0]
    return state, overrides


def eva_vit_state(ckpt: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[dict, dict]:
    """LAVIS ``eva_vit_g.pth`` (EVA-CLIP ViT-g) → ``(visual_encoder.* state for timm's VisionTransformer, config
    overrides)``. EVA's separate ``q_bias``/``v_bias`` become timm's fused qkv bias ``[q_bias, 0, v_bias]`` (EVA's
    ``Attention.forward`` concatenates them the same way)."""
    ckpt = {k[len(prefix):]: v for k, v in _unwrap(ckpt).items() if k.startswith(prefix)}
    state = {}
    for key, value in ckpt.items():
        match = re.match(r"blocks\.(\d+)\.attn\.(q_bias|v_bias)$", key)
        if match:
            continue
        if key.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.")):
            state["visual_encoder." + key] = value
        elif key.startswith(("rel_pos_bias", "norm.", "head.", "fc_norm.")) or "relative_position" in key:
            raise CheckpointError(f"EVA ViT key {key!r}: this layout (relative positions / a head) is not supported")
    depth = len({k.split(".")[1] for k in ckpt if k.startswith("blocks.")})
    for i in range(depth):
        q_bias = ckpt.get(f"blocks.{i}.attn.q_bias")
        if q_bias is not None:
            v_bias = ckpt[f"blocks.{i}.attn.v_bias"]
            state[f"visual_encoder.blocks.{i}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    width = ckpt["cls_token"].shape[-1]
    proj = ckpt["patch_embed.proj.weight"]
    grid = int(round((ckpt["pos_embed"].shape[1] - 1) ** 0.5))
    overrides = dict(vision_width=width, vision_depth=depth, patch_size=proj.shape[-1], image_size=grid * proj.shape[-1],
                     vision_mlp_ratio=ckpt["blocks.0.mlp.fc1.weight"].shape[0] / width)
    return state, overrides


def load_seed_official(quantizer_path: str | Path, vision_path: str | Path | None = None, *, vision_heads: int = 16,
                       heads: int | None = None, target=None, decoder=None) -> SeedTokenizer:
    """SEED-2 from ``seed_quantizer.pt`` and (for :meth:`encode`) ``eva_vit_g.pth``, both local files.

    Without ``vision_path`` the ViT is built on the ``meta`` device (no memory) and ``encode`` raises; ``decode``
    and :meth:`~SeedTokenizer.image_embedding` work from ids. ``heads`` (Q-Former and decode blocks) defaults to
    ``hidden // 64``, BERT-base's and the official 12. ``decoder``: e.g.
    ``UnclipDecoder.from_pretrained(local_sd21_unclip)``; ``target``: a CLIP for :meth:`~SeedTokenizer.evaluate`."""
    state, overrides = seed_official_state(_torch_load(quantizer_path))
    vision_state = {}
    if vision_path is not None:
        vision_state, vision_overrides = eva_vit_state(_torch_load(vision_path))
        overrides.update(vision_overrides)
    heads = heads or max(overrides["hidden"] // 64, 1)
    config = SeedConfig(**{**SEED_OFFICIAL, **overrides, "vision_heads": vision_heads, "qformer_heads": heads,
                           "decode_heads": heads})
    model = SeedTokenizer(config, target=target, decoder=decoder, vision_device=None if vision_state else "meta")
    # pos_embed/blocks reconstruct the causal embedding in training only; a released file may lack them
    _load_exact(model, {**state, **vision_state}, ignore=("visual_encoder.",) if not vision_state else (),
                optional=lambda key: key == "pos_embed" or key.startswith("blocks."))
    return model.eval()


# ---- FlexTok ----------------------------------------------------------------------------------------------
_FLEX_MAP = [
    (r"encoder\.module_dict\.enc_patch_emb\.patch_proj\.(weight|bias)", r"enc_patch_emb.\1"),
    (r"encoder\.module_dict\.enc_register_module\.registers", "enc_registers"),
    (r"encoder\.module_dict\.enc_transformer\.blocks\.(\d+)\.(attn\.(?:wq|wk|wv|proj)|mlp\.fc[123])\.weight",
     r"enc_blocks.\1.\2.weight"),
    (r"encoder\.module_dict\.enc_to_latents\.proj\.(weight|bias)", r"enc_to_latents.\1"),
    (r"decoder\.module_dict\.dec_from_latents\.proj\.(weight|bias)", r"dec_from_latents.\1"),
    (r"decoder\.module_dict\.dec_nested_dropout\.dropout_mask_token", "dec_mask_token"),
    (r"decoder\.module_dict\.dec_noise_patch_emb\.patch_proj\.(weight|bias)", r"dec_patch_emb.\1"),
    (r"decoder\.module_dict\.dec_time_embedder\.mlp\.([02])\.(weight|bias)", r"dec_time_mlp.\1.\2"),
    (r"decoder\.module_dict\.dec_transformer\.blocks\.(\d+)\.(attn\.(?:wq|wk|wv|proj)|mlp\.fc[123])\.weight",
     r"dec_blocks.\1.\2.weight"),
    (r"decoder\.module_dict\.dec_transformer\.blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)",
     r"dec_blocks.\1.adaLN_modulation.1.\2"),
    (r"decoder\.module_dict\.dec_to_patches\.proj\.(weight|bias)", r"dec_to_patches.\1"),
    (r"decoder\.module_dict\.dec_to_patches\.adaLN_modulation\.1\.(weight|bias)", r"dec_out_modulation.1.\1"),
]
_FLEX_POSEMBS = {
    "encoder.module_dict.enc_posemb_module.posembs": "enc_posemb",
    "decoder.module_dict.dec_patches_posemb_module.posembs": "dec_posemb",
    "decoder.module_dict.dec_registers_posemb_module.posembs": "dec_register_posemb",
}


def read_safetensors_metadata(path: str | Path) -> dict:
    """The ``__metadata__`` of a safetensors file, each value parsed with ``ast.literal_eval`` where it is a Python
    literal (FlexTok writes ``str(value)`` per top-level config key), else kept as the string. Reads the header
    only."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    out = {}
    for key, value in (header.get("__metadata__") or {}).items():
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def flextok_official_state(tensors: Mapping[str, torch.Tensor], head_dim: int = 64) -> tuple[dict, dict]:
    """Official FlexTok tensors → ``(our state dict, config overrides)``; ``vae.*`` tensors are returned under
    ``vae.`` (diffusers names) for :func:`load_flextok_official` to place."""
    state, unplaced = {}, []
    for key, value in tensors.items():
        if key.startswith("vae.vae."):
            state["vae." + key[len("vae.vae."):]] = value
            continue
        if key in _FLEX_POSEMBS:
            state[_FLEX_POSEMBS[key]] = _posemb_rows(value)
            continue
        for pattern, repl in _FLEX_MAP:
            if re.fullmatch(pattern, key):
                state[re.sub(pattern, repl, key)] = value
                break
        else:
            unplaced.append(key)
    if unplaced:
        raise CheckpointError(f"tensors with no place in FlexTok's layout: {unplaced[:10]}")
    if "enc_registers" not in state:
        raise CheckpointError("not a FlexTok checkpoint: no encoder.module_dict.enc_register_module.registers")
    registers, width = state["enc_registers"].shape
    patch_dim = state["enc_patch_emb.weight"].shape[1]
    grid = int(round(state["enc_posemb"].shape[0] ** 0.5)) if "enc_posemb" in state else None
    count = lambda prefix: len({k.split(".")[1] for k in state if k.startswith(prefix)})
    dec_width = state["dec_patch_emb.weight"].shape[0]
    if dec_width != width:
        raise CheckpointError(f"encoder width {width} and decoder width {dec_width} differ: not supported")
    mod = state["dec_blocks.0.adaLN_modulation.1.weight"].shape[0]
    overrides = dict(width=width, heads=max(width // head_dim, 1), registers=registers,
                     encoder_depth=count("enc_blocks."), decoder_depth=count("dec_blocks."),
                     mlp_ratio=state["enc_blocks.0.mlp.fc1.weight"].shape[0] * 3 / (2 * width),
                     adaln_groups=mod // (6 * width), latent_grid=grid, patch_dim=patch_dim)
    return state, overrides


def load_flextok_official(path: str | Path, vae=None, *, vae_path: str | Path | None = None, levels=None,
                          image_size: int | None = None, head_dim: int = 64) -> FlexTokTokenizer:
    """FlexTok from an official ``model.safetensors`` (local path).

    The VAE: ``vae`` (a diffusers ``AutoencoderKL``) or ``vae_path`` (its local folder, e.g. a downloaded
    ``EPFL-VILAB/flextok_vae_c16``); ``vae.vae.*`` tensors in the file are loaded into it. FSQ ``levels`` come
    from the header's ``regularizer`` entry when present, else the paper's ``[8, 8, 8, 5, 5, 5]`` when the code
    width is 6; ``image_size`` defaults to ``latent grid · patch · VAE factor``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FlexTok checkpoint at {path}")
    metadata = read_safetensors_metadata(path)
    state, overrides = flextok_official_state(load_file(str(path)), head_dim)
    if vae is None and vae_path is not None:
        from .flextok import load_vae

        vae = load_vae(str(vae_path))
    if vae is None:
        raise ValueError("official FlexTok models tokenise VAE latents: pass vae_path= (a local diffusers "
                         "AutoencoderKL folder such as flextok_vae_c16) or vae=")
    levels = levels or _levels_from_metadata(metadata)
    code_dim = state["enc_to_latents.weight"].shape[0]
    if levels is None and code_dim == 6:
        levels = [8, 8, 8, 5, 5, 5]
    if levels is None or len(levels) != code_dim:
        raise CheckpointError(f"FSQ levels {levels} do not match the code width {code_dim}: pass levels=")
    channels = vae.config.latent_channels
    patch = int(round((overrides.pop("patch_dim") / channels) ** 0.5))
    grid = overrides.pop("latent_grid")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    config = FlexTokConfig(**overrides, levels=list(levels), patch_size=patch,
                           image_size=image_size or grid * patch * factor)
    model = FlexTokTokenizer(config, vae=vae)
    state.setdefault("dec_register_posemb", torch.zeros_like(model.dec_register_posemb))  # not every layout has one
    vae_state = {k: v for k, v in state.items() if k.startswith("vae.")}
    _load_exact(model, {k: v for k, v in state.items() if not k.startswith("vae.")}, ignore=("vae.",))
    if vae_state:
        vae.load_state_dict({k[4:]: v for k, v in vae_state.items()}, strict=False)
    return model.eval()


def _levels_from_metadata(metadata: dict) -> list[int] | None:
    found = _find_key(metadata.get("regularizer", metadata), "levels")
    return [int(x) for x in found] if isinstance(found, (list, tuple)) else None


def _find_key(tree, name):
    if isinstance(tree, dict):
        if name in tree:
            return tree[name]
        for value in tree.values():
            found = _find_key(value, name)
            if found is not None:
                return found
    return None


def _posemb_rows(value: torch.Tensor) -> torch.Tensor:
    """An official position embedding (``[1, D, H, W]`` sin-cos, ``[1, D, N]`` or ``[N, D]``) → ``[N, D]``."""
    if value.dim() == 4:
        return value[0].flatten(1).t().contiguous()
    if value.dim() == 3:
        return value[0].t().contiguous() if value.shape[1] > value.shape[2] else value[0].contiguous()
    return value


# ---- shared -----------------------------------------------------------------------------------------------
def _unwrap(ckpt):
    for key in ("state_dict", "model"):
        if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
            return ckpt[key]
    return ckpt


def _torch_load(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_exact(model: torch.nn.Module, state: dict, ignore: tuple[str, ...] = (), optional=lambda key: False):
    """Load ``state`` into ``model``; every model tensor outside ``ignore`` must be given (keys ``optional(key)``
    may be missing) and every shape must match."""
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    if wrong or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model built from it: shapes {wrong[:6]}, unknown {unexpected[:6]}")
    missing = [k for k in own if k not in state and not k.startswith(ignore) and not optional(k)
               and not getattr(model, "_skip_saving", lambda _: False)(k)]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing[:10]}")
    model.load_state_dict(state, strict=False, assign=False)


__all__ = [
    "CheckpointError",
    "eva_vit_state",
    "flextok_official_state",
    "load_flextok_official",
    "load_seed_official",
    "load_tokenizer",
    "read_safetensors_metadata",
    "seed_official_state",
]

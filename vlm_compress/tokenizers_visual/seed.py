"""SEED: images → 32 causal, semantic codes that reconstruct an image-level embedding.

SEED-1 (arXiv 2307.08041) and SEED-2 / SEED-LLaMA (arXiv 2310.01218, ICLR 2024); official code
``AILab-CVC/SEED`` ``models/seed_qformer/qformer_quantizer.py::Blip2QformerQuantizer`` (reference
``trained-tokenizers-speculative.md`` §4):

* **Encode.** ViT features → ``ln_vision`` → a BERT-style Q-Former whose ``num_queries`` learned queries attend
  *causally* among themselves (query ``i`` never sees ``j > i``) and cross-attend to every ViT token (every
  ``cross_attention_freq``-th layer) → ``encode_task_layer`` (Linear–Tanh–Linear) → VQ (nearest code, no
  l2-normalisation) → ``num_queries`` ids.
* **Decode.** Codes → ``decode_task_layer`` → ``+ pos_embed_image`` → ``blocks_image`` (timm ViT blocks) →
  ``image_down`` (bias-free Linear–ReLU stack) → flatten → ``distill_image_proj`` = one image embedding in the
  space of a CLIP image encoder (SEED-2: CLIP-ViT-H-14, 1024-d, the conditioning space of SD-2.1-unCLIP) → a
  pluggable image decoder: :class:`~.unclip.UnclipDecoder` (a diffusers unCLIP pipeline from a local folder) or
  the small :class:`PixelDecoder` the shipped model carries.
* **Training** (stage II, ``blip2_qformer_codebook_all_image.py``):
  ``5·L_vq + 2·(1 − cos(blocks(decode(q)), qformer_out)) + 0.5·MSE(image embedding, CLIP target)``.

Budgets: the codes are causal, so the first ``k`` codes of an encoding are the encoding of the first ``k``
queries and ``encode(images, budget=k)`` truncates; ``embed`` takes any length. ``decode`` needs all
``num_queries`` codes, as the official decoder (its ``distill_image_proj`` reads the flattened 32 codes).

Deliberate differences from the official code (for the small model trained here; the official weights load
through :func:`~.checkpoints.load_seed_official` into the same modules):

* The ViT is a timm ``VisionTransformer`` (official: EVA-CLIP ViT-g, frozen). Ours has no pretrained weights
  to freeze, so ``train_vision=True`` trains it with the rest, and stages I and II are one: no ITC/ITM/captioning
  stage (there is no text), and the cosine target ``qformer_out`` is detached (the official stage II freezes the
  Q-Former; a live target would let both sides collapse together).
* The CLIP target is an ``open_clip`` model from a local folder (``local-dir:``); the shipped one is built from
  a small config with random weights and frozen. Its embedding is the target *space*; it carries no semantics.
* The embedding MSE is divided by the batch variance of the target (a random CLIP maps these scenes to nearly
  parallel embeddings). The pixel decoder is trained with the tokenizer on the reconstructed (detached) embedding.
* VQ dead codes are restarted during training (:meth:`VectorQuantizer.restart_dead_codes`).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageTokenizer
from .quantizers import VectorQuantizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TARGET_DIR = "target"


@dataclasses.dataclass
class SeedConfig:
    image_size: int = dataclasses.field(default=64, metadata={"help": "Input images are image_size × image_size."})
    patch_size: int = dataclasses.field(default=8, metadata={"help": "ViT patch side."})
    vision_width: int = dataclasses.field(default=96, metadata={"help": "ViT width (official: EVA ViT-g, 1408)."})
    vision_depth: int = dataclasses.field(default=4, metadata={"help": "ViT blocks (official: 39)."})
    vision_heads: int = dataclasses.field(default=4, metadata={"help": "ViT heads."})
    vision_mlp_ratio: float = dataclasses.field(default=4.0, metadata={"help": "ViT MLP width / width (ViT-g: 6144/1408)."})
    train_vision: bool = dataclasses.field(default=True, metadata={
        "help": "Train the ViT with the rest (the small model has no pretrained ViT); the official ViT is frozen."})
    num_queries: int = dataclasses.field(default=32, metadata={"help": "Q-Former queries = codes per image."})
    hidden: int = dataclasses.field(default=96, metadata={"help": "Q-Former width (official: 768, BERT-base)."})
    qformer_layers: int = dataclasses.field(default=2, metadata={"help": "Q-Former layers (official: 12)."})
    qformer_heads: int = dataclasses.field(default=4, metadata={"help": "Q-Former heads (official: 12)."})
    cross_attention_freq: int = dataclasses.field(default=2, metadata={
        "help": "Layers i with i % freq == 0 cross-attend to the ViT (official: 2)."})
    intermediate: int = dataclasses.field(default=384, metadata={"help": "Q-Former FFN width (official: 3072)."})
    codebook_size: int = dataclasses.field(default=1024, metadata={"help": "VQ codes (official: 8192)."})
    code_dim: int = dataclasses.field(default=16, metadata={"help": "VQ code width (official: 32)."})
    decode_depth: int = dataclasses.field(default=1, metadata={"help": "blocks_image / blocks depth (official: 4)."})
    decode_heads: int = dataclasses.field(default=4, metadata={"help": "Heads of the decode blocks (official: 12)."})
    image_down: list = dataclasses.field(default_factory=lambda: [64, 32, 8], metadata={
        "help": "Widths of the bias-free image_down stack; the last × num_queries is flattened (official: 256, 128, 32)."})
    embedding_dim: int = dataclasses.field(default=128, metadata={
        "help": "Image-embedding width = the CLIP target's (official: 1024, CLIP-ViT-H-14)."})
    vq_weight: float = dataclasses.field(default=5.0, metadata={"help": "Loss weight of the VQ term."})
    cos_weight: float = dataclasses.field(default=2.0, metadata={"help": "Loss weight of the causal-embedding cosine."})
    embedding_weight: float = dataclasses.field(default=0.5, metadata={"help": "Loss weight of the embedding MSE."})
    pixel_weight: float = dataclasses.field(default=1.0, metadata={"help": "Loss weight of the pixel decoder's MSE."})
    restart_every: int = dataclasses.field(default=50, metadata={"help": "Training steps between dead-code restarts (0: never)."})
    pixel_decoder: bool = dataclasses.field(default=True, metadata={"help": "Carry the small pixel decoder."})


class QFormerSelfOutput(nn.Module):
    """BERT's post-norm output: ``LayerNorm(dense(h) + input)``."""

    def __init__(self, hidden: int, inner: int | None = None):
        super().__init__()
        self.dense = nn.Linear(inner or hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class QFormerAttentionCore(nn.Module):
    def __init__(self, hidden: int, heads: int, context_width: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)),
                                             split(self.value(context)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, d)


class QFormerAttention(nn.Module):
    """``attention.self.{query,key,value}`` + ``attention.output.{dense,LayerNorm}``, BERT's names."""

    def __init__(self, hidden: int, heads: int, context_width: int | None = None):
        super().__init__()
        self.self = QFormerAttentionCore(hidden, heads, context_width or hidden)
        self.output = QFormerSelfOutput(hidden)

    def forward(self, x, context=None, mask=None):
        return self.output(self.self(x, x if context is None else context, mask), x)


class QFormerFeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    """One BLIP-2 Q-Former layer on the query tokens: causal self-attention, optional cross-attention to the ViT,
    the query FFN (``intermediate_query``/``output_query``); every sub-layer post-norm, as BERT."""

    def __init__(self, config: SeedConfig, cross: bool):
        super().__init__()
        self.attention = QFormerAttention(config.hidden, config.qformer_heads)
        self.crossattention = (QFormerAttention(config.hidden, config.qformer_heads, config.vision_width)
                               if cross else None)
        self.intermediate_query = QFormerFeedForward(config.hidden, config.intermediate)
        self.output_query = QFormerSelfOutput(config.hidden, config.intermediate)

    def forward(self, x, image_embeds, causal_mask):
        x = self.attention(x, mask=causal_mask)
        if self.crossattention is not None:
            x = self.crossattention(x, context=image_embeds)
        return self.output_query(self.intermediate_query(x), x)


class CausalQFormer(nn.Module):
    """Queries ``[B, Q, D]`` × image tokens ``[B, N, Dv]`` → ``[B, Q, D]``; query ``i`` attends to queries ``<= i``."""

    def __init__(self, config: SeedConfig):
        super().__init__()
        self.embeddings_norm = nn.LayerNorm(config.hidden, eps=1e-12)
        self.layer = nn.ModuleList(QFormerLayer(config, cross=i % config.cross_attention_freq == 0)
                                   for i in range(config.qformer_layers))
        self.register_buffer("causal_mask", torch.ones(config.num_queries, config.num_queries, dtype=torch.bool).tril(),
                             persistent=False)

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.embeddings_norm(queries)
        for layer in self.layer:
            x = layer(x, image_embeds, self.causal_mask)
        return x


class PixelDecoder(nn.Module):
    """Image embedding ``[B, E]`` → image ``[B, 3, S, S]`` in [0, 1]: a linear map to a 4×4 grid, then
    upsample–conv stages (the small stand-in for SEED-2's unCLIP diffusion decoder)."""

    def __init__(self, embedding_dim: int, image_size: int, width: int = 96):
        super().__init__()
        stages = int(math.log2(image_size // 4))
        if 4 * 2**stages != image_size:
            raise ValueError(f"PixelDecoder needs image_size = 4·2^n, got {image_size}")
        self.width = width
        self.inp = nn.Linear(embedding_dim, width * 16)
        layers, prev = [], width
        for i in range(stages):
            out = max(width // 2 ** (i + 1), 24)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(prev, out, 3, padding=1),
                       nn.GroupNorm(8, out), nn.SiLU()]
            prev = out
        self.body = nn.Sequential(*layers, nn.Conv2d(prev, 3, 3, padding=1))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        x = self.inp(embeds).view(-1, self.width, 4, 4)
        return torch.sigmoid(self.body(x))


class SeedTokenizer(ImageTokenizer):
    """See the module docstring. ``target``: an ``open_clip`` model whose ``encode_image`` defines the embedding
    space (training and :meth:`evaluate` only); ``decoder``: ``embeds [B, E] → images`` (default: the pixel decoder)."""

    kind = "seed"
    config_class = SeedConfig

    def __init__(self, config: SeedConfig | None = None, target: nn.Module | None = None, decoder=None,
                 vision_device: str | None = None):
        from timm.models.vision_transformer import Block, VisionTransformer

        config = config or SeedConfig()
        super().__init__(config)
        q, d = config.num_queries, config.hidden
        self.visual_encoder = VisionTransformer(
            img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.vision_width,
            depth=config.vision_depth, num_heads=config.vision_heads, mlp_ratio=config.vision_mlp_ratio, num_classes=0,
            global_pool="", final_norm=False, qkv_bias=True, device=vision_device)
        self.visual_encoder.requires_grad_(config.train_vision)
        self.ln_vision = nn.LayerNorm(config.vision_width)
        self.query_tokens = nn.Parameter(torch.randn(1, q, d) * 0.02)
        self.Qformer = CausalQFormer(config)
        self.encode_task_layer = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, config.code_dim))
        self.quantize = VectorQuantizer(config.codebook_size, config.code_dim, beta=0.25, legacy=True)
        self.decode_task_layer = nn.Sequential(nn.Linear(config.code_dim, config.code_dim), nn.Tanh(),
                                               nn.Linear(config.code_dim, d))
        block = lambda: Block(d, config.decode_heads, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.pos_embed = nn.Parameter(torch.randn(1, q, d) * 0.02)
        self.blocks = nn.ModuleList(block() for _ in range(config.decode_depth))
        self.pos_embed_image = nn.Parameter(torch.randn(1, q, d) * 0.02)
        self.blocks_image = nn.ModuleList(block() for _ in range(config.decode_depth))
        widths = [d, *config.image_down]
        down = []
        for i in range(len(widths) - 1):
            down += [nn.Linear(widths[i], widths[i + 1], bias=False)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        self.image_down = nn.Sequential(*down)
        self.distill_image_proj = nn.Linear(q * widths[-1], config.embedding_dim)
        self.pixel_decoder = PixelDecoder(config.embedding_dim, config.image_size) if config.pixel_decoder else None
        self.target = target.eval().requires_grad_(False) if target is not None else None
        self.decoder = decoder
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # ---- interface --------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def max_tokens(self) -> int:
        return self.config.num_queries

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, T]`` → codebook vectors ``[B, T, code_dim]``."""
        return self.quantize.indices_to_codes(self._check_tokens(tokens))

    def _encode(self, pixels, num_tokens):
        if self.visual_encoder.cls_token.is_meta:
            raise ValueError("this SEED has no ViT weights (loaded without vision_path): pass vision_path=eva_vit_g.pth "
                             "to load_seed_official to encode; decode and image_embedding work from ids")
        return self.quantize(self.encode_task_layer(self.query_features(pixels))).indices[:, :num_tokens]

    def _decode(self, tokens, generator: torch.Generator | None = None):
        decoder = self.decoder or self.pixel_decoder
        if decoder is None:
            raise ValueError("this SEED tokenizer has no image decoder: pass decoder=UnclipDecoder.from_pretrained(path)")
        embeds = self._image_embedding(tokens)
        return decoder(embeds, generator=generator) if self.decoder is not None else decoder(embeds)

    @torch.no_grad()
    def image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, num_queries]`` → the reconstructed image embedding ``[B, embedding_dim]`` (official
        ``get_codebook_entry``; the unCLIP ``image_embeds``)."""
        return self._image_embedding(self._check_tokens(tokens))

    def _image_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.config.num_queries:
            raise ValueError(
                f"SEED decodes all {self.config.num_queries} codes at once (its embedding head reads them "
                f"flattened), got {tokens.shape[1]}; encode with budget=None, or use FlexTok for shorter encodings"
            )
        return self.embedding_from_codes(self.quantize.indices_to_codes(tokens))

    # ---- the modules ------------------------------------------------------------------------------------
    def query_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] → causal Q-Former outputs ``[B, Q, hidden]``."""
        image_embeds = self.ln_vision(self.visual_encoder.forward_features((pixels - self.clip_mean) / self.clip_std))
        return self.Qformer(self.query_tokens.expand(pixels.shape[0], -1, -1), image_embeds)

    def embedding_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Q, code_dim]`` → image embedding ``[B, embedding_dim]``."""
        x = self.decode_task_layer(codes) + self.pos_embed_image
        for block in self.blocks_image:
            x = block(x)
        return self.distill_image_proj(self.image_down(x).flatten(1))

    def target_embedding(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            raise ValueError("no CLIP target: pass target=load_clip_target(path) to train or evaluate SEED")
        size = getattr(self.target.visual, "image_size", None)
        x = (pixels - self.clip_mean) / self.clip_std
        if size is not None and tuple(x.shape[-2:]) != tuple(size if isinstance(size, (tuple, list)) else (size, size)):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return self.target.encode_image(x)

    # ---- training ---------------------------------------------------------------------------------------
    def training_loss(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        q = self.query_features(pixels)
        vq = self.quantize(self.encode_task_layer(q))
        decoded = self.decode_task_layer(vq.codes)
        recon = decoded + self.pos_embed
        for block in self.blocks:
            recon = block(recon)
        cos = 1 - F.cosine_similarity(recon, q.detach(), dim=-1).mean()
        embeds = self.embedding_from_codes(vq.codes)
        with torch.no_grad():
            target = self.target_embedding(pixels)
        # the MSE is divided by the batch variance of the target: a random CLIP's embeddings of these scenes differ
        # little (cosine ~0.95 to their mean), and the raw MSE would vanish long before the differences are learnt
        mse = F.mse_loss(embeds, target) / target.var(0).mean().clamp(min=1e-8)
        loss = c.vq_weight * vq.loss + c.cos_weight * cos + c.embedding_weight * mse
        if self.pixel_decoder is not None:
            loss = loss + c.pixel_weight * F.mse_loss(self.pixel_decoder(embeds.detach()), pixels)
        return loss

    def after_step(self, step: int) -> None:
        every = self.config.restart_every
        if every and (step + 1) % every == 0:
            self.quantize.restart_dead_codes()

    @torch.no_grad()
    def evaluate(self, pixels: torch.Tensor) -> dict:
        """Figures on images ``[B, 3, S, S]``: cosine of the reconstructed to the target embedding (and of the
        batch-mean target, the no-information baseline; and after subtracting that mean from both),
        retrieval@1 of each image's target among the batch,
        codebook use, and PSNR of the pixel decoder."""
        from .base import psnr

        ids = self._encode(pixels, self.max_tokens)
        embeds = self._image_embedding(ids)
        target = self.target_embedding(pixels)
        out = {**embedding_fidelity(embeds, target), "codes_used": float(ids.unique().numel() / self.codebook_size)}
        if self.pixel_decoder is not None:
            out["pixel_psnr"] = float(psnr(pixels, self.pixel_decoder(embeds)).mean())
        return out

    def _skip_saving(self, key: str) -> bool:
        return key.startswith(("target.", "decoder."))

    def save_pretrained(self, path, extra=None, dtype=None) -> None:
        super().save_pretrained(path, extra, dtype)
        if self.target is not None:
            save_clip_target(self.target, Path(path) / TARGET_DIR, getattr(self.target, "_open_clip_model_cfg", None))


def embedding_fidelity(embeds: torch.Tensor, target: torch.Tensor) -> dict:
    """How well reconstructed embeddings ``[N, E]`` match their targets ``[N, E]``: mean cosine; the cosine of the
    mean target (the no-information baseline); the cosine after subtracting that mean from both; retrieval@1 of
    each row's own target among the ``N``."""
    mean = target.mean(0, keepdim=True)
    sims = F.normalize(embeds, dim=-1) @ F.normalize(target, dim=-1).t()
    return {
        "embedding_cosine": float(F.cosine_similarity(embeds, target, dim=-1).mean()),
        "mean_target_cosine": float(F.cosine_similarity(mean, target, dim=-1).mean()),
        "centered_cosine": float(F.cosine_similarity(embeds - mean, target - mean, dim=-1).mean()),
        "retrieval_at_1": float((sims.argmax(1) == torch.arange(len(embeds), device=embeds.device)).float().mean()),
    }


def tiny_clip_config(embedding_dim: int = 128, image_size: int = 64) -> dict:
    """An open_clip model config for the small SEED's target space: a 2-layer ViT, a minimal text tower
    (never used: the target is image-only, but open_clip models carry one)."""
    return {
        "embed_dim": embedding_dim,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }


def build_clip_target(model_cfg: dict, seed: int = 0) -> nn.Module:
    """An ``open_clip`` CLIP from a config with seeded random weights, frozen."""
    from open_clip.model import CLIP

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIP(**model_cfg)
    model._open_clip_model_cfg = model_cfg
    return model.eval().requires_grad_(False)


def load_clip_target(path: str | Path) -> nn.Module:
    """An ``open_clip`` model from a local folder (``open_clip_config.json`` + weights: open_clip's ``local-dir:``
    format, e.g. a downloaded ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    import json

    import open_clip

    path = Path(path)
    if not (path / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"{path} has no open_clip_config.json: pass a folder in open_clip's local-dir format")
    model = open_clip.create_model(f"local-dir:{path}")
    model._open_clip_model_cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    return model.eval().requires_grad_(False)


def save_clip_target(model: nn.Module, path: Path, model_cfg: dict | None) -> None:
    """Write ``model`` in open_clip's ``local-dir:`` format (``open_clip_config.json`` + safetensors weights)."""
    import json

    from safetensors.torch import save_file

    if model_cfg is None:
        raise ValueError("the CLIP target's config is unknown; build it with build_clip_target or load_clip_target")
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))

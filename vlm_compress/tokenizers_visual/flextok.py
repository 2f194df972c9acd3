"""FlexTok: images → a 1-D, coarse-to-fine sequence of 1..K discrete tokens, decoded by a rectified flow.

FlexTok, arXiv 2502.13967 (ICML 2025), official code ``apple/ml-flextok`` (reference
``trained-tokenizers-speculative.md`` §5):

* **Encoder.** Patches of the image (or of a VAE latent) and ``K`` learned register tokens form one sequence.
  Patches attend to patches; register ``i`` attends to every patch and to registers ``j <= i`` (the prefix mask of
  ``generate_prefix_packed_seq_mask``). The registers are projected to ``len(levels)`` dims and quantised by FSQ
  (``[8, 8, 8, 5, 5, 5]``: 64 000 codes). Because the registers are causal, the first ``k`` tokens of a full
  encoding *are* the ``k``-token encoding, so ``encode(images, budget=k)`` truncates.
* **Nested dropout** (training, ``MaskedNestedDropout``): each sample keeps a random prefix ``k`` and the
  registers after it are *replaced by a learned mask token*, not removed; decoding ``k`` tokens does the same.
* **Decoder.** A rectified flow (``MinRFNoiseModule``): ``x_t = t·ε + (1 − t)·x0`` with ``t = sigmoid(N(0, 1))``,
  the model predicts ``v = ε − x0`` from noised patches and the (masked) registers, with AdaLN-zero timestep
  conditioning of its own for patches and for registers. The Euler sampler steps ``x ← x − v/steps`` from
  ``t = 1`` to 0; classifier-free guidance mixes in the prediction with every register masked (the null
  condition, trained by dropping the whole condition with probability ``cond_dropout``).

Deliberate differences from the official code:

* ``prediction="x"`` (the shipped model): in pixel space an 8×8×3 patch has more dimensions than the small
  decoder's width, so a network that must output ``v = ε − x0`` cannot carry the noise through; predicting the
  clean patch and stepping with ``v = (x_t − x̂0)/t`` avoids that (JiT: Li & He, "Back to Basics: Let Denoising
  Generative Models Denoise", 2025). Its loss is the MSE of ``x̂0``. The official models predict ``v`` (the
  default here, and what their checkpoints load as).
* ``time_mean`` shifts the logit-normal training times toward noise (the shipped model: 1.0, half of the samples
  at t > 0.73), where the decoder can only reconstruct from the registers; the official location is 0.
* The starting noise of ``decode`` is drawn once and shared by the batch, so an image decodes the same alone or
  in a batch.
* Pixel space by default (the small shipped model encodes 64×64 images directly); a diffusers ``AutoencoderKL``
  (FlexTok's ``StableDiffusionVAE``, f8) is used when ``vae_path`` is set or a ``vae`` is passed. Its posterior is
  sampled only when asked: ``encode(..., sample_posterior=True, generator=g)``; the official wrapper samples by
  default, which makes tokenisation stochastic (reference §5.4). Ours takes the posterior mode.
* Plain SDPA with a dense boolean mask (no FlexAttention, no sequence packing or padding to 128), no REPA loss;
  classifier-free guidance is plain CFG with every register masked as the null condition (the README's example
  uses APG, arXiv 2410.02416, and the official null condition is a dropout module of its own).
* The layers follow the official ones so its weights map by name (:mod:`.checkpoints`): bias-free ``wq/wk/wv/proj``
  with per-head QK-norm and the μP scale ``8/head_dim``, SwiGLU MLPs, parameter-free LayerNorms, AdaLN chunk
  order, a 256-frequency time embedding. The mask token lives in the decoder's width and overwrites registers
  after their position embedding, as the official module order has it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageTokenizer
from .layers import (
    FlexBlock,
    patchify,
    plain_norm,
    sincos_2d,
    timestep_embedding,
    unpatchify,
)
from .quantizers import FSQ

NESTED_MODES = ("pow2", "uniform", "uniform_pow2")
VAE_DIR = "vae"  # a saved tokenizer's VAE subfolder
TIME_FREQUENCIES = 256  # the sinusoid width of FlexTok's TimestepEmbedder
MIN_T = 0.05  # x-prediction: the floor of t when turning x̂0 into a velocity (JiT clips likewise)


@dataclasses.dataclass
class FlexTokConfig:
    image_size: int = dataclasses.field(default=64, metadata={"help": "Input images are image_size × image_size."})
    patch_size: int = dataclasses.field(default=4, metadata={"help": "Patch side, in pixels (or latent cells with a VAE)."})
    width: int = dataclasses.field(default=128, metadata={"help": "Transformer width of encoder and decoder."})
    heads: int = dataclasses.field(default=4, metadata={"help": "Attention heads."})
    encoder_depth: int = dataclasses.field(default=4, metadata={"help": "Encoder blocks."})
    decoder_depth: int = dataclasses.field(default=4, metadata={"help": "Decoder (flow) blocks."})
    mlp_ratio: float = dataclasses.field(default=4.0, metadata={"help": "MLP hidden width / width."})
    registers: int = dataclasses.field(default=256, metadata={"help": "K: register tokens, the longest encoding."})
    levels: list = dataclasses.field(default_factory=lambda: [8, 8, 8, 5, 5, 5],
                                     metadata={"help": "FSQ levels per code dimension (64 000 codes by default)."})
    nested_dropout: str = dataclasses.field(default="pow2", metadata={
        "help": "Training prefix lengths: 'pow2' (1, 2, 4, …, K), 'uniform' (1..K) or 'uniform_pow2' (uniform, "
                "rounded up to a power of two).", "choices": NESTED_MODES})
    cond_dropout: float = dataclasses.field(default=0.1, metadata={
        "help": "Training share of samples decoded with every register masked (the null condition of CFG)."})
    time_mean: float = dataclasses.field(default=0.0, metadata={
        "help": "Training times t = sigmoid(N(time_mean, 1)): 0 is the official logit-normal; > 0 trains more at "
                "high noise, where the decoder must rely on the registers."})
    drop_quant_p: float = dataclasses.field(default=0.0, metadata={"help": "Training share of samples that skip FSQ rounding."})
    prediction: str = dataclasses.field(default="v", metadata={
        "help": "What the decoder network outputs: 'v' (ε − x0, the official choice, in a VAE's low-dimensional "
                "latent) or 'x' (the clean patches, as JiT does for high-dimensional pixel patches); "
                "the sampler always steps with v.", "choices": ("v", "x")})
    adaln_groups: int = dataclasses.field(default=2, metadata={
        "help": "AdaLN modulation sets in the decoder: 2 = patches and registers modulated separately, 1 = shared.",
        "choices": (1, 2)})
    timesteps: int = dataclasses.field(default=25, metadata={"help": "Default Euler steps of decode()."})
    guidance_scale: float = dataclasses.field(default=1.0, metadata={"help": "Default CFG scale of decode() (1 = off)."})
    vae_path: str | None = dataclasses.field(default=None, metadata={
        "help": "Local folder of a diffusers AutoencoderKL to tokenise latents instead of pixels (None: pixels)."})


class FlexTokTokenizer(ImageTokenizer):
    """See the module docstring. ``encode(images, budget)`` → ``[B, k]`` ids in ``[0, prod(levels))``;
    ``decode(ids, steps=, guidance_scale=, generator=)`` → images for any ``1 <= k <= registers``."""

    kind = "flextok"
    config_class = FlexTokConfig

    def __init__(self, config: FlexTokConfig | None = None, vae: nn.Module | None = None):
        config = config or FlexTokConfig()
        super().__init__(config)
        if config.nested_dropout not in NESTED_MODES:
            raise ValueError(f"nested_dropout must be one of {NESTED_MODES}, got {config.nested_dropout!r}")
        if vae is None and config.vae_path:
            vae = load_vae(config.vae_path)
        self.vae = vae
        if vae is not None:
            channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
        else:
            channels, factor = 3, 1
        if config.image_size % (factor * config.patch_size):
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size·{factor}")
        self.channels, self.grid = channels, config.image_size // factor // config.patch_size
        self.latent_size = config.image_size // factor
        width, patch_dim, k = config.width, channels * config.patch_size**2, config.registers
        n = self.grid**2
        # encoder: patches (sin-cos positions) then K registers, prefix-causal over the registers
        self.enc_patch_emb = nn.Linear(patch_dim, width)
        self.register_buffer("enc_posemb", sincos_2d(self.grid, self.grid, width))
        self.enc_registers = nn.Parameter(torch.randn(k, width) * 0.02)
        self.enc_blocks = nn.ModuleList(FlexBlock(width, config.heads, config.mlp_ratio)
                                        for _ in range(config.encoder_depth))
        self.enc_to_latents = nn.Linear(width, len(config.levels))
        self.quantizer = FSQ(config.levels, drop_quant_p=config.drop_quant_p)
        self.register_buffer("encoder_mask", prefix_register_mask(n, k), persistent=False)
        # decoder: noised patches then the (masked) registers, AdaLN-zero on the flow time
        self.dec_from_latents = nn.Linear(len(config.levels), width)
        self.dec_register_posemb = nn.Parameter(torch.randn(k, width) * 0.02)
        self.dec_mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.dec_patch_emb = nn.Linear(patch_dim, width)
        self.register_buffer("dec_posemb", sincos_2d(self.grid, self.grid, width))
        self.dec_time_mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, width), nn.SiLU(), nn.Linear(width, width))
        if config.prediction not in ("v", "x"):
            raise ValueError(f"prediction must be 'v' or 'x', got {config.prediction!r}")
        if config.adaln_groups not in (1, 2):
            raise ValueError(f"adaln_groups must be 1 or 2, got {config.adaln_groups}")
        groups = (n, k) if config.adaln_groups == 2 else (n + k,)
        self.dec_blocks = nn.ModuleList(FlexBlock(width, config.heads, config.mlp_ratio, cond_dim=width, groups=groups)
                                        for _ in range(config.decoder_depth))
        self.dec_out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.dec_to_patches = nn.Linear(width, patch_dim)
        for layer in (self.dec_out_modulation[1], self.dec_to_patches):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- interface --------------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.quantizer.num_codes

    @property
    def max_tokens(self) -> int:
        return self.config.registers

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, T]`` → FSQ codes ``[B, T, len(levels)]`` in [-1, 1]."""
        return self.quantizer.indices_to_codes(self._check_tokens(tokens))

    def _encode(self, pixels, num_tokens, sample_posterior: bool = False, generator: torch.Generator | None = None):
        codes = self.quantizer(self.encode_registers(self.to_latent(pixels, sample_posterior, generator)))
        return codes.indices[:, :num_tokens]

    def _decode(self, tokens, steps: int | None = None, guidance_scale: float | None = None,
                generator: torch.Generator | None = None):
        steps = steps or self.config.timesteps
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        registers, masked = self.compact_registers(self.quantizer.indices_to_codes(tokens))
        null, null_masked = self.compact_registers(None, batch=len(tokens)) if scale != 1.0 else (None, 0)
        param = self._reference_parameter()
        # one starting noise shared by the batch (as SEED's official decoder shares its latents): an image decodes
        # the same alone or in any batch, for a given generator state
        shape = (1, self.grid**2, self.channels * self.config.patch_size**2)
        x = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype).expand(len(tokens), -1, -1)
        for i in range(steps):
            t = torch.full((len(tokens),), 1.0 - i / steps, device=x.device)
            v = self.velocity(x, registers, t, masked)
            if null is not None:
                v_null = self.velocity(x, null, t, null_masked)
                v = v_null + scale * (v - v_null)
            x = x - v / steps
        return self.from_latent(x)

    # ---- encoder ----------------------------------------------------------------------------------------
    def to_latent(self, pixels: torch.Tensor, sample_posterior: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → patches ``[B, N, C·p²]`` of the pixels (in [-1, 1]) or of the VAE latent
        (scaled; the posterior mode unless ``sample_posterior``)."""
        x = pixels * 2 - 1
        if self.vae is not None:
            posterior = self.vae.encode(x).latent_dist
            x = posterior.sample(generator) if sample_posterior else posterior.mode()
            x = x * getattr(self.vae.config, "scaling_factor", 1.0)
        elif sample_posterior:
            raise ValueError("this FlexTok works in pixel space (no vae_path): there is no VAE posterior to sample")
        return patchify(x, self.config.patch_size)

    def from_latent(self, patches: torch.Tensor) -> torch.Tensor:
        x = unpatchify(patches, self.config.patch_size, self.channels, self.latent_size, self.latent_size)
        if self.vae is not None:
            x = self.vae.decode(x / getattr(self.vae.config, "scaling_factor", 1.0)).sample
        return (x + 1) / 2

    def encode_registers(self, patches: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """Patches ``[B, N, C·p²]`` → pre-quantisation register vectors ``[B, count, len(levels)]`` (``count``
        defaults to K). The registers are causal, so the first ``count`` need only the first ``count`` register slots
        (training computes no more than each sample keeps; ``encode`` computes all K and truncates, so a shorter
        encoding is bit for bit a prefix of the full one)."""
        b, n = patches.shape[:2]
        count = self.config.registers if count is None else count
        x = torch.cat([self.enc_patch_emb(patches) + self.enc_posemb,
                       self.enc_registers[:count].expand(b, -1, -1)], 1)
        mask = self.encoder_mask[: n + count, : n + count]
        for block in self.enc_blocks:
            x = block(x, mask=mask)
        return self.enc_to_latents(plain_norm(x[:, n:]))

    # ---- decoder ----------------------------------------------------------------------------------------
    def decoder_registers(self, codes: torch.Tensor | None, keep: torch.Tensor | int, batch: int | None = None):
        """Codes ``[B, k, D]`` (``k <= K``; ``None`` for the null condition) → decoder register inputs ``[B, K, W]``:
        positions ``>= keep`` (an int or ``[B]``) hold the mask token (which replaces the position embedding too, as
        the official ``MaskedNestedDropout`` runs after it)."""
        k_max = self.config.registers
        if codes is None:
            codes = self.dec_mask_token.new_zeros(batch, 0, len(self.config.levels))
        codes = codes.to(self.dec_from_latents.weight.dtype)  # FSQ codes are float32; the model may be bf16/fp16
        padded = F.pad(codes, (0, 0, 0, k_max - codes.shape[1]))
        keep = torch.as_tensor(keep, device=codes.device).reshape(-1, 1)
        kept = torch.arange(k_max, device=codes.device)[None] < keep
        x = self.dec_from_latents(padded) + self.dec_register_posemb
        return torch.where(kept[..., None], x, self.dec_mask_token.to(x.dtype))

    def compact_registers(self, codes: torch.Tensor | None, batch: int | None = None) -> tuple[torch.Tensor, int]:
        """Codes ``[B, k, D]`` (``None``: the null condition, ``k = 0``) → the decoder's register inputs in compact
        form, ``[B, k + 1, W]`` (the ``k`` kept registers, then one mask token standing for the ``K − k`` masked
        ones; no mask token when ``k = K``), and ``K − k``.

        Exact, not an approximation of :meth:`decoder_registers`: the masked registers are identical inputs (the mask
        token replaces their position embedding too), so they stay identical through every block, and softmax over
        ``m`` equal logits equals one logit raised by ``log m`` (:meth:`network` adds it). The decoder then runs on
        ``N + k + 1`` positions instead of ``N + K`` (a test checks both forms agree)."""
        k_max = self.config.registers
        if codes is None:
            codes = self.dec_mask_token.new_zeros(batch, 0, len(self.config.levels))
        k = codes.shape[1]
        if k > k_max:
            raise ValueError(f"at most {k_max} registers, got {k}")
        x = self.dec_from_latents(codes.to(self.dec_from_latents.weight.dtype)) + self.dec_register_posemb[:k]
        if k < k_max:
            x = torch.cat([x, self.dec_mask_token.to(x.dtype).expand(len(x), 1, -1)], 1)
        return x, k_max - k

    def velocity(self, noised: torch.Tensor, registers: torch.Tensor, t: torch.Tensor, masked: int = 0) -> torch.Tensor:
        """The flow's velocity ``v ≈ ε − x0`` for noised patches ``[B, N, C·p²]`` at time ``t [B]``; an x-predicting
        network's clean estimate becomes ``(x_t − x̂0) / t`` (``t`` floored at :data:`MIN_T`). ``registers`` and
        ``masked``: see :meth:`network`."""
        out = self.network(noised, registers, t, masked)
        if self.config.prediction == "v":
            return out
        return (noised - out) / t.clamp(min=MIN_T)[:, None, None]

    def network(self, noised: torch.Tensor, registers: torch.Tensor, t: torch.Tensor, masked: int = 0) -> torch.Tensor:
        """The decoder transformer: ``v`` or ``x̂0`` (``config.prediction``) for every patch, ``[B, N, C·p²]``.

        ``registers [B, R, W]``: all K (:meth:`decoder_registers`, ``masked=0``) or the compact form of
        :meth:`compact_registers`, whose last entry stands for ``masked`` identical mask tokens."""
        n, r = noised.shape[1], registers.shape[1]
        cond = self.dec_time_mlp(timestep_embedding(t, TIME_FREQUENCIES).to(noised.dtype))
        x = torch.cat([self.dec_patch_emb(noised) + self.dec_posemb, registers], 1)
        bias = None
        if masked > 1:  # one key for `masked` equal ones: its logit + log(masked)
            bias = x.new_zeros(1, 1, 1, n + r)
            bias[..., -1] = math.log(masked)
        groups = (n, r) if self.config.adaln_groups == 2 else (n + r,)
        for block in self.dec_blocks:
            x = block(x, cond, mask=bias, groups=groups)
        shift, scale = self.dec_out_modulation(cond)[:, None].chunk(2, -1)
        return self.dec_to_patches(plain_norm(x[:, :n]) * (1 + scale) + shift)

    # ---- training ---------------------------------------------------------------------------------------
    def sample_keep(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Nested-dropout prefix lengths ``[B]`` in 1..K for one training batch (``nested_dropout`` mode)."""
        k_max = self.config.registers
        mode = self.config.nested_dropout
        if mode == "pow2":
            powers = torch.tensor([2**i for i in range(int(math.log2(k_max)) + 1)] + [k_max]).unique()
            return powers[torch.randint(len(powers), (batch,), generator=generator)]
        keep = torch.randint(1, k_max + 1, (batch,), generator=generator)
        if mode == "uniform_pow2":
            keep = (2 ** torch.ceil(torch.log2(keep.float()))).long().clamp(max=k_max)
        return keep

    def training_loss(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rectified-flow loss with nested dropout and condition dropout for a batch ``[B, 3, H, W]`` in [0, 1]."""
        x0 = self.to_latent(pixels)
        b = x0.shape[0]
        keep = self.sample_keep(b, generator).to(x0.device)
        drop = torch.rand(b, generator=generator).to(x0.device) < self.config.cond_dropout
        keep = torch.where(drop, 0, keep)
        t = torch.sigmoid(torch.randn(b, generator=generator) + self.config.time_mean).to(x0)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        noised = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
        target = noise - x0 if self.config.prediction == "v" else x0
        # the samples that keep k registers run together on N + k (+1) positions: the same loss as padding every
        # sample to K registers (causal encoder, compact_registers), at a fraction of the cost for short prefixes
        squared = x0.new_zeros(())
        for k in keep.unique().tolist():
            rows = (keep == k).nonzero().flatten()
            codes = self.quantizer(self.encode_registers(x0[rows], k)).codes if k else None
            registers, masked = self.compact_registers(codes, batch=len(rows))
            squared = squared + (self.network(noised[rows], registers, t[rows], masked) - target[rows]).pow(2).sum()
        return squared / target.numel()

    def _skip_saving(self, key: str) -> bool:
        return key.startswith("vae.")

    def save_pretrained(self, path, extra=None, dtype=None) -> None:
        """The tokenizer's folder; a VAE goes to ``vae/`` in diffusers' format (``load_tokenizer`` reads it back)."""
        super().save_pretrained(path, {"vae_path": None, **(extra or {})}, dtype)
        if self.vae is not None:
            vae = self.vae
            if dtype is not None:
                import copy

                vae = copy.deepcopy(vae).to(dtype)
            vae.save_pretrained(Path(path) / VAE_DIR, safe_serialization=True)


def prefix_register_mask(patches: int, registers: int) -> torch.Tensor:
    """``[N+K, N+K]`` bool, ``True`` = may attend: patches see patches only; register ``i`` sees every patch and the
    registers ``j <= i`` (FlexTok's ``causal_last`` prefix-LM mask)."""
    total = patches + registers
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:patches, :patches] = True
    mask[patches:, :patches] = True
    mask[patches:, patches:] = torch.ones(registers, registers, dtype=torch.bool).tril()
    return mask


def load_vae(path: str) -> nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder (FlexTok's VAEs are ``EPFL-VILAB/flextok_vae_c{4,8,16}``)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError("a FlexTok VAE needs diffusers: pip install 'vlm-compress[tokenizers]'") from err
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval()

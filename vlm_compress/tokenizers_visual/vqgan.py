"""A grid VQ image tokenizer in the form LlamaGen generates over: a convolutional encoder to an ``s × s`` grid, a
VQ codebook with l2-normalised low-dimensional codes, and a convolutional decoder.

LlamaGen, arXiv 2406.06525, §2.1 (``tokenizer/tokenizer_image/vq_model.py``): the VQ-16 tokenizer downsamples by
16, looks codes up in a 16384 × 8 codebook after l2-normalising both sides (``codebook_l2_norm=True``, the cosine
codebook of ViT-VQGAN) and is trained with reconstruction, VQ (β = 0.25), perceptual and GAN losses.
:mod:`vlm_compress.speculative` generates over these codes, and LANTERN's latent-proximity sets come from
:meth:`VQGANTokenizer.codebook` (reference ``trained-tokenizers-speculative.md`` §6).

Deliberate differences: sizes for 64×64 scenes (downsampling 8 to an 8×8 grid, one code per ShapesVQA cell, 512
codes), one residual block per level and no attention blocks, and a plain MSE + VQ objective (no LPIPS, which
needs pretrained VGG weights we cannot download, and no GAN). Training starts as a plain autoencoder for
``ae_warmup`` steps, then seeds the codebook with encoder outputs and quantises: quantising from the first step,
this small model collapsed (the decoder learnt the mean image before the codes meant anything, the reconstruction
gradient to the encoder vanished and the VQ loss pulled every output onto a few codes). Codes unused over a
stretch of training are restarted from encoder outputs (:meth:`VectorQuantizer.restart_dead_codes`). A grid
tokenizer has no shorter encodings: ``budget`` must cover every cell.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageTokenizer
from .quantizers import VectorQuantizer


@dataclasses.dataclass
class VQGANConfig:
    image_size: int = dataclasses.field(default=64, metadata={"help": "Input images are image_size × image_size."})
    base_channels: int = dataclasses.field(default=16, metadata={"help": "Channels of the first level."})
    channel_mult: list = dataclasses.field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "Channel multiplier per level; each level but the last halves the resolution (4 levels: ÷8)."})
    codebook_size: int = dataclasses.field(default=512, metadata={"help": "Codes in the codebook."})
    code_dim: int = dataclasses.field(default=8, metadata={"help": "Code vector width (LlamaGen: 8)."})
    l2_codebook: bool = dataclasses.field(default=True, metadata={
        "help": "l2-normalise encoder outputs and codes before the lookup (LlamaGen's codebook_l2_norm)."})
    beta: float = dataclasses.field(default=0.25, metadata={"help": "Commitment weight of the VQ loss."})
    restart_every: int = dataclasses.field(default=100, metadata={
        "help": "Training: restart codes unused for this many steps (0: never)."})
    ae_warmup: int = dataclasses.field(default=200, metadata={
        "help": "Training: first steps decoded from the unquantised encoder output; the codebook is then seeded "
                "with encoder outputs and the VQ switched on (0: quantise from the start)."})


def _norm(channels: int) -> nn.GroupNorm:
    # taming's GroupNorm(32) on 128+ channels: at least 4 channels per group (one channel per group would be an
    # instance norm, which removes each channel's image-wide mean, e.g. the scene's brightness, before the output)
    return nn.GroupNorm(max(1, min(32, channels // 4)), channels, eps=1e-6)


class ResBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))`` with a 1×1 skip when the width changes (taming/LlamaGen)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            layers.append(ResBlock(cin, width))
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            cin = width
        self.blocks = nn.Sequential(*layers, ResBlock(cin, cin))
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, config.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult][::-1]
        self.conv_in = nn.Conv2d(config.code_dim, widths[0], 3, padding=1)
        layers, cin = [ResBlock(widths[0], widths[0])], widths[0]
        for i, width in enumerate(widths):
            layers.append(ResBlock(cin, width))
            if i < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
            cin = width
        self.blocks = nn.Sequential(*layers)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class VQGANTokenizer(ImageTokenizer):
    """See the module docstring. ``encode(images)`` → ``[B, s·s]`` ids in raster order; ``decode`` needs all of them;
    ``embed`` and :meth:`codebook` give the (l2-normalised) code vectors."""

    kind = "vqgan"
    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig | None = None):
        config = config or VQGANConfig()
        super().__init__(config)
        factor = 2 ** (len(config.channel_mult) - 1)
        if config.image_size % factor:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the downsampling {factor}")
        self.grid = config.image_size // factor
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, beta=config.beta,
                                         normalize=config.l2_codebook)
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def max_tokens(self) -> int:
        return self.grid**2

    def codebook(self) -> torch.Tensor:
        """``[codebook_size, code_dim]``: the vectors the lookup compares (normalised when ``l2_codebook``)."""
        return self.quantizer.codebook.detach()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.quantizer.indices_to_codes(self._check_tokens(tokens))

    def quantize(self, pixels: torch.Tensor):
        """``[B, 3, S, S]`` in [0, 1] → the quantiser's output on the ``[B, s·s, code_dim]`` grid (raster order)."""
        return self.quantizer(self._latents(pixels))

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [0, 1] → encoder outputs ``[B, s·s, code_dim]`` in raster order."""
        return self.encoder(pixels * 2 - 1).flatten(2).transpose(1, 2)

    def _encode(self, pixels: torch.Tensor, num_tokens: int) -> torch.LongTensor:
        if num_tokens != self.max_tokens:
            raise ValueError(f"a grid VQ tokenizer encodes every one of its {self.max_tokens} cells; pass budget=None "
                             f"(FlexTok gives shorter encodings)")
        return self.quantize(pixels).indices

    def _decode(self, tokens: torch.LongTensor) -> torch.Tensor:
        if tokens.shape[1] != self.max_tokens:
            raise ValueError(f"decoding needs all {self.max_tokens} codes of the {self.grid}×{self.grid} grid, "
                             f"got {tokens.shape[1]}")
        return self.decode_codes(self.quantizer.indices_to_codes(tokens))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors ``[B, s·s, code_dim]`` → images ``[B, 3, S, S]`` (unclamped, [0, 1] scale)."""
        b = codes.shape[0]
        z = codes.transpose(1, 2).reshape(b, -1, self.grid, self.grid)
        return (self.decoder(z.to(self.decoder.conv_in.weight.dtype)) + 1) / 2

    def training_loss(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixel MSE of the reconstruction plus the VQ loss, for ``pixels [B, 3, S, S]`` in [0, 1]."""
        z = self._latents(pixels)
        out = self.quantizer(z)  # in the warm-up too: its last inputs seed the codebook
        if int(self.steps_trained) < self.config.ae_warmup:  # autoencoder warm-up (module docstring)
            return F.mse_loss(self.decode_codes(F.normalize(z, dim=-1) if self.config.l2_codebook else z), pixels)
        return F.mse_loss(self.decode_codes(out.codes), pixels) + out.loss

    def after_step(self, step: int) -> None:
        self.steps_trained += 1
        done, warmup, every = int(self.steps_trained), self.config.ae_warmup, self.config.restart_every
        if done == warmup:  # seed every code with an encoder output of the last batch
            self.quantizer.restart_dead_codes(threshold=2**62)
        elif done > warmup and every and (done - warmup) % every == 0:
            self.quantizer.restart_dead_codes(threshold=1)

"""A class-conditional autoregressive image generator over grid VQ codes, LlamaGen-style, with a KV cache that
speculative decoding can roll back.

LlamaGen, arXiv 2406.06525, §2.2 (``autoregressive/models/gpt.py``): a Llama decoder (RMSNorm, SwiGLU, rotary
positions, no biases) over the codes of an ``s × s`` VQ grid in raster order, the class as one prefix token, the
class replaced by a learned null class with probability 0.1 during training for classifier-free guidance, 2-D
rotary positions for the image tokens (each code rotated by its row and column).

Deliberate differences: the class, null class and codes share one input embedding table (rows ``[0, V)`` codes,
``[V, V + C)`` classes, ``V + C`` the null class; LlamaGen has a separate ``LabelEmbedder``), the output head
covers the ``V`` codes only; the class token is not rotated (LlamaGen gives it all-zero ``freqs_cis``, which zeroes
its query and key); attention is SDPA with an explicit mask when a cache holds earlier tokens; the cache is
preallocated per generation and :meth:`KVCache.crop` rolls it back after a rejected draft.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import model_folder
from ..model_folder import CONFIG_NAME

MODEL_KIND = "imagegpt"


@dataclasses.dataclass
class ImageGPTConfig:
    codebook_size: int = dataclasses.field(default=512, metadata={"help": "V: the VQ codes generated."})
    num_classes: int = dataclasses.field(default=18, metadata={"help": "C: classes conditioned on."})
    grid: int = dataclasses.field(default=8, metadata={"help": "The codes form a grid × grid raster."})
    width: int = dataclasses.field(default=192, metadata={"help": "Transformer width."})
    depth: int = dataclasses.field(default=6, metadata={"help": "Decoder blocks."})
    heads: int = dataclasses.field(default=6, metadata={"help": "Attention heads (head width divisible by 4)."})
    mlp_hidden: int = dataclasses.field(default=512, metadata={"help": "SwiGLU hidden width."})
    class_dropout: float = dataclasses.field(default=0.1, metadata={
        "help": "Training share of samples whose class is the null class (classifier-free guidance)."})
    rope_base: float = dataclasses.field(default=10000.0, metadata={"help": "Rotary frequency base."})

    @property
    def num_codes(self) -> int:
        return self.grid**2

    @property
    def null_class(self) -> int:
        return self.codebook_size + self.num_classes


class KVCache:
    """Keys and values of every layer, ``[layers, B, heads, max_len, head_dim]``, preallocated; ``length`` positions
    are valid. :meth:`crop` keeps the first ``length`` (a rejected draft's entries are simply overwritten later)."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (layers, batch, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} positions to {length}")
        self.length = length


def rope_tables(config: ImageGPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [1 + grid², head_dim / 2]`` per sequence position: position 0 (the class) is not rotated, position
    ``1 + i`` is code ``i`` at (row, column) ``divmod(i, grid)``; the first half of the rotated pairs turn with the
    row, the second half with the column (LlamaGen's ``precompute_freqs_cis_2d``)."""
    head_dim = config.width // config.heads
    quarter = head_dim // 4
    freqs = 1.0 / config.rope_base ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    index = torch.arange(config.num_codes)
    rows, cols = (index // config.grid).double(), (index % config.grid).double()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], 1)  # [grid², head_dim/2]
    angles = torch.cat([angles.new_zeros(1, angles.shape[1]), angles])
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of ``x [B, H, n, head_dim]`` by the angles of ``cos/sin [n, head_dim/2]``."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.width // config.heads
        self.wqkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.wo = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        b, n, _ = x.shape
        q, k, v = self.wqkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            cache.keys[layer, :, :, start:start + n] = k
            cache.values[layer, :, :, start:start + n] = v
            keys, values = cache.keys[layer, :, :, :start + n], cache.values[layer, :, :, :start + n]
            mask = None
            if n > 1:  # new token i sees the cache and new tokens <= i
                mask = torch.ones(n, start + n, dtype=torch.bool, device=x.device).tril(start)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(config.width, eps=1e-5), nn.RMSNorm(config.width, eps=1e-5)
        self.attention = Attention(config)
        self.w1 = nn.Linear(config.width, config.mlp_hidden, bias=False)
        self.w3 = nn.Linear(config.width, config.mlp_hidden, bias=False)
        self.w2 = nn.Linear(config.mlp_hidden, config.width, bias=False)

    def forward(self, x, cos, sin, layer, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, layer, cache)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class ImageGPT(nn.Module):
    """See the module docstring. ``forward(ids [B, n], cache)`` → next-code logits ``[B, n, V]``; the ids at
    sequence position 0 are classes (``V + c``, or :attr:`ImageGPTConfig.null_class`), later ones codes."""

    def __init__(self, config: ImageGPTConfig | None = None):
        super().__init__()
        config = config or ImageGPTConfig()
        if (config.width // config.heads) % 4 or config.width % config.heads:
            raise ValueError(f"width {config.width} / heads {config.heads} must give a head width divisible by 4")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.null_class + 1, config.width)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.RMSNorm(config.width, eps=1e-5)
        self.output = nn.Linear(config.width, config.codebook_size, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:  # LlamaGen's _init_weights: N(0, 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def max_positions(self) -> int:
        return self.config.num_codes + 1

    def new_cache(self, batch: int) -> KVCache:
        param = self.output.weight
        return KVCache(self.config.depth, batch, self.config.heads, self.config.width // self.config.heads,
                       self.max_positions, param.dtype, param.device)

    def class_ids(self, classes: torch.Tensor, null: bool = False) -> torch.Tensor:
        """Classes ``[B]`` → their input ids ``[B, 1]`` (the null class for all when ``null``)."""
        classes = torch.as_tensor(classes, device=self.output.weight.device).long().reshape(-1)
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.config.num_classes):
            raise ValueError(f"classes must lie in [0, {self.config.num_classes}), got {classes.tolist()}")
        if null:
            return torch.full_like(classes, self.config.null_class)[:, None]
        return (classes + self.config.codebook_size)[:, None]

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        n = ids.shape[1]
        if start + n > self.max_positions:
            raise ValueError(f"{start + n} positions exceed the class token + {self.config.num_codes} codes")
        cos, sin = self.rope_cos[start:start + n], self.rope_sin[start:start + n]
        x = self.tok_embeddings(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.length = start + n
        return self.output(self.norm(x)).float()

    def training_loss(self, codes: torch.Tensor, classes: torch.Tensor, generator: torch.Generator | None = None,
                      teacher: "ImageGPT | None" = None) -> torch.Tensor:
        """Next-code cross-entropy on ``codes [B, grid²]`` given ``classes [B]``, the class dropped to the null class
        with probability ``class_dropout``. With a ``teacher`` (a drafter's training): cross-entropy against the
        teacher's distributions on the same inputs (soft labels), the distillation a drafter is trained with."""
        ids = self.class_ids(classes)
        drop = torch.rand(len(ids), generator=generator).to(ids.device) < self.config.class_dropout
        ids = torch.where(drop[:, None], self.config.null_class, ids)
        inputs = torch.cat([ids, codes[:, :-1]], 1)
        logits = self(inputs)
        if teacher is None:
            return F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        with torch.no_grad():
            target = teacher(inputs).softmax(-1)
        return -(target * logits.log_softmax(-1)).sum(-1).mean()

    # ---- weights ----------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        model_folder.write(path, {"model": MODEL_KIND, **dataclasses.asdict(self.config)}, self.state_dict(), dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ImageGPT":
        """A generator from a ``save_pretrained`` folder, in eval mode, float32."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is not an ImageGPT folder (no {CONFIG_NAME}); pass a folder written by "
                                    f"ImageGPT.save_pretrained or an embedded name")
        spec = json.loads((path / CONFIG_NAME).read_text())
        if spec.pop("model", None) != MODEL_KIND:
            raise ValueError(f"{path / CONFIG_NAME} does not describe an {MODEL_KIND} model")
        fields = {f.name for f in dataclasses.fields(ImageGPTConfig)}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"unknown ImageGPT config keys {unknown}; known: {sorted(fields)}")
        model = cls(ImageGPTConfig(**spec))
        model.load_state_dict({k: v.float() for k, v in model_folder.read_weights(path).items()})
        return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config: ImageGPTConfig, context: int) -> float:
    """Forward FLOPs of one token at ``context`` cached positions (2 per multiply-add; attention over the context)."""
    w, h = config.width, config.mlp_hidden
    per_layer = 2 * (4 * w * w + 3 * w * h) + 4 * w * context
    return config.depth * per_layer + 2 * w * config.codebook_size

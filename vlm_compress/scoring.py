"""Attention rows of a vision tower without ``output_attentions``.

Forward hooks on ``q_proj``/``k_proj`` of the requested encoder layers keep the projections the tower computes
anyway (the query of the first token only, unless every row is asked for), so the tower runs with SDPA or
FlashAttention and we compute just the rows we need (HiRED, arXiv 2408.10945, does the same).

Towers without a CLS token (SigLIP, OneVision's and Qwen's towers) give CLS-based methods one substitute score,
defined here once: the attention each token *receives*, averaged over every query token of its tower image
(softmax over keys per head, then heads reduced as the method asks). It is the column mean of the attention map,
the "global importance" that CLS-free ports of FastV/VisionZip-style scoring use; on a CLIP tower it ranks much
like the CLS row (the CLS row is one of the rows it averages).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import HeadReduce, ScoreKind, row_attention


def attention_heads(attn: nn.Module) -> int:
    """Query heads of a tower attention module: ``num_heads`` (CLIP, SigLIP, vLLM) or ``num_attention_heads`` (DINOv2)."""
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    if heads is None:
        raise TypeError(f"{type(attn).__name__} has neither num_heads nor num_attention_heads (the score hooks need it)")
    return int(heads)


def attention_scale(attn: nn.Module) -> float:
    """Softmax scale of a tower attention module: ``scale`` (CLIP, SigLIP, vLLM) or ``scaling`` (DINOv2, Qwen's ViT)."""
    scale = getattr(attn, "scale", None)
    scale = getattr(attn, "scaling", None) if not isinstance(scale, (int, float)) else scale
    if not isinstance(scale, (int, float)):
        raise TypeError(f"{type(attn).__name__} has neither scale nor scaling (the score hooks need it)")
    return float(scale)


class AttentionCapture:
    """Context manager capturing queries and keys of some attention modules during one tower forward.

    attention_modules: ``{layer_index: attention module}``; each module must have ``q_proj`` and ``k_proj`` (or one
    fused ``qkv_proj`` whose output is ``[q | k | v]``, as vLLM's CLIP attention has), ``head_dim``, a head count
    (``num_heads``: CLIP, SigLIP; ``num_attention_heads``: DINOv2) and a softmax scale (``scale``; ``scaling``:
    DINOv2), read through :func:`attention_heads` and :func:`attention_scale`. ``layer_modules``: ``{layer_index: encoder layer}`` whose output
    hidden states to keep (``hidden_states[layer]``). Hooks exist only inside the ``with`` block.
    """

    def __init__(self, attention_modules: dict[int, nn.Module], all_query_rows: bool = False,
                 layer_modules: dict[int, nn.Module] | None = None, has_cls: bool = True):
        self.modules = attention_modules
        self.has_cls = has_cls
        self.all_query_rows = all_query_rows or not has_cls  # the CLS substitute averages every query row
        self.layer_modules = layer_modules or {}
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.hidden_states: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "AttentionCapture":
        for layer, attn in self.modules.items():
            if not hasattr(attn, "q_proj") and hasattr(attn, "qkv_proj"):
                self._handles.append(attn.qkv_proj.register_forward_hook(self._store_fused(layer)))
                continue
            self._handles.append(attn.q_proj.register_forward_hook(self._store(self.queries, layer, query=True)))
            self._handles.append(attn.k_proj.register_forward_hook(self._store(self.keys, layer, query=False)))
        for layer, module in self.layer_modules.items():
            def keep(module: nn.Module, args: tuple, output, layer: int = layer) -> None:
                self.hidden_states[layer] = (output[0] if isinstance(output, tuple) else output).detach()

            self._handles.append(module.register_forward_hook(keep))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _store(self, bucket: dict[int, torch.Tensor], layer: int, query: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out = output.detach()
            bucket[layer] = out if (not query or self.all_query_rows) else out[:, :1].clone()

        return hook

    def _store_fused(self, layer: int):
        """Hook of a fused ``qkv_proj`` (vLLM's linear layers return ``(output, bias)``): the q and k thirds."""
        def hook(module: nn.Module, args: tuple, output) -> None:
            out = (output[0] if isinstance(output, tuple) else output).detach()
            q, k, _ = out.chunk(3, dim=-1)
            self.queries[layer] = q if self.all_query_rows else q[:, :1].clone()
            self.keys[layer] = k

        return hook

    def _split_heads(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        attn = self.modules[layer]
        return x.view(*x.shape[:2], attention_heads(attn), attn.head_dim)

    def _require(self, layer: int) -> None:
        if layer not in self.keys:
            raise RuntimeError(
                f"no keys captured for vision layer {layer}; the pruner must list it in attention_layers()"
            )

    def first_row_attention(self, layer: int, head_reduce: HeadReduce = "mean", kind: ScoreKind = "probs") -> torch.Tensor:
        """Attention of the first token (CLS) to every token of ``layer``: ``[I, T]`` float32. Without a CLS token,
        the substitute of the module docstring: the attention each token receives, mean over all query rows."""
        self._require(layer)
        if not self.has_cls:
            return self.received_attention(layer, head_reduce, kind)
        q = self._split_heads(layer, self.queries[layer][:, :1])
        k = self._split_heads(layer, self.keys[layer])
        return row_attention(q, k, attention_scale(self.modules[layer]), head_reduce, kind)[:, 0]

    def received_attention(self, layer: int, head_reduce: HeadReduce = "mean", kind: ScoreKind = "probs") -> torch.Tensor:
        """``[I, T]`` float32: per head, the mean over query rows of each key's attention (softmax over keys for
        ``"probs"``, raw ``q·k·scale`` for ``"logits"``), then heads reduced; one head at a time in memory."""
        heads = torch.stack([a.mean(dim=1) for a in self._head_maps(layer, kind, skip=0)], dim=1)  # [I, H, T]
        if head_reduce == "mean":
            return heads.mean(dim=1)
        if head_reduce == "sum":
            return heads.sum(dim=1)
        return heads.max(dim=1).values

    def _head_maps(self, layer: int, kind: ScoreKind, skip: int):
        """Per head, ``[I, T-skip, T-skip]``: the attention among the tokens after the first ``skip`` (softmax over
        every key, CLS included, for ``"probs"``). Needs all query rows; yields one head at a time."""
        self._require(layer)
        queries = self.queries[layer]
        if queries.shape[1] != self.keys[layer].shape[1]:
            raise RuntimeError(f"layer {layer} was captured without all query rows; the pruner must ask for them")
        q = self._split_heads(layer, queries)[:, skip:].float()
        k = self._split_heads(layer, self.keys[layer]).float()
        scale = attention_scale(self.modules[layer])
        for h in range(q.shape[2]):
            a = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h]) * scale
            yield (a.softmax(-1) if kind == "probs" else a)[:, :, skip:]

    def head_mean_keys(self, layer: int) -> torch.Tensor:
        """Keys of ``layer`` averaged over heads: ``[I, T, head_dim]``."""
        self._require(layer)
        return self._split_heads(layer, self.keys[layer]).mean(dim=2)

    def attention_means(self, layer: int, kind: ScoreKind = "logits", skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-mean attention among the tokens after the first ``skip`` (CLS) of ``layer`` (softmax over every key),
        averaged per token:
        ``(received [I, T-skip], given [I, T-skip])`` (mean over queries, mean over keys). Needs all query rows
        (``all_query_rows=True``); heads are processed one at a time, so at most ``[I, T, T]`` is held."""
        heads = attention_heads(self.modules[layer])
        mean = sum(self._head_maps(layer, kind, skip)) / heads
        return mean.mean(dim=1), mean.mean(dim=2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PackedAttentionCapture(AttentionCapture):
    """:class:`AttentionCapture` for a tower that runs every image of a call as one packed sequence: Qwen2-VL's and
    Qwen2.5-VL's ViT (``[S, D]`` hidden states, one fused ``qkv`` projection, 2-D rotary applied inside attention,
    attention within each image/frame or, in most Qwen2.5-VL layers, within windows). No CLS token.

    Captured tensors are ``[1, S, ...]`` in the order the blocks see tokens; ``segments`` (set by a hook on the
    tower from its ``grid_thw``) are the ``[start, end)`` ranges of one image or one video frame (``t`` slices of
    ``h·w`` patches each; Qwen2.5-VL's window permutation stays inside a frame). The scores are computed over a
    whole segment even where a layer attended within windows, so they rank tokens across the image (window-local
    softmaxes would give every window the same total mass). Queries get the rotary tables the attention received.
    The attention each token receives is accumulated over blocks of query rows (all heads at once, at most ``block``
    rows and 4 M entries per block), so no ``[S, S]`` map is held.
    """

    def __init__(self, attention_modules: dict[int, nn.Module], tower: nn.Module, all_query_rows: bool = True,
                 layer_modules: dict[int, nn.Module] | None = None, block: int = 1024):
        super().__init__(attention_modules, True, layer_modules, has_cls=False)  # the substitute reads every row
        self.tower = tower
        self.block = block
        self.segments: list[tuple[int, int]] = []
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> "PackedAttentionCapture":
        self._handles.append(self.tower.register_forward_pre_hook(self._grid, with_kwargs=True))
        for layer, attn in self.modules.items():
            self._handles.append(attn.register_forward_pre_hook(self._rotary(layer), with_kwargs=True))
            self._handles.append(attn.qkv.register_forward_hook(self._qkv(layer)))
        for layer, module in self.layer_modules.items():
            def keep(module: nn.Module, args: tuple, output, layer: int = layer) -> None:
                out = output[0] if isinstance(output, tuple) else output
                self.hidden_states[layer] = out.detach()[None]

            self._handles.append(module.register_forward_hook(keep))
        return self

    def _grid(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).tolist()
        ends = torch.tensor(lengths).cumsum(0).tolist()
        self.segments = [(end - n, end) for n, end in zip(lengths, ends)]

    def _rotary(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._tables[layer] = kwargs["position_embeddings"]

        return hook

    def _qkv(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            attn = self.modules[layer]
            s = output.shape[0]
            q, k, _ = output.detach().view(s, 3, attention_heads(attn), -1).float().unbind(1)  # [S, H, hd] each
            cos, sin = (t.detach().float()[:, None] for t in self._tables[layer])
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            self.queries[layer], self.keys[layer] = q.flatten(1)[None], k.flatten(1)[None]

        return hook

    def _scale(self, layer: int) -> float:
        return attention_scale(self.modules[layer])

    def first_row_attention(self, layer: int, head_reduce: HeadReduce = "mean", kind: ScoreKind = "probs") -> torch.Tensor:
        """``[1, S]``: the CLS substitute (no CLS here), the attention each token receives within its segment."""
        return self.received_attention(layer, head_reduce, kind)

    def _per_head(self, layer: int, kind: ScoreKind, given: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(received [H, S], given [H, S] or None)`` per head: mean over a segment's queries / over its keys. All
        heads at once over blocks of query rows, at most ``block`` rows and 4 M attention entries per block."""
        self._require(layer)
        q = self._split_heads(layer, self.queries[layer])[0].transpose(0, 1)  # [H, S, hd]
        k = self._split_heads(layer, self.keys[layer])[0].transpose(0, 1)
        scale = self._scale(layer)
        heads, total = q.shape[0], q.shape[1]
        received = torch.zeros(heads, total)
        gave = torch.zeros(heads, total) if given else None
        for start, end in self.segments:
            keys = k[:, start:end]
            rows = max(1, min(self.block, (1 << 22) // (heads * (end - start))))
            for row in range(start, end, rows):
                stop = min(row + rows, end)
                a = torch.matmul(q[:, row:stop], keys.transpose(1, 2)) * scale  # [H, rows, n]
                a = a.softmax(-1) if kind == "probs" else a
                received[:, start:end] += a.sum(1) / (end - start)
                if given:
                    gave[:, row:stop] = a.mean(2)
        return received, gave

    def received_attention(self, layer: int, head_reduce: HeadReduce = "mean", kind: ScoreKind = "probs") -> torch.Tensor:
        heads = self._per_head(layer, kind)[0]  # [H, S]
        if head_reduce == "mean":
            return heads.mean(0)[None]
        if head_reduce == "sum":
            return heads.sum(0)[None]
        return heads.max(0).values[None]

    def attention_means(self, layer: int, kind: ScoreKind = "logits", skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-mean ``(received [1, S], given [1, S])`` within each segment (``skip`` must be 0: no CLS)."""
        if skip:
            raise ValueError("a packed tower has no CLS token to skip")
        received, given = self._per_head(layer, kind, given=True)
        return received.mean(0)[None], given.mean(0)[None]

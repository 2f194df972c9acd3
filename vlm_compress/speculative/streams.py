"""One model's side of a generation: its cache, classifier-free guidance, and the logits decoding reads.

The decoding loops (:mod:`.decoding`) talk to models only through this protocol, so a lookup-table model can stand
in for a transformer in the exact-enumeration tests:

* ``start(classes [B]) -> logits [B, V]`` for the first code (a fresh cache holding the class prefix);
* ``extend(codes [B, n]) -> logits [B, n, V]``: feed ``n`` codes, the logits after each;
* ``crop(length)``: keep the first ``length`` codes fed (the prefix stays), to roll back rejected drafts;
* ``length``: codes fed so far.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .gpt import ImageGPT


class Stream(Protocol):
    length: int

    def start(self, classes: torch.Tensor) -> torch.Tensor: ...

    def extend(self, codes: torch.Tensor) -> torch.Tensor: ...

    def crop(self, length: int) -> None: ...


class ModelStream:
    """An :class:`ImageGPT` behind the stream protocol. With ``cfg_scale != 1`` every call runs the conditional and
    the null-class sequence in one batch and returns ``u + s·(c − u)`` (LlamaGen's classifier-free guidance), so a
    target and its drafter are each guided the same way in plain and in speculative decoding."""

    def __init__(self, model: ImageGPT, cfg_scale: float = 1.0):
        self.model, self.cfg_scale = model, float(cfg_scale)
        self.cache = None

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length - 1

    @torch.no_grad()
    def start(self, classes: torch.Tensor) -> torch.Tensor:
        ids = self.model.class_ids(classes)
        if self.guided:
            ids = torch.cat([ids, self.model.class_ids(classes, null=True)])
        self.cache = self.model.new_cache(len(ids))
        return self._run(ids)[:, -1]

    @torch.no_grad()
    def extend(self, codes: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("call start(classes) before extend")
        codes = codes.to(self.model.output.weight.device)
        return self._run(torch.cat([codes, codes]) if self.guided else codes)

    def crop(self, length: int) -> None:
        self.cache.crop(length + 1)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids, self.cache)
        if not self.guided:
            return logits
        cond, uncond = logits.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)

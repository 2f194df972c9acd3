"""One module per method; importing this package registers them all."""

from . import atp, cdpruner, cls_attn, dart, divprune, fastv, fopru, globalcom2, h2o, hired, m3, mqt, mustdrop, mustdrop_llm, pmod, pool, quota, random, scope, visionzip  # noqa: F401  (registration side effects)
from .base import EncoderContext, EncoderPruner, EncoderSelection
from .llm_base import PrefillContext, PrefillPruner

__all__ = ["EncoderContext", "EncoderPruner", "EncoderSelection", "PrefillContext", "PrefillPruner"]

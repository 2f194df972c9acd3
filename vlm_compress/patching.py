"""Per-instance method patches that ``restore`` undoes exactly (the accelerate ``ModelHook`` idea).

A patch stores a wrapper as an *instance* attribute shadowing the class method; the class is never touched, so
other instances are unaffected and removing the attribute gives back the original bound method.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

_PATCHED = "_vlm_compress_patched"


def patch_method(module: nn.Module, name: str, make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Shadow ``module.<name>`` with ``make_wrapper(original)``; the wrapper keeps the original's signature."""
    if name in module.__dict__:
        raise RuntimeError(f"{type(module).__name__}.{name} is already patched on this instance")
    original = getattr(module, name)
    wrapper = functools.wraps(original)(make_wrapper(original))
    module.__dict__[name] = wrapper
    module.__dict__.setdefault(_PATCHED, []).append(name)


def unpatch_all(module: nn.Module) -> None:
    """Remove every patch made by :func:`patch_method` on ``module``."""
    for name in module.__dict__.pop(_PATCHED, []):
        module.__dict__.pop(name, None)

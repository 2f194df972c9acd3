"""Method registry: ``@register_method("name")`` on a config class; lookup with did-you-mean errors."""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from .config import MethodConfig

_METHODS: dict[str, type[MethodConfig]] = {}

C = TypeVar("C", bound=type[MethodConfig])


def register_method(name: str) -> Callable[[C], C]:
    """Class decorator: make a :class:`MethodConfig` subclass available as ``compress(method=name)``."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
            raise TypeError(f"@register_method({name!r}) expects a MethodConfig subclass, got {cls!r}")
        if not cls.stage:
            raise TypeError(f"{cls.__name__} must set the class attribute `stage` (e.g. 'encoder')")
        existing = _METHODS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def get_method(name: str) -> type[MethodConfig]:
    """The config class registered under ``name``; a ``ValueError`` with close matches otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str) or a MethodConfig, got {type(name).__name__}")
    try:
        return _METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_METHODS), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(list_methods())}") from None


def list_methods(stage: str | None = None) -> list[str]:
    """Registered method names, sorted; optionally only those of one stage (``"encoder"``, ...)."""
    return sorted(n for n, c in _METHODS.items() if stage is None or c.stage == stage)

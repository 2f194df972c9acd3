"""Method configs: dataclasses that round-trip through JSON (the torchao idea: the config *is* the method)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar


@dataclasses.dataclass
class MethodConfig:
    """Base of every compression method.

    A subclass is a dataclass whose fields are the method's hyper-parameters, each with a ``help`` in its field
    metadata and a default that cites its source. ``name`` and ``stage`` are filled in by ``@register_method``.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""

    budget: float | int | str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Float in (0, 1]: share of visual tokens kept, layer-averaged (docs/architecture.md, "
            "'The budget convention'). "
            "Int >= 1: layer-averaged visual tokens kept per image. 'auto' or 'auto:<mass>' (score-based encoder "
            "methods): per image, the fewest tokens holding that share of the method's score mass (default 0.9). "
            "None: set by `compress(budget=...)`."
        },
    )

    def __post_init__(self) -> None:
        """Check every option against its annotation and its field metadata (``choices``, ``range``, ``above``);
        a subclass with its own ``__post_init__`` calls this first."""
        hints = _type_hints(type(self))
        for field in dataclasses.fields(self):
            if field.name == "budget" or not field.init:
                continue  # the budget has its own rules (budget.validate_budget)
            value = getattr(self, field.name)
            where = f"option {field.name!r} of {self.name or type(self).__name__!r}"
            annotation = hints.get(field.name)
            if annotation is not None and not _matches(value, annotation):
                raise TypeError(f"{where} must be {_describe(annotation)}, got {value!r} ({type(value).__name__})")
            if isinstance(value, list) and _is_tuple(annotation):
                object.__setattr__(self, field.name, tuple(value))  # JSON gives lists back
            meta = field.metadata
            if value is None:
                continue
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{where} must be one of {list(meta['choices'])}, got {value!r}")
            low, high = meta.get("range", (None, None))
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"{where} must be in [{_bound(low, '-inf')}, {_bound(high, 'inf')}], got {value!r}")
            if "above" in meta and not value > meta["above"]:
                raise ValueError(f"{where} must be > {meta['above']}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the method name under ``"method"``; inverse of :meth:`from_dict`."""
        return {"method": self.name, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Build a config from :meth:`to_dict` output. On the base class, ``data["method"]`` picks the subclass."""
        data = dict(data)
        name = data.pop("method", None)
        target = cls
        if cls is MethodConfig or (name is not None and name != cls.name):
            from .registry import get_method

            if name is None:
                raise ValueError("config dict has no 'method' key; expected e.g. {'method': 'cls_attn', ...}")
            target = get_method(name)
        return target.create(**data)

    @classmethod
    def from_json(cls, text: str) -> "MethodConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def create(cls, **kwargs: Any) -> "MethodConfig":
        """Like ``cls(**kwargs)`` but an unknown keyword is a ``TypeError`` that lists the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(
                f"method {cls.name!r} has no option(s) {unknown}; valid options are {sorted(valid)}"
            )
        return cls(**kwargs)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name → help text, for CLIs and docs."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 — an annotation we cannot resolve is simply not checked
        return {}


def _is_tuple(annotation: Any) -> bool:
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return any(typing.get_origin(a) is tuple or a is tuple for a in options)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a simple annotation (int, float, str, bool, tuples, unions, None); others pass."""
    if annotation is Any:
        return True
    if _is_union(annotation):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if typing.get_origin(annotation) is tuple or annotation is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(annotation)
        element = args[0] if args else Any
        return all(_matches(v, element) for v in value)
    return True


def _describe(annotation: Any) -> str:
    if _is_union(annotation):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if typing.get_origin(annotation) is tuple:
        return f"a tuple of {_describe_items(typing.get_args(annotation)[0])}"
    names = {int: "an int", float: "a number", str: "a string", bool: "True or False"}
    return names.get(annotation, f"a {getattr(annotation, '__name__', str(annotation))}")


def _describe_items(annotation: Any) -> str:
    if _is_union(annotation):
        return "/".join(_describe_items(a) for a in typing.get_args(annotation))
    names = {int: "ints", float: "numbers", str: "strings", bool: "booleans", type(None): "None"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bound(value: Any, default: str) -> str:
    return default if value is None else str(value)

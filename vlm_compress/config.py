"""Method configs: dataclasses that round-trip through JSON (the torchao idea: the config *is* the method)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar


@dataclasses.dataclass
class MethodConfig:
    """Base of every compression method.

    A subclass is a dataclass whose fields are the method's hyper-parameters, each with a ``help`` in its field
    metadata and a default that cites its source. ``name`` and ``stage`` are filled in by ``@register_method``.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""

    budget: float | int | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Float in (0, 1]: share of visual tokens kept, layer-averaged (DESIGN.md principle 4). "
            "Int >= 1: layer-averaged visual tokens kept per image. None: set by `compress(budget=...)`."
        },
    )

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

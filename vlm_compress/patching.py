"""Per-instance method patches that ``restore`` undoes exactly (the accelerate ``ModelHook`` idea).

A patch stores a :class:`Patched` callable as an *instance* attribute shadowing the method; the class is never
touched, so other instances are unaffected. Patches chain: when the instance already has its own override (an
accelerate hook from ``device_map`` / ``dispatch_model`` / ``cpu_offload``), the patch calls *that* and
:func:`unpatch_all` puts it back.

A :class:`Patched` holds its module and a picklable implementation instead of a closure, so ``copy.deepcopy`` of a
patched model gives a copy whose patches call the *copy* (with the copy's compression state), and ``pickle`` /
``torch.save`` carry the patches along.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from torch import nn

_PATCHED = "_vlm_compress_patched"  # instance attribute: the names patched on this module, in order


class Patched:
    """``module.<name>`` overridden by ``impl(module, original, *args, **kwargs)``.

    ``original`` is what the patch shadows: the override the instance had before (``previous``), else the class's
    method bound to ``module``. ``impl`` must be picklable (a module-level function, a bound method or a
    ``functools.partial`` of one) for the patched module to pickle. Reports the original's signature, so code that
    inspects ``model.forward`` (``generate`` routing its keyword arguments) sees the stock one.
    """

    def __init__(self, module: nn.Module, name: str, impl: Callable[..., Any], previous: Any = None):
        self.module, self.name, self.impl, self.previous = module, name, impl, previous

    def original(self) -> Callable[..., Any] | None:
        """What the patch shadows; ``None`` for a name the class does not define (a patch that adds a hook)."""
        if self.previous is not None:
            return self.previous
        if not hasattr(type(self.module), self.name):
            return None
        # a partial, not a bound method: torch.compile rebuilds a bound method after a graph break as
        # ``module.<name>``, which is this patch again (endless recursion)
        return functools.partial(getattr(type(self.module), self.name), self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.impl(self.module, self.original(), *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        original = self.original()
        return inspect.signature(original if original is not None else self.impl)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        original = self.original()
        return original if original is not None else self.impl

    @property
    def __name__(self) -> str:  # noqa: A003 — what functools.update_wrapper and reprs read
        return self.name

    def __repr__(self) -> str:
        return f"<vlm-compress patch of {type(self.module).__name__}.{self.name}>"


def is_patched(module: nn.Module, name: str) -> bool:
    return isinstance(module.__dict__.get(name), Patched)


def patch_method(module: nn.Module, name: str, impl: Callable[..., Any]) -> None:
    """Shadow ``module.<name>`` with ``impl(module, original, *args, **kwargs)`` (see :class:`Patched`)."""
    if is_patched(module, name):
        raise RuntimeError(f"{type(module).__name__}.{name} is already patched by vlm-compress on this instance")
    previous = module.__dict__.get(name)
    module.__dict__[name] = Patched(module, name, impl, previous)
    module.__dict__.setdefault(_PATCHED, []).append(name)


def check_unpatchable(module: nn.Module) -> None:
    """Raise a ``RuntimeError`` naming the fix if a patch of ``module`` was itself wrapped later by someone else
    (removing ours would then drop their wrapper too)."""
    for name in module.__dict__.get(_PATCHED, []):
        if not is_patched(module, name):
            raise RuntimeError(
                f"{type(module).__name__}.{name} was wrapped again after vlm-compress patched it (e.g. accelerate's "
                "dispatch_model or cpu_offload after compress); remove that wrapper first "
                "(accelerate.hooks.remove_hook_from_module(model, recurse=True)), or compress after dispatching"
            )


def unpatch_all(module: nn.Module) -> None:
    """Remove every patch made by :func:`patch_method` on ``module``, putting back what each one shadowed."""
    for name in reversed(module.__dict__.pop(_PATCHED, [])):
        patch = module.__dict__.pop(name, None)
        if isinstance(patch, Patched) and patch.previous is not None:
            module.__dict__[name] = patch.previous


def patched_modules(root: nn.Module) -> list[nn.Module]:
    """``root`` and its submodules that carry vlm-compress patches (leftovers included)."""
    return [m for m in root.modules() if m.__dict__.get(_PATCHED)]

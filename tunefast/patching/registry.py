"""Handlers keyed by module type, and the class swap that patches a module reversibly.

A handler decides, for one module, either to patch it (returning the kernel name) or to skip it
(returning a reason). Patching swaps the module's class for a cached subclass whose ``forward`` is the
handler's fast forward, so that ``unpatch`` restores the original class exactly, ``deepcopy`` and
``state_dict`` see the same module, and ``isinstance`` checks (PEFT's own) still hold.
"""

from __future__ import annotations

import base64
import importlib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Patch:
    """``kernel`` runs the module. ``args``: the op's arguments, when a handler's ``plan`` decided for
    one call (see patching/lora.py); None for the patch-time decision."""

    kernel: str
    detail: str = ""
    args: tuple | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Skip:
    """``resumes``: the reason can clear at run time (e.g. unmerge), so the module still gets the
    dispatching forward, which runs the original forward until then."""

    reason: str
    resumes: bool = False


@dataclass(frozen=True)
class Handler:
    """``decide(module, backend) -> Patch | Skip``; ``forward`` replaces the module's forward."""

    decide: Callable
    forward: Callable | None


@dataclass(frozen=True)
class ModelHandler:
    """A change that spans a whole model rather than one module (prompt learning: the PeftModel's forward
    and the model's attention implementation change together).

    ``apply(model, backend) -> list[PatchedEntry | SkippedEntry] | None``: None when ``model`` is not of
    this handler's kind (nothing changed, no entry). ``undo(model)`` restores what apply changed; it is
    a no-op on a model apply did not change. Class swaps done with ``swap_in`` are undone by unpatch.
    """

    model_type: type
    apply: Callable
    undo: Callable


_HANDLERS: dict[type, Handler] = {}
_MODEL_HANDLERS: list[ModelHandler] = []
_FAST_CLASSES: dict[tuple[type, Callable], type] = {}


def register(module_type: type, decide: Callable, forward: Callable | None = None) -> None:
    """Register the handler for ``module_type`` and its subclasses (the most specific type wins)."""
    _HANDLERS[module_type] = Handler(decide, forward)


def register_model(model_type: type, apply: Callable, undo: Callable) -> None:
    """Register a whole-model handler, run by patch() on a root model of ``model_type`` before the walk."""
    _MODEL_HANDLERS.append(ModelHandler(model_type, apply, undo))


def model_handlers(model: nn.Module) -> list[ModelHandler]:
    return [h for h in _MODEL_HANDLERS if isinstance(model, h.model_type)]


def handler_for(module: nn.Module) -> Handler | None:
    for cls in type(module).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    return None


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_tunefast_original_class", type(module))


def is_patched(module: nn.Module) -> bool:
    return "_tunefast_original_class" in type(module).__dict__


def _path(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _resolve_path(path: str):
    module, qualname = path.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _fast_class_name(cls: type, forward: Callable) -> str:
    # The original class and the forward, base32-encoded (no dots: pickle splits qualified names on them),
    # so that a fresh process can rebuild the class from the name alone (module __getattr__ below).
    key = f"{_path(cls)}|{_path(forward)}".encode()
    return "Tunefast_" + base64.b32encode(key).decode().rstrip("=")


def _fast_class(cls: type, forward: Callable) -> type:
    key = (cls, forward)
    if key not in _FAST_CLASSES:
        qualname = _fast_class_name(cls, forward)
        # __name__ stays the original's: reprs read as PEFT's (``lora.Linear(...)``), and so do the error
        # messages that name the class. __qualname__ is the unpicklable-proof lookup name.
        fast = type(cls)(cls.__name__, (cls,), {
            "forward": forward, "_tunefast_original_class": cls, "__module__": __name__, "__qualname__": qualname,
        })
        _FAST_CLASSES[key] = fast
    return _FAST_CLASSES[key]


def __getattr__(name: str):
    """Patched classes by name, created on demand: ``torch.save`` of a patched model pickles its modules'
    classes by qualified name, and ``torch.load`` in a fresh process looks them up here."""
    if not name.startswith("Tunefast_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        encoded = name[len("Tunefast_"):]
        cls_path, forward_path = base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode().split("|")
    except ValueError as e:
        raise AttributeError(f"{name!r} is not a tunefast patched-class name") from e
    from . import _register_all_handlers  # noqa: F401  (importing the package registers every handler)

    return _fast_class(_resolve_path(cls_path), _resolve_path(forward_path))


def swap_in(module: nn.Module, forward: Callable, backend: str) -> None:
    module.__class__ = _fast_class(original_class(module), forward)
    module._tunefast_backend = backend


def swap_out(module: nn.Module) -> None:
    module.__class__ = original_class(module)
    module.__dict__.pop("_tunefast_backend", None)

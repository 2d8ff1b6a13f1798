"""The method protocol: the one shape every tunefast method module has.

A *method* is a module (``tunefast.adapters``, ``tunefast.sparse``, ``tunefast.side``,
``tunefast.methods.prompt``, and ``tunefast.methods.patched``: ``tunefast.patch`` / ``unpatch`` on PEFT's own
LoRA-family and prompt layers, in this shape) exposing::

    Config                                   a dataclass: everything apply() needs, saved by save()
    apply(model, config, *, backend=None)    -> model to use from now on
    remove(model)                            -> the model apply() was given, as it was before apply()
    save(model, path)                        -> Path of the folder written (only the method's own weights)
    load(model, path, *, backend=None)       -> apply(model, saved config) with the saved weights loaded
    trainable_parameters(model)              -> list of the parameters the optimizer should get
    report(model)                            -> PatchReport: every touched module, kernel or skip reason

The in-place rule: **always use the returned model**. Methods that only swap or wrap submodules
(adapters, sparse, prompt, patched) change ``model`` in place and return the same object; a method that
puts a new network around the model (side) returns the wrapper, and ``remove`` on the wrapper returns
the untouched original. Code written as ``model = m.apply(model, cfg)`` ... ``model = m.remove(model)``
works for every method.

``backend`` is one of :data:`tunefast.backend.BACKENDS`, set in one place: the config's ``backend``
field. ``apply(..., backend=None)`` runs the config's; a backend given to ``apply`` takes the place of
a config's "auto" and must otherwise agree with it (:func:`resolve_backend`: a ValueError naming both,
never a silent override). The config is saved as it was given, so ``load`` runs the saved config's
backend unless given another (a backend is no part of the weights: a checkpoint trained with
"triton" on a GPU loads with "reference" on a CPU). ``load`` takes a fresh base model (the one ``apply``
was first given, freshly constructed; for ``patched``, whose apply takes a PeftModel, the plain
transformers base, as ``peft.PeftModel.from_pretrained`` does) and refuses, changing nothing, a
checkpoint that does not fit it.

``check(method)`` verifies a module against this list; tests/test_protocol.py runs every method in
:data:`tunefast.methods.METHODS` through apply -> forward -> save -> load into a fresh model -> remove.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import ModuleType

from .. import backend as _backend

# name -> positional parameters it must accept, in order (keyword-only ``backend`` checked separately)
REQUIRED = {
    "apply": ("model", "config"),
    "remove": ("model",),
    "save": ("model", "path"),
    "load": ("model", "path"),
    "trainable_parameters": ("model",),
    "report": ("model",),
}
TAKES_BACKEND = ("apply", "load")


def check(method: ModuleType) -> None:
    """Raise TypeError naming every way ``method`` departs from the protocol (nothing if it conforms)."""
    problems = []
    config = getattr(method, "Config", None)
    if not isinstance(config, type) or not dataclasses.is_dataclass(config):
        problems.append("no Config dataclass")
    elif "backend" not in {f.name for f in dataclasses.fields(config)}:
        problems.append("Config has no backend field")
    for name, params in REQUIRED.items():
        fn = getattr(method, name, None)
        if not callable(fn):
            problems.append(f"no function {name}()")
            continue
        sig = inspect.signature(fn)
        positional = [p.name for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if tuple(positional[: len(params)]) != params:
            problems.append(f"{name}{sig}: expected its first parameters to be {params}")
        required_extra = [p.name for p in list(sig.parameters.values())[len(params):]
                          if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if required_extra:
            problems.append(f"{name}{sig}: parameters {required_extra} must have defaults")
        if name in TAKES_BACKEND and "backend" not in sig.parameters:
            problems.append(f"{name}{sig}: no backend= parameter")
    if problems:
        raise TypeError(f"{method.__name__} does not follow tunefast's method protocol "
                        f"(tunefast/methods/protocol.py): " + "; ".join(problems))


def resolve_backend(config_backend: str, backend: str | None, *, what: str = "config") -> str:
    """The backend a method runs: ``backend`` (given to apply / load) against the config's.

    None -> the config's; the config's "auto" -> ``backend``; equal -> it; anything else is a
    ValueError naming both (``what`` names the config in the message, e.g. "SparseConfig")."""
    _backend.check_backend_name(config_backend)
    if backend is None:
        return config_backend
    _backend.check_backend_name(backend)
    if config_backend not in ("auto", backend):
        raise ValueError(f"backend={backend!r} contradicts {what}.backend={config_backend!r}: set the backend in one "
                         f"place (the config, or apply's backend= with the config's backend left 'auto')")
    return backend


def check_apply_args(model, config, config_cls: type) -> None:
    """The TypeErrors of an ``apply(model, config)``: ``model`` must be an nn.Module, ``config`` a
    ``config_cls``."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, config_cls):
        article = "an" if config_cls.__name__[:1] in "AEIOU" else "a"
        raise TypeError(f"config must be {article} {config_cls.__name__}, got {type(config).__name__}")


# Field checks of the methods' Config.__post_init__ (one message per kind of mistake across methods).


def check_count(name: str, value) -> None:
    """``value`` must be an int >= 1 (a bool is not): ValueError naming the field ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def as_floats(config, *names: str) -> None:
    """Each field ``names`` of ``config`` must be a number (a bool is not: TypeError); stored as float."""
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        setattr(config, name, float(v))


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``help`` for a method's Config dataclass (what save / load write and
    read). A field holding something JSON cannot (a tuple, a dtype) is converted by the subclass's own
    ``to_dict``."""

    def to_dict(self) -> dict:
        import dataclasses

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict):
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown} (written by a newer tunefast?); fields are "
                             f"{sorted(names)}")
        return cls(**data)

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default, help text."""
        import dataclasses

        return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata['help']}" for f in dataclasses.fields(cls))


def read_checkpoint(path, config_name: str, weights_name: str, fmt: str, version: int, saver: str):
    """(metadata dict, weights file Path) of a folder a method's ``save`` wrote; FileNotFoundError naming
    the missing file and ``saver`` (e.g. "tunefast.prompt.save"), ValueError for another format or a newer
    version. Nothing is loaded into a model here."""
    import json
    from pathlib import Path

    folder = Path(path)
    config_file, weights_file = folder / config_name, folder / weights_name
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: is {folder} a folder written by {saver}()?")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != fmt or meta.get("version", 0) > version:
        raise ValueError(f"{config_file} is not a {fmt} checkpoint this version can read "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    return meta, weights_file

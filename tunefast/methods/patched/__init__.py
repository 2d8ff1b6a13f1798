"""PEFT's own layers, patched by tunefast: ``tunefast.patch`` / ``unpatch`` in the method protocol's shape.

    from tunefast.methods import patched
    model = peft.get_peft_model(base, peft.LoraConfig(...))
    model = patched.apply(model)                     # tunefast.patch(model): same numbers, fused kernels
    opt = torch.optim.AdamW(patched.trainable_parameters(model), lr=1e-4)
    print(patched.report(model))                     # every PEFT layer: its kernel, or why PEFT's forward runs
    patched.save(model, "out/")                      # PEFT's save_pretrained: adapter weights only
    model = patched.load(fresh_base, "out/")         # PeftModel.from_pretrained(..., is_trainable=True), patched
    model = patched.remove(model)                    # tunefast.unpatch: PEFT's modules back, bit for bit

Unlike the tunefast-native methods, the model ``apply`` takes is already a PEFT model (the method's
weights are PEFT's adapters), and ``load`` takes the plain transformers base model, as PEFT's
``from_pretrained`` does. Everything that decides what is patched lives in tunefast/patching.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ...backend import BACKENDS
from ...patching import get_report, patch, unpatch
from ...patching.report import PatchReport
from ..protocol import resolve_backend


@dataclass
class Config:
    backend: str = field(default="auto", metadata={
        "help": "Kernel backend of the patched layers (see tunefast.backend); apply's backend= replaces "
                "'auto' only."})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default, help text."""
        return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata['help']}" for f in dataclasses.fields(cls))


def _peft_model(model, what: str):
    import peft

    if not isinstance(model, peft.PeftModel):
        raise TypeError(f"{what}: model must be a peft.PeftModel (peft.get_peft_model(base, config)), "
                        f"got {type(model).__name__}")
    return model


def apply(model: nn.Module, config: Config | None = None, *, backend: str | None = None) -> nn.Module:
    """``tunefast.patch(model, backend)`` in place; returns ``model``. ``model``: a PeftModel or any
    module holding PEFT tuner layers. ``backend``: None runs ``config.backend`` ("auto" without a config);
    a backend may replace a config's "auto" and must otherwise equal it."""
    config = config if config is not None else Config()
    if not isinstance(config, Config):
        raise TypeError(f"config must be a tunefast.methods.patched.Config, got {type(config).__name__}")
    patch(model, resolve_backend(config.backend, backend, what="patched.Config"))
    return model


def remove(model: nn.Module) -> nn.Module:
    """``tunefast.unpatch(model)``: PEFT's own modules back, bit for bit; returns ``model``."""
    if get_report(model) is None:
        raise ValueError("model is not patched (patched.apply was not called, or remove already was)")
    return unpatch(model)


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """PEFT's ``save_pretrained`` into the folder ``path`` (the adapters' weights and PEFT's config,
    nothing of the base model); returns it. Patched or not, the files are the same."""
    out = Path(path)
    _peft_model(model, "patched.save").save_pretrained(str(out))
    return out


def load(model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """``peft.PeftModel.from_pretrained(model, path, is_trainable=True)``, then patched; returns the
    PeftModel. ``model``: the fresh transformers base model. ``backend``: None is "auto" (PEFT's folder
    holds no tunefast setting)."""
    import peft

    if isinstance(model, peft.PeftModel):
        raise TypeError("patched.load takes the plain base model (as peft.PeftModel.from_pretrained does), "
                        "got a PeftModel")
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder / 'adapter_config.json'} not found: is {folder} a folder written by "
                                "patched.save (PEFT's save_pretrained)?")
    peft_model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    return apply(peft_model, Config(backend="auto" if backend is None else backend))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (PEFT leaves exactly the adapters' trainable)."""
    return [p for p in model.parameters() if p.requires_grad]


def report(model: nn.Module) -> PatchReport:
    """``tunefast.get_report(model)``: every PEFT layer with its kernel, or why PEFT's forward runs."""
    out = get_report(model)
    if out is None:
        raise ValueError("model is not patched (patched.apply was not called, or remove already was)")
    return out

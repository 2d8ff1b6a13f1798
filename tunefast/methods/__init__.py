"""Fine-tuning methods, one folder each, all in one shape (the method protocol, protocol.py):

    adapters/  bottleneck and parallel adapters (Houlsby, Pfeiffer, He et al.) on the fused adapter op
    patched/   PEFT's own LoRA-family and prompt-learning layers, patched by tunefast (tunefast.patch / unpatch)
    prompt/    visual prompt tuning (VPT deep / shallow) on ViT-style models; listed when its folder is present
    side/      memory-saving side tuning: a small ladder side network on the no-grad backbone's hidden states
    sparse/    sparse fine-tuning: trainable sparse weight deltas (SDDMM gradients), merge / unmerge, composition

Each exposes ``Config``, ``apply``, ``remove``, ``save``, ``load``, ``trainable_parameters`` and ``report``;
``protocol.check(module)`` verifies it. ``METHODS`` maps each name to its module. Exported as
``tunefast.adapters``, ``tunefast.side`` and ``tunefast.sparse``; how to add one: docs/adding_a_method.md.

``METHODS`` is built on first use, not when this package is imported: tunefast/patching imports
``methods.sparse.layer`` while it is itself being imported, and ``patched`` imports tunefast/patching,
so importing every method here would run into a half-initialised package.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

_NAMES = ("adapters", "patched", "prompt", "side", "sparse")
_table: dict[str, ModuleType] | None = None


def _methods() -> dict[str, ModuleType]:
    global _table
    if _table is None:
        here = Path(__file__).parent
        _table = {name: importlib.import_module(f"{__name__}.{name}") for name in _NAMES
                  if (here / name / "__init__.py").is_file()}
    return dict(_table)


def __getattr__(name: str):
    if name == "METHODS":
        return _methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

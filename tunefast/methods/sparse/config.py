"""SparseConfig: which weight entries a sparse delta trains and how they are chosen. Validated on
construction; the checks that need the model (targets, index ranges) run in ``apply``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ...backend import BACKENDS
from ..protocol import ConfigMixin, check_choice, check_count

SELECTIONS = ("random", "magnitude", "gradient")
VALUE_DTYPES = ("float32", "bfloat16", "float16", "weight")


@dataclass
class SparseConfig(ConfigMixin):
    density: Optional[float] = field(default=0.01, metadata={
        "help": "Fraction of each targeted weight's entries to train, in (0, 1]: round(density * out * in) "
                "entries per layer, at least 1. Unused (may be None) with explicit indices."})
    target_modules: Optional[Union[str, list[str]]] = field(default="all-linear", metadata={
        "help": "Layers that get a delta: 'all-linear' (every nn.Linear / GPT-2 Conv1D but the output "
                "head), a list of names (a module matches when its qualified name equals one or ends with "
                "'.' + one, as in PEFT), or a regular expression matched in full against qualified names. "
                "None with explicit indices: the mapping's keys."})
    selection: Union[str, Mapping[str, Any]] = field(default="random", metadata={
        "help": "'random' (uniform, from seed), 'magnitude' (largest |W|), 'gradient' (largest |sum of the "
                "loss gradients| over the batches given to apply; computed once, one layer's dense "
                "gradient at a time), or explicit indices: {qualified module name: strictly increasing "
                "flat positions r * in_features + c in the (out_features, in_features) weight}."})
    seed: int = field(default=0, metadata={"help": "Seed of the random selection."})
    train_bias: bool = field(default=False, metadata={
        "help": "Also train a dense delta on the bias of every targeted layer that has one (BitFit on "
                "those layers); merged, saved and removed with the sparse delta."})
    dtype: str = field(default="float32", metadata={
        "help": "dtype of the trainable values: 'float32' (default: PEFT's fp32 adapters on a bf16 base), "
                "'bfloat16', 'float16' or 'weight' (each layer's weight dtype)."})
    gradient_chunk_layers: int = field(default=1, metadata={
        "help": "Gradient selection: layers whose dense gradient scores are accumulated in one pass over "
                "the batches. 1 holds one (out, in) fp32 score at a time at the cost of one pass per layer; "
                "larger values trade memory for fewer passes."})
    backend: str = field(default="auto", metadata={
        "help": "Kernel backend of the sparse op: 'auto', 'triton', 'native' or 'reference' (see tunefast.backend). "
                "apply's backend= and tunefast.patch(backend=...) replace 'auto' only."})

    def __post_init__(self):
        explicit = isinstance(self.selection, Mapping)
        if explicit:
            self.selection = {str(k): _explicit_indices(k, v) for k, v in self.selection.items()}
            if not self.selection:
                raise ValueError("selection is an empty mapping: give at least one module's indices")
            if self.target_modules not in (None, "all-linear") and self.target_modules != sorted(self.selection):
                raise ValueError("with explicit indices the targeted modules are the mapping's keys: leave "
                                 "target_modules unset (None)")
            self.target_modules = None
        elif self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS} or a mapping {{module name: indices}}, "
                             f"got {self.selection!r}")
        if self.density is not None or not explicit:
            if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
                raise TypeError(f"density must be a number in (0, 1], got {self.density!r}")
            if not (math.isfinite(self.density) and 0.0 < self.density <= 1.0):
                raise ValueError(f"density must be in (0, 1] (a fraction of each weight's entries), got {self.density}")
            self.density = float(self.density)
        if not explicit:
            tm = self.target_modules
            if isinstance(tm, str):
                if not tm:
                    raise ValueError("target_modules is an empty string")
            elif isinstance(tm, Sequence) and not isinstance(tm, (bytes, bytearray)):
                self.target_modules = list(tm)
                if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                    raise ValueError(f"target_modules must be non-empty names, got {tm!r}")
            else:
                raise TypeError(f"target_modules must be 'all-linear', a list of names or a regex, got {tm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.train_bias, bool):
            raise TypeError(f"train_bias must be a bool, got {self.train_bias!r}")
        check_choice("dtype", self.dtype, VALUE_DTYPES)
        check_count("gradient_chunk_layers", self.gradient_chunk_layers)
        check_choice("backend", self.backend, BACKENDS)

    @property
    def explicit(self) -> bool:
        return isinstance(self.selection, Mapping)

    def values_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype if self.dtype == "weight" else getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; explicit indices are recorded as "explicit" (they are saved with the values)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.explicit:
            out["selection"] = "explicit"
        return out


def _explicit_indices(name, value) -> torch.Tensor:
    """1-D int64, unique and sorted (the range needs the layer's shape: checked in apply)."""
    from ...ops.sparse import check_indices

    if not isinstance(name, str) or not name:
        raise TypeError(f"explicit indices are keyed by qualified module names, got key {name!r}")
    return check_indices(value, None, name=f"explicit indices of {name!r}")  # the bound: at apply, per layer

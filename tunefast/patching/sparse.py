"""Sparse-delta layers (tunefast.methods.sparse.SparseLinear) -> reported by ``tunefast.patch``.

A SparseLinear already runs the sparse op. Its one eligibility decision is ``SparseLinear.plan``
(also what ``tunefast.sparse.report`` shows); the backend is the layer's own (its SparseConfig's)
unless that is "auto", in which case the one given to ``patch`` runs: a config's backend is never
silently overridden. The report names the implementation: sparse_linear[triton | native | torch]
(see tunefast.ops.sparse.implementation).
"""

from __future__ import annotations

from ..methods.sparse.layer import SparseLinear
from .registry import register


def decide(module: SparseLinear, backend: str):
    return module.plan(backend)


def forward(self, x):
    """Forward of a patched SparseLinear: the sparse op with the layer's backend (see the module docstring)."""
    return self.sparse_forward(x, self.backend_for(self._tunefast_backend))


def register_handlers() -> None:
    register(SparseLinear, decide, forward)

"""Sparse-delta layers (tunefast.methods.sparse.SparseLinear) -> reported by ``tunefast.patch``.

A SparseLinear already runs the sparse op; patching routes it through the backend given to ``patch``
(its own ``backend`` otherwise) and puts it in the report with the implementation that runs it:
sparse_linear[triton | native | torch] (see tunefast.ops.sparse.implementation).
"""

from __future__ import annotations

from ..methods.sparse.layer import SparseLinear
from ..ops._checks import SUPPORTED_DTYPES
from ..ops.sparse import implementation
from .registry import Patch, Skip, register


def decide(module: SparseLinear, backend: str):
    weight = module.weight_nk()
    if weight.is_meta:
        raise ValueError("the model has meta-device weights (shape only, no data): load or materialise them before "
                         "tunefast.patch")
    if weight.dtype not in SUPPORTED_DTYPES:
        return Skip(f"base weight dtype {weight.dtype} (the sparse op takes float32, float16, bfloat16)")
    kernel = f"sparse_linear[{implementation(backend, weight.device)}]"
    numel = module.out_features * module.in_features
    detail = ", ".join(f"{n}: nnz={d.nnz} ({100 * d.nnz / numel:.3g} %)" + (", merged" if d.merged else "")
                       for n, d in module.deltas.items())
    if not module.active_deltas():
        return Skip(f"every delta is merged into the base weight ({detail}); {kernel} resumes after unmerge",
                    resumes=True)
    return Patch(kernel, detail)


def forward(self, x):
    """Forward of a patched SparseLinear: the sparse op with the backend ``tunefast.patch`` was given."""
    return self.sparse_forward(x, self._tunefast_backend)


def register_handlers() -> None:
    register(SparseLinear, decide, forward)

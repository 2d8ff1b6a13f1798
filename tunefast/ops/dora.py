"""``tunefast::lowrank_row_norm``: DoRA's weight norm ||W + s B A||_row without forming B A.

Triton: kernels/dora.py (one pass over W, the B A tile formed in registers). Reference:
tunefast/reference/dora.py (an expansion using only (N, r) and (r, r) products). No autograd: DoRA
detaches the norm (PEFT, and section 4.3 of the DoRA paper).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import dora as ref


@torch.library.custom_op("tunefast::lowrank_row_norm", mutates_args=())
def _lowrank_row_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, backend: str) -> Tensor:
    if _backend.resolve(backend, weight.device) == "triton":
        from ..kernels import dora as kd

        return kd.lowrank_row_norm(weight, lora_a, lora_b, scale)
    return ref.lowrank_row_norm(weight, lora_a, lora_b, scale)


@_lowrank_row_norm.register_fake
def _(weight, lora_a, lora_b, scale, backend):
    return weight.new_empty((weight.shape[0],), dtype=torch.float32)


def lowrank_row_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, backend: str = "auto") -> Tensor:
    """Row norms (N,) fp32 of ``weight`` (N, K) + ``scale`` * ``lora_b`` (N, r) @ ``lora_a`` (r, K)."""
    return _lowrank_row_norm(weight, lora_a, lora_b, float(scale), backend)

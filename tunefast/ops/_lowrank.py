"""The low-rank core shared by the LoRA-family ops (lora, qlora; DoRA and (IA)3 through lora's column
scale): the Triton composition of ``y = x W^T (+ b) + sum_i s_i (drop_i(x) A_i^T) B_i^T`` and its
backward on a dense (possibly just dequantised) weight, with the two GPU paths of the dense product
(the fused Triton GEMM, or cuBLAS plus the low-rank term in place; tunefast/ops/lora_path.py picks).

Shapes: x2d (M, K), weight (N, K) (any strides), A_i (r_i, K), B_i (N, r_i), xa_i (M, r_i), seeds
(n_adapters,) int64 or None, col_scale (N,) or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as _backend
from ..reference import dropout as rd
from ..reference import lora as ref
from . import lora_path
from ._common import rows_to_shape

SEED_HIGH = 2**62  # seeds are non-negative int64 (see reference/dropout.py)


def flat_rows(x: Tensor) -> Tensor:
    """(*, K) -> (M, K) (a view when x's layout allows)."""
    return x.reshape(-1, x.shape[-1])


def run_forward(impl, x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale=None):
    """(y (*, N), [xa_i (M, r_i)]) for x (*, K) on ``impl``, a resolved backend ("triton", "native" or
    "reference"): the body of the LoRA and QLoRA forward ops (QLoRA's weight freshly dequantised)."""
    args = (flat_rows(x), weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale)
    if impl == "triton":
        y2d, xas = triton_forward(*args)
    else:
        with _backend.native_kernels(impl == "native"):
            y2d, xas = ref.forward(*args)
    return rows_to_shape(y2d, x.shape[:-1]), xas


def adapter_grads(das, dbs, lora_a, lora_b, need_da, need_db):
    """Autograd's gradients of the list inputs lora_a / lora_b: lists of their length, None for an
    adapter whose tensor does not require grad (or for all when that gradient was not formed)."""
    n = len(lora_a)
    das = [g if a.requires_grad else None for g, a in zip(das, lora_a)] if need_da else [None] * n
    dbs = [g if b.requires_grad else None for g, b in zip(dbs, lora_b)] if need_db else [None] * n
    return das, dbs


def _seed_slot(seeds, i):
    return None if seeds is None else seeds[i : i + 1]


def triton_forward(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale=None):
    from ..kernels import lora as kl

    xas = [
        kl.dropout_matmul(
            x2d, a.t(), a.dtype, rd.keep_scale(p), _seed_slot(seeds, i), rd.keep_threshold(p), drop="a"
        )
        for i, (a, p) in enumerate(zip(lora_a, dropout_p))
    ]
    m, n, k = x2d.shape[0], weight.shape[0], weight.shape[1]
    runners = {
        "triton": lambda: _fused_forward(x2d, weight, bias, xas, lora_b, scalings, col_scale),
        "cublas": lambda: _cublas_forward(x2d, weight, bias, xas, lora_b, scalings, col_scale),
    }
    path = lora_path.pick("fwd", m, n, k, tuple(a.shape[0] for a in lora_a), x2d.dtype, lora_a[0].dtype,
                          any(p > 0 for p in dropout_p), col_scale is not None, x2d.device, runners)
    return runners[path](), xas


def _fused_forward(x2d, weight, bias, xas, lora_b, scalings, col_scale):
    """The "triton" path: y (M, N) = g * (x W^T + sum_i s_i xa_i B_i^T) + b in one launch per adapter."""
    from ..kernels import lora as kl

    y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    for i, (xa, b, s) in enumerate(zip(xas, lora_b, scalings)):
        # Adapter 0 is fused with the base product; further adapters add onto y (rare: multi-adapter).
        first = i == 0
        kl.lora_linear(y, x2d, weight.t(), bias if first else None, xa, b.t(), s, has_main=first, accumulate=not first,
                       col_scale=col_scale)
    return y


def _cublas_forward(x2d, weight, bias, xas, lora_b, scalings, col_scale):
    """The "cublas" path: y (M, N) = F.linear(x, W, b) (PEFT's GEMM), then each s_i xa_i B_i^T added in
    place; with a column scale g, y = g * (x W^T + low-rank) + b by two in-place passes."""
    y = F.linear(x2d, weight, bias if col_scale is None else None)
    for xa, b, s in zip(xas, lora_b, scalings):
        _add_lowrank(y, xa, b.t(), s)
    if col_scale is not None:
        y.mul_(col_scale)
        if bias is not None:
            y.add_(bias)
    return y


def _add_lowrank(out, lo, up, scale, seed=None, threshold=0):
    """out (M, N) += scale * keep * (lo (M, R) @ up (R, N)) in place; keep is the dropout mask of ``seed``
    drawn for an (M, N) x. cuBLAS's addmm_ where nothing needs the mask or a dtype change; else the Triton
    epilogue kernel alone (fp32 accumulation of out + the product, one rounding, as PEFT's promotion)."""
    from ..kernels import lora as kl

    if lo.shape[1] == 0 or out.numel() == 0:
        return out
    masked = seed is not None and threshold > 0
    if not masked and lo.dtype == out.dtype and up.dtype == out.dtype:
        return out.addmm_(lo, up, alpha=scale)
    return kl.lora_linear(out, out, out, None, lo, up, scale, seed, threshold, has_main=False, accumulate=True)


def triton_backward(dy2d, x2d, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs):
    from ..kernels import lora as kl

    need_dx, need_da, need_db = needs
    das, dbs, dxas = [], [], []
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        seed, thr, keep_scale = _seed_slot(seeds, i), rd.keep_threshold(p), rd.keep_scale(p)
        if need_db:
            dbs.append(kl.dropout_matmul(dy2d.t(), xas[i], b.dtype, s))
        dxa = kl.dropout_matmul(dy2d, b, a.dtype, s)
        if need_da:
            das.append(kl.dropout_matmul(dxa.t(), x2d, a.dtype, keep_scale, seed, thr, drop="b"))
        dxas.append(dxa)
    if not need_dx:
        return None, das, dbs
    m, n, k = dy2d.shape[0], weight.shape[1], weight.shape[0]
    runners = {
        "triton": lambda: _fused_dx(dy2d, weight, lora_a, dxas, dropout_p, seeds),
        "cublas": lambda: _cublas_dx(dy2d, weight, lora_a, dxas, dropout_p, seeds),
    }
    path = lora_path.pick("dx", m, n, k, tuple(a.shape[0] for a in lora_a), dy2d.dtype, lora_a[0].dtype,
                          any(p > 0 for p in dropout_p), False, dy2d.device, runners)
    return runners[path](), das, dbs


def _fused_dx(dy2d, weight, lora_a, dxas, dropout_p, seeds):
    """The "triton" path: dx (M, K) = dy W + sum_i keep_i / (1 - p_i) * (dxa_i A_i), one launch per adapter."""
    from ..kernels import lora as kl

    dx = torch.empty((dy2d.shape[0], weight.shape[1]), device=dy2d.device, dtype=dy2d.dtype)
    for i, (a, dxa, p) in enumerate(zip(lora_a, dxas, dropout_p)):
        kl.lora_linear(dx, dy2d, weight, None, dxa, a, rd.keep_scale(p), _seed_slot(seeds, i), rd.keep_threshold(p),
                       has_main=i == 0, accumulate=i > 0)
    return dx


def _cublas_dx(dy2d, weight, lora_a, dxas, dropout_p, seeds):
    """The "cublas" path: dx = dy @ W by torch, then each adapter's masked term added in place."""
    dx = torch.mm(dy2d, weight)
    for i, (a, dxa, p) in enumerate(zip(lora_a, dxas, dropout_p)):
        _add_lowrank(dx, dxa, a, rd.keep_scale(p), _seed_slot(seeds, i), rd.keep_threshold(p))
    return dx

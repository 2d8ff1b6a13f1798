"""Plain-PyTorch math of the fused LoRA linear op: the CPU path and the test oracle.

Shapes (M tokens = product of x's leading dims, K = in_features, N = out_features, r_i = ranks):
  x2d (M, K), weight (N, K) (a transposed view for Conv1D bases), bias (N,) or None,
  lora_a[i] (r_i, K), lora_b[i] (N, r_i), seeds (n_adapters,) int64 or None.

Numerics follow PEFT's ``lora.Linear.forward``: the base product in the base dtype, each adapter in its
own dtype (x is cast to it), the sum cast back to the base dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dropout as rd


def _native_ok(device: torch.device) -> bool:
    """Only inside an op running backend "native" (tunefast.backend.native_kernels): "reference" is plain
    PyTorch, the oracle."""
    from .. import backend

    return backend.native_enabled() and backend.native_usable(device)[0]


def apply_dropout(x2d: torch.Tensor, seed: int, p: float, row_start: int = 0) -> torch.Tensor:
    """x2d with the counter-based mask of ``seed`` applied (kept elements scaled by 1/(1-p)); its
    first row is row ``row_start`` of the matrix the mask is drawn for."""
    if p == 0.0 or x2d.numel() == 0:
        return x2d
    if _native_ok(x2d.device):
        from .. import _native

        return _native.dropout_apply(x2d, seed, p, row_start=row_start)  # one fused pass, OpenMP on CPU
    return rd.dropout(x2d, seed, p, row_start)


def keep_mask(shape, seed: int, p: float, device, row_start: int = 0) -> torch.Tensor:
    """Boolean keep mask (M, K) of ``seed``: the native kernel under backend "native", else plain PyTorch
    (bit for bit the same mask)."""
    if _native_ok(torch.device(device)):
        from .. import _native

        return _native.keep_mask(seed, shape[0], shape[1], p, row_start, device=device)
    return rd.keep_mask(seed, shape[0], shape[1], p, device=device, row_start=row_start)


def forward(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale=None):
    """Return (y2d (M, N), [xa_i (M, r_i)]): y = g * (x W^T + sum_i s_i * (drop_i(x) A_i^T) B_i^T) + b.

    ``col_scale`` g (N,) is DoRA's magnitude / weight norm (None: 1).
    """
    y = F.linear(x2d, weight, bias if col_scale is None else None)
    out_dtype = y.dtype
    xas = []
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        xd = apply_dropout(x2d.to(a.dtype), _seed(seeds, i), p)
        xa = xd @ a.t()
        xas.append(xa)
        if y.dtype == b.dtype:
            y = torch.addmm(y, xa, b.t(), alpha=s)  # one pass over y instead of matmul, scale, add
        else:
            y = y + (xa @ b.t()) * s  # PEFT's promotion: base dtype + adapter dtype
    if col_scale is not None:
        y = y * col_scale
        y = y + bias if bias is not None else y
    return y.to(out_dtype), xas


def backward(dy2d, x2d, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, need_dx, need_da, need_db):
    """Gradients (dx (M, K) or None, [dA_i (r_i, K)] or None, [dB_i (N, r_i)] or None)."""
    dx = dy2d @ weight if need_dx else None
    das, dbs = [], []
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        seed = _seed(seeds, i)
        dyl = dy2d.to(b.dtype)
        if need_db:
            dbs.append((dyl.t() @ xas[i]).mul_(s))
        dxa = (dyl @ b).mul_(s)
        if p > 0.0 and need_da and need_dx:
            # Both gradients need the mask: draw it once (one Philox pass instead of two).
            mask = keep_mask(x2d.shape, seed, p, x2d.device) * torch.tensor(rd.keep_scale(p), dtype=a.dtype)
            das.append(dxa.t() @ (x2d.to(a.dtype) * mask))
            dx.addcmul_(dxa @ a, mask)  # one pass: multiply and accumulate
            continue
        if need_da:
            das.append(dxa.t() @ apply_dropout(x2d.to(a.dtype), seed, p))
        if need_dx:
            dx.add_(apply_dropout(dxa @ a, seed, p))
    return dx, (das if need_da else None), (dbs if need_db else None)


def _seed(seeds, i) -> int:
    return 0 if seeds is None else int(seeds[i])

"""The fused LoRA linear op, registered with torch.library (fake + autograd), dispatching to Triton or
the reference.

    y = x W^T (+ b) + sum_i s_i * (drop_i(x) A_i^T) B_i^T

Kept for backward: x (for dA), the (M, r_i) products xa_i (for dB) and one int64 seed per adapter.
PEFT keeps, per adapter with dropout, a dropped copy of x plus its mask; here the mask is redrawn from
the seed, so with dropout the bytes kept are x once plus M * sum(r_i) values, whatever p is.

With a trained column scale g (DoRA's m / ||W + s B A||, (IA)3's l): g and y as well (g's gradient
is sum_t dy * (y - b) / g); only where some entry of g is exactly 0 are x and the xa kept too, to
recompute z = x W^T + sum_i s_i xa_i B_i^T for those columns (one device sync per call reads g; under
torch.compile, where tracing cannot read g, they are kept whenever g is trained and z is recomputed whole).

On the Triton backend the dense product (forward y, backward dx) runs one of two paths, chosen per
shape class by timing both on first use on a GPU (tunefast/ops/lora_path.py, never run on a GPU yet):
the fused Triton GEMM with the low-rank epilogue, or cuBLAS for the base product with the low-rank
term added in place. Same inputs, same saved tensors; only the rounding order differs.

Two ops, as flash-attention does, so that ``torch.compile`` sees opaque forward and backward kernels:
``tunefast::lora_linear_fwd`` and ``tunefast::lora_linear_bwd``. The public entry is
:func:`lora_linear`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as _backend
from ..reference import lora as ref
from ._checks import check_dora_args, check_lora_args
from ._common import save_named, saved_named
from ._lowrank import SEED_HIGH as _SEED_HIGH
from ._lowrank import adapter_grads, run_forward
from ._lowrank import triton_backward as _triton_backward
from ._lowrank import flat_rows as _x2d


def _fwd_impl(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale, backend):
    impl = _backend.resolve(backend, x.device)
    return run_forward(impl, x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale)


@torch.library.custom_op("tunefast::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: list[float],
    dropout_p: list[float],
    seeds: Optional[Tensor],
    col_scale: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor]]:
    return _fwd_impl(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale, backend)


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale, backend):
    m = x.numel() // x.shape[-1]
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, [x.new_empty((m, a.shape[0]), dtype=a.dtype) for a in lora_a]


def _bwd_impl(grad_y, x, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs, backend):
    need_dx, need_da, need_db = needs
    dy2d = _x2d(grad_y)
    x2d = _x2d(x) if need_da else x  # without dA, x is an empty placeholder (it was not kept)
    impl = _backend.resolve(backend, grad_y.device)
    if impl == "triton":
        dx, das, dbs = _triton_backward(dy2d, x2d, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs)
    else:
        with _backend.native_kernels(impl == "native"):
            dx, das, dbs = ref.backward(dy2d, x2d, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, *needs)
    dx = dx.view(*grad_y.shape[:-1], weight.shape[1]) if need_dx else grad_y.new_empty(0)
    return dx, das or [], dbs or []


@torch.library.custom_op("tunefast::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    xas: list[Tensor],
    scalings: list[float],
    dropout_p: list[float],
    seeds: Optional[Tensor],
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Returns (dx, [dA_i], [dB_i]); a gradient not asked for in ``needs`` = (dx, dA, dB) is empty."""
    return _bwd_impl(grad_y, x, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs, backend)


@_lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs, backend):
    need_dx, need_da, need_db = needs
    dx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if need_dx else grad_y.new_empty(0)
    das = [torch.empty_like(a) for a in lora_a] if need_da else []
    dbs = [torch.empty_like(b) for b in lora_b] if need_db else []
    return dx, das, dbs


def _zero_columns(col_scale: Tensor):
    """Where g == 0, (y - b) / g cannot give z = x W^T: the indices (n0,) of those columns, None when there
    are none (the common case), or "all" while tracing (no values to look at: z is recomputed whole).
    One device sync per call on a GPU (the column scale is read): only when g is trained."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(col_scale):
        return "all"
    zero = torch.nonzero(col_scale.reshape(-1) == 0).reshape(-1)
    return zero if zero.numel() else None


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale, backend = inputs
    y, xas = output
    need_da = any(a.requires_grad for a in lora_a)
    need_db = any(b.requires_grad for b in lora_b)
    need_dg = col_scale is not None and col_scale.requires_grad
    # Keep only what the math needs: x for dA, xa for dB, nothing of drop(x) or its mask. With a
    # column scale g (DoRA, (IA)3): g, and y for g's gradient (y - b = g * z, so z is not kept
    # separately); where some g is exactly 0 that division fails, so x, the xa and the zero columns'
    # indices are kept too, only then, to recompute z for those columns in backward.
    zero_cols = _zero_columns(col_scale) if need_dg else None
    keep_x = need_da or zero_cols is not None
    ctx.keep_xas = need_db or zero_cols is not None
    save_named(
        ctx, x=x if keep_x else None, weight=weight, lora_a=list(lora_a), lora_b=list(lora_b),
        xas=list(xas) if ctx.keep_xas else [], seeds=seeds, col_scale=col_scale, y=y if need_dg else None,
        bias=bias if need_dg else None, zero_cols=zero_cols if isinstance(zero_cols, Tensor) else None,
    )
    ctx.flags = (need_da, need_db, bias is not None and bias.requires_grad, need_dg)
    ctx.recompute_all = isinstance(zero_cols, str)
    ctx.static = (list(scalings), list(dropout_p), backend)


def _col_scale_grad(grad_y, x, weight, y, bias, col_scale, lora_b, xas, scalings, zero_cols, recompute_all):
    """dL/dg (N,) for y = g * z + b, z = x W^T + sum_i s_i xa_i B_i^T: sum_t dy * z, with z = (y - b) / g
    where g != 0, and z recomputed from x and the kept xa_i (M, r_i) for the columns where g == 0
    (``zero_cols``; every column when ``recompute_all``)."""
    dy = grad_y.reshape(-1, grad_y.shape[-1]).float()
    if not recompute_all and zero_cols is None:
        z_times_g = y.reshape(dy.shape).float() - (bias.float() if bias is not None else 0.0)
        return ((dy * z_times_g).sum(0) / col_scale.float()).to(col_scale.dtype)

    def z_of(rows):  # z (M, len(rows)) of the output columns ``rows`` (all when None), fp32
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        z = F.linear(_x2d(x), pick(weight)).float()
        for xa, b, s in zip(xas, lora_b, scalings):
            z += s * (xa.float() @ pick(b).float().t())
        return z

    if recompute_all:
        return (dy * z_of(None)).sum(0).to(col_scale.dtype)
    z_times_g = y.reshape(dy.shape).float() - (bias.float() if bias is not None else 0.0)
    g = col_scale.float()
    dg = (dy * z_times_g).sum(0) / torch.where(g == 0, 1.0, g)
    dg.index_copy_(0, zero_cols, (dy.index_select(1, zero_cols) * z_of(zero_cols)).sum(0))
    return dg.to(col_scale.dtype)


def _backward(ctx, grad_y, _grad_xas):
    saved = saved_named(ctx)
    x, weight, lora_a, lora_b, xas = saved["x"], saved["weight"], saved["lora_a"], saved["lora_b"], saved["xas"]
    need_da, need_db, need_dbias, need_dg = ctx.flags
    seeds, col_scale, y, bias, zero_cols = (saved[k] for k in ("seeds", "col_scale", "y", "bias", "zero_cols"))
    scalings, dropout_p, backend = ctx.static
    eager = getattr(ctx, "eager", False)  # set by _EagerLoraLinear; the registered op traces its bwd op
    need_dx = ctx.needs_input_grad[1 if eager else 0]
    dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_dbias else None
    dg = None
    if need_dg:  # y = g * z + b  =>  dL/dg = sum_t dy * z
        dg = _col_scale_grad(grad_y, x, weight, y, bias, col_scale, lora_b, xas, scalings, zero_cols,
                             ctx.recompute_all)
    if x is None or not need_da:  # dA not needed: x was not kept (or only for dg), pass a placeholder
        x = grad_y.new_empty(0)
    if col_scale is not None:  # the rest is LoRA's backward for dz = dy * g
        grad_y = (grad_y * col_scale).to(grad_y.dtype)
    bwd = _bwd_impl if eager else _lora_linear_bwd
    dx, das, dbs = bwd(grad_y, x, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, [need_dx, need_da, need_db], backend)
    das, dbs = adapter_grads(das, dbs, lora_a, lora_b, need_da, need_db)
    return (dx if need_dx else None), None, dbias, das, dbs, None, None, None, dg, None


torch.library.register_autograd("tunefast::lora_linear_fwd", _backward, setup_context=_setup_context)


class _EagerLoraLinear(torch.autograd.Function):
    """The same forward, backward and saved tensors as the registered ops, without the custom-op
    dispatch: in eager mode that machinery costs ~170 us per layer per step (measured on a 64x64
    layer: 214 us vs 80 us for PEFT's forward+backward), which a 28-layer model's step feels. Under
    torch.compile the registered ops run instead, so graphs stay whole."""

    @staticmethod
    def forward(ctx, static, x, weight, bias, seeds, col_scale, *ab):
        n = len(ab) // 2
        lora_a, lora_b = list(ab[:n]), list(ab[n:])
        scalings, dropout_p, backend = static
        y, xas = _fwd_impl(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale, backend)
        _setup_context(ctx, (x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, col_scale, backend), (y, xas))
        ctx.eager = True
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, _, dbias, das, dbs, _, _, _, dg, _ = _backward(ctx, grad_y, None)
        return None, dx, None, dbias, None, dg, *das, *dbs


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_p: Sequence[float] = (),
    *,
    magnitude: Optional[Tensor] = None,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Fused LoRA linear layer: ``x W^T + b + sum_i s_i * (drop_i(x) A_i^T) B_i^T``.

    Args:
        x: (*, K) input, float32 / float16 / bfloat16.
        weight: (N, K) frozen base weight, same dtype and device as ``x``. For a GPT-2 ``Conv1D``
            base (weight stored (K, N)) pass ``weight.t()``: any strides work, nothing is copied.
        bias: (N,) base bias or None. It may require grad (PEFT ``lora_bias`` folds s * b_B into it).
        lora_a: adapters' down-projections, each (r_i, K); ranks may differ.
        lora_b: adapters' up-projections, each (N, r_i); same dtype as the matching A (may differ
            from x's dtype: PEFT keeps fp32 adapters on bf16 bases, and so is the math here).
        scalings: s_i per adapter (alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout_p: dropout probability per adapter on the adapter's input (default 0 for all).
        magnitude: (N,) DoRA magnitude vector (one adapter only). The output becomes
            ``m / ||W + s B A||_row * (x W^T + s (x A^T) B^T) + b`` with the norm detached (PEFT's DoRA),
            computed by a fused low-rank row norm that never forms B A.
        training: when False dropout is off, as for ``nn.Dropout`` in eval mode.
        backend: "auto", "triton", "native" or "reference" (see tunefast.backend).

    Returns:
        (*, N) tensor of x's dtype. The base weight never receives a gradient.
    """
    n = len(lora_a)
    dropout_p = list(dropout_p) if len(dropout_p) else [0.0] * n
    check_lora_args(x, weight, bias, lora_a, lora_b, scalings, dropout_p, backend)
    col_scale = None
    if magnitude is not None:
        col_scale = magnitude / dora_weight_norm(weight, lora_a, lora_b, scalings, magnitude, dropout_p, training, backend)
    ps = [float(p) if training else 0.0 for p in dropout_p]
    seeds = None
    if any(p > 0.0 for p in ps):
        # Drawn from torch's generator for x's device: torch.manual_seed reproduces the masks, and
        # torch.utils.checkpoint's RNG-state replay redraws the same seeds on recompute.
        seeds = torch.randint(0, _SEED_HIGH, (n,), device=x.device, dtype=torch.int64)
    scalings = [float(s) for s in scalings]
    if torch.compiler.is_compiling():
        y, _ = _lora_linear_fwd(x, weight, bias, list(lora_a), list(lora_b), scalings, ps, seeds, col_scale, backend)
        return y
    return _EagerLoraLinear.apply((scalings, ps, backend), x, weight, bias, seeds, col_scale, *lora_a, *lora_b)


def dora_weight_norm(weight, lora_a, lora_b, scalings, magnitude, dropout_p, training, backend) -> Tensor:
    """DoRA's detached ||W + s B A||_row (N,) in the magnitude's dtype, via the fused low-rank row norm."""
    from .dora import lowrank_row_norm

    check_dora_args(weight, lora_a, magnitude, dropout_p, training)
    with torch.no_grad():
        norm = lowrank_row_norm(weight, lora_a[0].detach(), lora_b[0].detach(), float(scalings[0]), backend)
    return norm.to(magnitude.dtype)

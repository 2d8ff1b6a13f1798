"""The input-scaled linear op ((IA)3 on feed-forward layers), registered with torch.library (fake +
autograd), dispatching to Triton (kernels/scaled_linear.py) or the reference
(tunefast/reference/scaled_linear.py).

    y = ((x * l) W^T + b),  W frozen, l (K,) trainable

Kept for backward: x (only when l needs a gradient), W and l: never x * l, and no second copy of x in
l's dtype. PEFT's ``ia3.Linear`` keeps the input of its ``x * l`` product: x itself when l has x's
dtype (the same bytes as here), but x cast to l's dtype when they differ, e.g. a bf16 base with PEFT's
default fp32 (IA)3 vectors keeps an fp32 copy of x, twice x's bytes; here x is kept as it came.

l's gradient is sum_t x * (dy W), with no division by l (the column-scale rule of ops/lora.py divides by
the scale, which is NaN at an entry of l equal to 0; this op is finite there, as PEFT).

The Triton kernels fold the scale into the GEMMs: x * l is applied to each x tile as it is loaded
(never written), and dx = (dy W) * l and l's partial gradients come out of the backward GEMM's epilogue.
Caution: they have never run on a GPU (interpreter only); their gain over PEFT's separate passes is an
estimate in kernels/scaled_linear.py's docstring, not a measurement.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import scaled_linear as ref
from ._checks import check_linear_args, check_same_device, check_tensor
from ._common import rows_to_shape


def _x2d(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _fwd_impl(x, weight, bias, scale, backend):
    x2d = _x2d(x)
    if _backend.resolve(backend, x.device) == "triton":
        from ..kernels import scaled_linear as ks

        y2d = ks.scaled_linear_fwd(x2d, weight, bias, scale)
    else:
        y2d = ref.forward(x2d, weight, bias, scale)
    return rows_to_shape(y2d, x.shape[:-1])


@torch.library.custom_op("tunefast::scaled_linear_fwd", mutates_args=())
def _scaled_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, backend: str) -> Tensor:
    return _fwd_impl(x, weight, bias, scale, backend)


@_scaled_linear_fwd.register_fake
def _(x, weight, bias, scale, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _bwd_impl(grad_y, x, weight, scale, needs, backend):
    need_dx, need_dscale, need_dbias = needs
    dy2d = _x2d(grad_y)
    x2d = _x2d(x) if need_dscale else x  # without dl, x is an empty placeholder (it was not kept)
    if _backend.resolve(backend, grad_y.device) == "triton" and (need_dx or need_dscale):
        from ..kernels import scaled_linear as ks

        dx, dscale = ks.scaled_linear_bwd(dy2d, weight, x2d, scale, need_dx, need_dscale)
        dbias = dy2d.sum(0) if need_dbias else None
    else:
        dx, dscale, dbias = ref.backward(dy2d, x2d, weight, scale, *needs)
    empty = lambda: grad_y.new_empty(0)  # noqa: E731  (one each: custom-op returns may not alias)
    dx = dx.view(*grad_y.shape[:-1], weight.shape[1]) if need_dx else empty()
    return dx, dscale if need_dscale else empty(), dbias if need_dbias else empty()


@torch.library.custom_op("tunefast::scaled_linear_bwd", mutates_args=())
def _scaled_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, scale: Tensor, needs: list[bool],
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dl, db); those not asked for in ``needs`` = (dx, dl, db) are empty."""
    return _bwd_impl(grad_y, x, weight, scale, needs, backend)


@_scaled_linear_bwd.register_fake
def _(grad_y, x, weight, scale, needs, backend):
    need_dx, need_dscale, need_dbias = needs
    e = grad_y.new_empty(0)
    dx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if need_dx else e
    return dx, torch.empty_like(scale) if need_dscale else e, grad_y.new_empty(weight.shape[0]) if need_dbias else e


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, backend = inputs
    need_dscale = scale.requires_grad
    ctx.save_for_backward(x if need_dscale else None, weight, scale)
    ctx.flags = (need_dscale, bias is not None and bias.requires_grad)
    ctx.backend = backend


def _backward(ctx, grad_y):
    x, weight, scale = ctx.saved_tensors
    need_dscale, need_dbias = ctx.flags
    eager = getattr(ctx, "eager", False)
    need_dx = ctx.needs_input_grad[1 if eager else 0]
    if x is None:
        x = grad_y.new_empty(0)
    bwd = _bwd_impl if eager else _scaled_linear_bwd
    dx, dscale, dbias = bwd(grad_y, x, weight, scale, [need_dx, need_dscale, need_dbias], ctx.backend)
    return (dx if need_dx else None, None, dbias if need_dbias else None, dscale if need_dscale else None, None)


torch.library.register_autograd("tunefast::scaled_linear_fwd", _backward, setup_context=_setup_context)


class _EagerScaledLinear(torch.autograd.Function):
    """The registered op's forward, backward and saved tensors without the custom-op dispatch (which
    costs ~170 us per call in eager mode, see ops/lora.py); under torch.compile the ops run instead."""

    @staticmethod
    def forward(ctx, backend, x, weight, bias, scale):
        inputs = (x, weight, bias, scale, backend)
        y = _fwd_impl(x, weight, bias, scale, backend)
        _setup_context(ctx, inputs, y)
        ctx.eager = True
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, _, dbias, dscale, _ = _backward(ctx, grad_y)
        return None, dx, None, dbias, dscale


def scaled_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, *,
                  backend: str = "auto") -> Tensor:
    """Linear layer on an input scaled per feature: ``((x * l) W^T + b)`` ((IA)3 on a feed-forward layer).

    Args:
        x: (*, K) input, float32 / float16 / bfloat16.
        weight: (N, K) frozen base weight, x's dtype and device. For a GPT-2 ``Conv1D`` base (weight
            stored (K, N)) pass ``weight.t()``: nothing is copied.
        bias: (N,) base bias or None (it may require grad).
        scale: (K,) per-input-feature scale l, any supported float dtype: x * l is computed in l's dtype
            and rounded to x's dtype before the product, as PEFT's (IA)3 does.
        backend: "auto", "triton" or "reference" (see tunefast.backend).

    Returns:
        (*, N) tensor of x's dtype. The base weight never receives a gradient.
    """
    _check(x, weight, bias, scale, backend)
    if torch.compiler.is_compiling():
        return _scaled_linear_fwd(x, weight, bias, scale, backend)
    return _EagerScaledLinear.apply(backend, x, weight, bias, scale)


def _check(x, weight, bias, scale, backend) -> None:
    check_linear_args(x, weight, bias, backend, "the scale l")
    check_tensor(scale, "scale", ndim=1)
    if scale.shape[0] != weight.shape[1]:
        raise ValueError(f"scale has {scale.shape[0]} entries, expected in_features={weight.shape[1]} (one per "
                         "input feature)")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    check_same_device([("x", x), ("weight", weight), ("bias", bias), ("scale", scale)])

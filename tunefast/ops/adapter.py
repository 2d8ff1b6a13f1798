"""The fused adapter op (bottleneck / parallel adapters), registered with torch.library (fake +
autograd), dispatching to the LoRA op's Triton kernels or the reference.

    y = base + s * (act(drop(x) A^T + a) B^T + b)

A sibling of tunefast/ops/lora.py: the same two Triton launchers (kernels/lora.py) do every product;
what differs is the (M, r) middle: a bias and an activation between the projections.

Kept for backward: x (for dA and the dropout mask's seed), pre = drop(x) A^T + a (M, r) and one int64
seed. act(pre) and act'(pre) are recomputed from pre in backward, so the bytes kept are x once plus
M * r values whatever the activation and dropout p (a straightforward nn.Module adapter keeps x, the
dropped x and its mask, pre, act(pre): about 2-3 x + 2 M r). A Houlsby adapter passes its sublayer
output h as both ``x`` and ``base``: h is kept once.

Caution: in the Triton path the (M, r) bias + activation (forward) and its derivative (backward) run as
torch ops between the kernels (O(M r) work, r << K); the GEMMs are the LoRA kernels'.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import adapter as ref
from ..reference import dropout as rd
from ._checks import check_same_device, check_tensor

_SEED_HIGH = 2**62  # seeds are non-negative int64 (see reference/dropout.py)


def _x2d(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _fwd_impl(x, base, down_w, down_b, up_w, up_b, scale, act, p, seed, backend):
    x2d = _x2d(x)
    base2d = _x2d(base) if base is not None else None
    if _backend.resolve(backend, x.device) == "triton":
        y2d, pre = _triton_forward(x2d, base2d, down_w, down_b, up_w, up_b, scale, act, p, seed)
    else:
        y2d, pre = ref.forward(x2d, base2d, down_w, down_b, up_w, up_b, scale, act, p, _seed(seed))
    return y2d.view(*x.shape[:-1], up_w.shape[0]), pre


@torch.library.custom_op("tunefast::adapter_fwd", mutates_args=())
def _adapter_fwd(x: Tensor, base: Optional[Tensor], down_w: Tensor, down_b: Optional[Tensor], up_w: Tensor,
                 up_b: Optional[Tensor], scale: float, act: str, p: float, seed: Optional[Tensor],
                 backend: str) -> tuple[Tensor, Tensor]:
    return _fwd_impl(x, base, down_w, down_b, up_w, up_b, scale, act, p, seed, backend)


@_adapter_fwd.register_fake
def _(x, base, down_w, down_b, up_w, up_b, scale, act, p, seed, backend):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], up_w.shape[0])), x.new_empty((m, down_w.shape[0]))


def _bwd_impl(grad_y, x, down_w, up_w, pre, scale, act, p, seed, needs, backend):
    need_dx, need_down, need_up = needs
    dy2d = _x2d(grad_y)
    x2d = _x2d(x) if need_down else x  # without dA, x is an empty placeholder (it was not kept)
    if _backend.resolve(backend, grad_y.device) == "triton":
        grads = _triton_backward(dy2d, x2d, down_w, up_w, pre, scale, act, p, seed, needs)
    else:
        grads = ref.backward(dy2d, x2d, down_w, up_w, pre, scale, act, p, _seed(seed), *needs)
    empty = grad_y.new_empty(0)
    dx, da_w, da_b, db_w, db_b = (g if g is not None else empty for g in grads)
    if need_dx:
        dx = dx.view(*grad_y.shape[:-1], down_w.shape[1])
    return dx, da_w, da_b, db_w, db_b


@torch.library.custom_op("tunefast::adapter_bwd", mutates_args=())
def _adapter_bwd(grad_y: Tensor, x: Tensor, down_w: Tensor, up_w: Tensor, pre: Tensor, scale: float, act: str,
                 p: float, seed: Optional[Tensor], needs: list[bool],
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, da, dB, db); those not asked for in ``needs`` = (dx, down, up) are empty."""
    return _bwd_impl(grad_y, x, down_w, up_w, pre, scale, act, p, seed, needs, backend)


@_adapter_bwd.register_fake
def _(grad_y, x, down_w, up_w, pre, scale, act, p, seed, needs, backend):
    need_dx, need_down, need_up = needs
    e = grad_y.new_empty(0)
    dx = grad_y.new_empty((*grad_y.shape[:-1], down_w.shape[1])) if need_dx else e
    down = (torch.empty_like(down_w), down_w.new_empty(down_w.shape[0])) if need_down else (e, e)
    up = (torch.empty_like(up_w), up_w.new_empty(up_w.shape[0])) if need_up else (e, e)
    return dx, *down, *up


def _setup_context(ctx, inputs, output):
    x, base, down_w, down_b, up_w, up_b, scale, act, p, seed, backend = inputs
    need_down = down_w.requires_grad or (down_b is not None and down_b.requires_grad)
    need_up = up_w.requires_grad or (up_b is not None and up_b.requires_grad)
    # x only for dA (dx needs pre and A alone); pre for everything else; never act(pre) or a mask.
    ctx.save_for_backward(x if need_down else None, down_w, up_w, output[1], seed)
    ctx.flags = (need_down, need_up, base is not None, down_b is not None, up_b is not None)
    ctx.static = (scale, act, p, backend)


def _backward(ctx, grad_y, _grad_pre):
    x, down_w, up_w, pre, seed = ctx.saved_tensors
    need_down, need_up, has_base, has_down_b, has_up_b = ctx.flags
    scale, act, p, backend = ctx.static
    eager = getattr(ctx, "eager", False)
    need_dx = ctx.needs_input_grad[1 if eager else 0]
    if x is None:
        x = grad_y.new_empty(0)
    bwd = _bwd_impl if eager else _adapter_bwd
    dx, da_w, da_b, db_w, db_b = bwd(grad_y, x, down_w, up_w, pre, scale, act, p, seed,
                                     [need_dx, need_down, need_up], backend)
    return (dx if need_dx else None, grad_y if has_base else None,
            da_w if need_down else None, da_b if need_down and has_down_b else None,
            db_w if need_up else None, db_b if need_up and has_up_b else None,
            None, None, None, None, None)


torch.library.register_autograd("tunefast::adapter_fwd", _backward, setup_context=_setup_context)


class _EagerAdapter(torch.autograd.Function):
    """The registered op's forward, backward and saved tensors without the custom-op dispatch (which
    costs ~170 us per call in eager mode, see ops/lora.py); under torch.compile the ops run instead."""

    @staticmethod
    def forward(ctx, static, x, base, down_w, down_b, up_w, up_b, seed):
        scale, act, p, backend = static
        inputs = (x, base, down_w, down_b, up_w, up_b, scale, act, p, seed, backend)
        y, pre = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, (y, pre))
        ctx.eager = True
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, dbase, da_w, da_b, db_w, db_b, *_ = _backward(ctx, grad_y, None)
        return None, dx, dbase, da_w, da_b, db_w, db_b, None


def adapter(x: Tensor, base: Optional[Tensor], down_w: Tensor, down_b: Optional[Tensor], up_w: Tensor,
            up_b: Optional[Tensor], *, scale: float = 1.0, activation: str = "relu", dropout_p: float = 0.0,
            training: bool = True, backend: str = "auto") -> Tensor:
    """Fused bottleneck / parallel adapter: ``base + s * (act(drop(x) A^T + a) B^T + b)``.

    Args:
        x: (*, K) adapter input, float32 / float16 / bfloat16.
        base: (*, N) what the adapter's output is added to (a Houlsby adapter's sublayer output, which is
            also its ``x``; a parallel adapter's sublayer output), or None for the branch alone.
        down_w: (r, K) down-projection A.   down_b: (r,) or None.
        up_w: (N, r) up-projection B.       up_b: (N,) or None (scaled by s with the branch).
        scale: s.   activation: "relu", "gelu" (exact erf), "silu" or "identity".
        dropout_p: counter-based dropout on x (off when ``training`` is False).
        backend: "auto", "triton" or "reference" (see tunefast.backend).

    Returns:
        (*, N) tensor of x's dtype. All tensors must share x's dtype and device.
    """
    _check(x, base, down_w, down_b, up_w, up_b, activation, dropout_p, backend)
    p = float(dropout_p) if training else 0.0
    seed = torch.randint(0, _SEED_HIGH, (1,), device=x.device, dtype=torch.int64) if p > 0.0 else None
    if torch.compiler.is_compiling():
        return _adapter_fwd(x, base, down_w, down_b, up_w, up_b, float(scale), activation, p, seed, backend)[0]
    return _EagerAdapter.apply((float(scale), activation, p, backend), x, base, down_w, down_b, up_w, up_b, seed)


def _check(x, base, down_w, down_b, up_w, up_b, act, p, backend) -> None:
    _backend.check_backend_name(backend)
    check_tensor(x, "x", min_ndim=1)
    check_tensor(down_w, "down_w", ndim=2)
    check_tensor(up_w, "up_w", ndim=2)
    r, k = down_w.shape
    n = up_w.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but down_w is {tuple(down_w.shape)}: expected (r, {x.shape[-1]})")
    if up_w.shape[1] != r:
        raise ValueError(f"up_w is {tuple(up_w.shape)} but down_w has r={r} rows: expected ({n}, {r})")
    for name, t, shape in (("base", base, (*x.shape[:-1], n)), ("down_b", down_b, (r,)), ("up_b", up_b, (n,))):
        if t is None:
            continue
        check_tensor(t, name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    for name, t in (("base", base), ("down_w", down_w), ("down_b", down_b), ("up_w", up_w), ("up_b", up_b)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}: use one dtype for the adapter")
    check_same_device([("x", x), ("base", base), ("down_w", down_w), ("down_b", down_b), ("up_w", up_w),
                       ("up_b", up_b)])
    if act not in ref.ACTIVATIONS:
        raise ValueError(f"activation must be one of {ref.ACTIVATIONS}, got {act!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {p}")


def _seed(seed) -> int:
    return 0 if seed is None else int(seed[0])


# ----------------------------------------------------------------------------------------------------
# Triton composition: the LoRA op's launchers (kernels/lora.py), read-only.
# ----------------------------------------------------------------------------------------------------


def _triton_forward(x2d, base2d, down_w, down_b, up_w, up_b, scale, act, p, seed):
    from ..kernels import lora as kl

    pre = kl.dropout_matmul(x2d, down_w.t(), x2d.dtype, rd.keep_scale(p), seed, rd.keep_threshold(p), drop="a")
    if down_b is not None:
        pre = pre + down_b
    h = ref.activation(pre, act)
    n = up_w.shape[0]
    y = base2d.clone() if base2d is not None else torch.empty((x2d.shape[0], n), device=x2d.device, dtype=x2d.dtype)
    bias = up_b * scale if up_b is not None else None
    # y [+]= s * h B^T + s * b: the up-projection as the epilogue-only launch of the LoRA kernel
    kl.lora_linear(y, None, None, bias, h, up_w.t(), scale, has_main=False, accumulate=base2d is not None)
    return y, pre


def _triton_backward(dy2d, x2d, down_w, up_w, pre, scale, act, p, seed, needs):
    from ..kernels import lora as kl

    need_dx, need_down, need_up = needs
    dx = da_w = da_b = db_w = db_b = None
    if need_up:
        db_w = kl.dropout_matmul(dy2d.t(), ref.activation(pre, act), up_w.dtype, scale)
        db_b = dy2d.float().sum(0).mul_(scale).to(dy2d.dtype)
    if not (need_dx or need_down):
        return dx, da_w, da_b, db_w, db_b
    dh = kl.dropout_matmul(dy2d, up_w, torch.float32, scale)  # (M, r) in fp32, times act'(pre) below
    dpre = (dh * ref.activation_grad(pre, act)).to(pre.dtype)
    thr, keep_scale = rd.keep_threshold(p), rd.keep_scale(p)
    if need_down:
        da_w = kl.dropout_matmul(dpre.t(), x2d, down_w.dtype, keep_scale, seed, thr, drop="b")
        da_b = dpre.float().sum(0).to(pre.dtype)
    if need_dx:
        dx = torch.empty((dy2d.shape[0], down_w.shape[1]), device=dy2d.device, dtype=dy2d.dtype)
        kl.lora_linear(dx, None, None, None, dpre, down_w, keep_scale, seed, thr, has_main=False)
    return dx, da_w, da_b, db_w, db_b

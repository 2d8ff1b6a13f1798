"""The fused QLoRA linear op: LoRA on a frozen bitsandbytes-quantised base weight, registered with
torch.library (fake + autograd), dispatching to Triton or the reference.

    y = x dequant(Wq)^T (+ b) + sum_i s_i * (drop_i(x) A_i^T) B_i^T

The op's inputs are the packed weight and its quantisation state (see tunefast/reference/quant.py),
never a dense weight. The forward dequantises into a transient buffer, runs the fused LoRA math of
tunefast/ops/lora.py on it and frees it; the backward dequantises again for dx (only when dx is
needed). Kept for backward: what the LoRA op keeps (x, the (M, r_i) products xa_i, one seed per
adapter) plus references to the packed tensors, which are the module's own: no dense copy of the
weight lives between forward and backward, per layer or across layers.

Two ops, as for LoRA: ``tunefast::qlora_linear_fwd`` and ``tunefast::qlora_linear_bwd``. The public
entry is :func:`qlora_linear`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import lora as ref
from ..reference import quant as rq
from ..reference.quant import QuantWeight
from ._common import rows_to_shape, save_named, saved_named
from ._checks import check_lora_args, check_same_device
from ._lowrank import SEED_HIGH as _SEED_HIGH
from ._lowrank import flat_rows as _x2d
from ._lowrank import triton_backward as _triton_backward
from ._lowrank import triton_forward as _triton_forward

__all__ = ["QuantWeight", "qlora_linear", "check_quant_weight"]


# ----------------------------------------------------------------------------------------------------
# Quantised weight <-> op arguments (torch.library ops take tensors, ints, strs and dtypes only)
# ----------------------------------------------------------------------------------------------------


def _q_args(qw: QuantWeight):
    return (
        qw.data, qw.absmax, qw.absmax_code, qw.absmax_scale, qw.offset,
        qw.quant_type, [int(s) for s in qw.shape], [int(qw.blocksize), int(qw.absmax_blocksize)],
    )


def _q_weight(data, absmax, absmax_code, absmax_scale, offset, quant_type, shape, blocksizes) -> QuantWeight:
    return QuantWeight(data, absmax, quant_type, tuple(shape), blocksizes[0], absmax_code, absmax_scale,
                       blocksizes[1], offset)


def _dequantize(qw: QuantWeight, dtype: torch.dtype, round_through: list, use_triton: bool) -> Tensor:
    round_through = [d for d in round_through if d is not None]
    if not use_triton:
        return rq.dequantize(qw, dtype, round_through)
    from ..kernels import quant as kq

    code = rq.code(qw.quant_type, qw.device) if qw.quant_type != "int8" else None
    return kq.dequantize(
        qw.data, qw.absmax, code, qw.quant_type, qw.shape, qw.blocksize, qw.absmax_code, qw.absmax_scale,
        qw.absmax_blocksize, qw.offset, dtype=dtype, round_through=round_through,
    )


def _no_weight(qw: QuantWeight, like: Tensor) -> Tensor:
    # An (N, K) stand-in without storage for the dense backward when dx is not needed (never read).
    return like.new_empty(()).expand(*qw.shape)


# ----------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("tunefast::qlora_linear_fwd", mutates_args=())
def _qlora_linear_fwd(
    x: Tensor,
    qdata: Tensor,
    absmax: Tensor,
    absmax_code: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    offset: Optional[Tensor],
    quant_type: str,
    shape: list[int],
    blocksizes: list[int],
    round_dtype: Optional[torch.dtype],
    grad_round_dtype: Optional[torch.dtype],
    bias: Optional[Tensor],
    lora_a: list[Tensor],
    lora_b: list[Tensor],
    scalings: list[float],
    dropout_p: list[float],
    seeds: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """The dequantised weight is rounded to ``round_dtype`` before x's dtype; the backward's to
    ``grad_round_dtype``, then ``round_dtype`` (read by autograd, unused here)."""
    qw = _q_weight(qdata, absmax, absmax_code, absmax_scale, offset, quant_type, shape, blocksizes)
    x2d = _x2d(x)
    impl = _backend.resolve(backend, x.device)
    use_triton = impl == "triton"
    weight = _dequantize(qw, x.dtype, [round_dtype], use_triton)
    if use_triton:
        y2d, xas = _triton_forward(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds)
    else:
        with _backend.native_kernels(impl == "native"):
            y2d, xas = ref.forward(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds)
    return rows_to_shape(y2d, x.shape[:-1]), xas


@_qlora_linear_fwd.register_fake
def _(x, qdata, absmax, absmax_code, absmax_scale, offset, quant_type, shape, blocksizes, round_dtype,
      grad_round_dtype, bias, lora_a, lora_b, scalings, dropout_p, seeds, backend):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], shape[0])), [x.new_empty((m, a.shape[0]), dtype=a.dtype) for a in lora_a]


@torch.library.custom_op("tunefast::qlora_linear_bwd", mutates_args=())
def _qlora_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    qdata: Tensor,
    absmax: Tensor,
    absmax_code: Optional[Tensor],
    absmax_scale: Optional[Tensor],
    offset: Optional[Tensor],
    quant_type: str,
    shape: list[int],
    blocksizes: list[int],
    round_first: Optional[torch.dtype],
    round_second: Optional[torch.dtype],
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
    need_dx, need_da, need_db = needs
    qw = _q_weight(qdata, absmax, absmax_code, absmax_scale, offset, quant_type, shape, blocksizes)
    dy2d = _x2d(grad_y)
    x2d = _x2d(x) if need_da else x  # without dA, x is an empty placeholder (it was not kept)
    impl = _backend.resolve(backend, grad_y.device)
    use_triton = impl == "triton"
    if need_dx:
        weight = _dequantize(qw, grad_y.dtype, [round_first, round_second], use_triton)
    else:
        weight = _no_weight(qw, grad_y)
    if use_triton:
        dx, das, dbs = _triton_backward(dy2d, x2d, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs)
    else:
        with _backend.native_kernels(impl == "native"):
            dx, das, dbs = ref.backward(dy2d, x2d, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds, *needs)
    dx = dx.view(*grad_y.shape[:-1], shape[1]) if need_dx else grad_y.new_empty(0)
    return dx, das or [], dbs or []


@_qlora_linear_bwd.register_fake
def _(grad_y, x, qdata, absmax, absmax_code, absmax_scale, offset, quant_type, shape, blocksizes, round_first,
      round_second, lora_a, lora_b, xas, scalings, dropout_p, seeds, needs, backend):
    need_dx, need_da, need_db = needs
    dx = grad_y.new_empty((*grad_y.shape[:-1], shape[1])) if need_dx else grad_y.new_empty(0)
    das = [torch.empty_like(a) for a in lora_a] if need_da else []
    dbs = [torch.empty_like(b) for b in lora_b] if need_db else []
    return dx, das, dbs


_N_QUANT_TENSORS = 5  # qdata, absmax, absmax_code, absmax_scale, offset


def _setup_context(ctx, inputs, output):
    x, *quant_tensors = inputs[: 1 + _N_QUANT_TENSORS]
    quant_type, shape, blocksizes, round_dtype, grad_round = inputs[1 + _N_QUANT_TENSORS : 6 + _N_QUANT_TENSORS]
    bias, lora_a, lora_b, scalings, dropout_p, seeds, backend = inputs[6 + _N_QUANT_TENSORS :]
    _, xas = output
    need_da = any(a.requires_grad for a in lora_a)
    need_db = any(b.requires_grad for b in lora_b)
    # The packed tensors are the module's own (no new memory); no dense weight is saved.
    save_named(ctx, x=x if need_da else None, quant=list(quant_tensors), lora_a=list(lora_a), lora_b=list(lora_b),
               xas=list(xas) if need_db else [], seeds=seeds)
    ctx.n = len(lora_a)
    ctx.flags = (need_da, need_db, bias is not None and bias.requires_grad)
    # bitsandbytes' backward: dequantise to QuantState.dtype, then cast to the gradient's dtype (C)
    rounds = (grad_round, round_dtype)
    ctx.static = (quant_type, list(shape), list(blocksizes), rounds, list(scalings), list(dropout_p), backend)


def _backward(ctx, grad_y, _grad_xas):
    saved = saved_named(ctx)
    n = ctx.n
    x, quant_tensors, lora_a, lora_b = saved["x"], saved["quant"], saved["lora_a"], saved["lora_b"]
    need_da, need_db, need_dbias = ctx.flags
    xas, seeds = saved["xas"], saved["seeds"]
    quant_type, shape, blocksizes, rounds, scalings, dropout_p, backend = ctx.static
    need_dx = ctx.needs_input_grad[0]
    if x is None:  # dA not needed, so x was not kept
        x = grad_y.new_empty(0)
    dx, das, dbs = _qlora_linear_bwd(
        grad_y, x, *quant_tensors, quant_type, shape, blocksizes, *rounds,
        lora_a, lora_b, xas, scalings, dropout_p, seeds, [need_dx, need_da, need_db], backend,
    )
    dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_dbias else None
    das = [g if a.requires_grad else None for g, a in zip(das, lora_a)] if need_da else [None] * n
    dbs = [g if b.requires_grad else None for g, b in zip(dbs, lora_b)] if need_db else [None] * n
    return (dx if need_dx else None), *([None] * 10), dbias, das, dbs, None, None, None, None


torch.library.register_autograd("tunefast::qlora_linear_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------


def check_quant_weight(qw: QuantWeight) -> None:
    """Clear errors for a malformed or unsupported quantised weight (never a trace from a kernel)."""
    if not isinstance(qw, QuantWeight):
        raise TypeError(f"weight must be a tunefast QuantWeight, got {type(qw).__name__}")
    if qw.quant_type not in rq.QUANT_TYPES:
        raise ValueError(
            f"unsupported quantisation type {qw.quant_type!r}: tunefast dequantises 'nf4' and 'fp4' "
            "(bitsandbytes Linear4bit, with or without double quantisation) and 'int8' (Linear8bitLt)"
        )
    if len(qw.shape) != 2 or min(qw.shape) < 0:
        raise ValueError(f"weight shape must be (out_features, in_features), got {qw.shape}")
    n, k = qw.shape
    for name in ("data", "absmax"):
        t = getattr(qw, name)
        if not isinstance(t, Tensor):
            raise TypeError(f"weight.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_meta:
            raise ValueError(f"weight.{name} is a meta tensor (shape only, no data): load the quantised weights first")
    if qw.quant_type == "int8":
        if qw.data.dtype != torch.int8 or qw.data.numel() != n * k:
            raise ValueError(
                f"int8 weight data must be int8 with {n}x{k} elements, got {qw.data.dtype} {tuple(qw.data.shape)}"
            )
        if qw.absmax.dtype != torch.float32 or qw.absmax.numel() != n:
            raise ValueError(
                f"int8 row scales (SCB) must be float32 with {n} elements, got {qw.absmax.dtype} "
                f"{tuple(qw.absmax.shape)}"
            )
        return
    if qw.blocksize <= 0:
        raise ValueError(f"4-bit blocksize must be positive, got {qw.blocksize}")
    nbytes = qw.data.numel() * qw.data.element_size()
    if nbytes != (n * k + 1) // 2:
        raise ValueError(f"{qw.quant_type} data holds {nbytes} bytes; a {n}x{k} weight packs into {(n * k + 1) // 2}")
    if not qw.data.is_contiguous():
        raise ValueError("4-bit weight data must be contiguous (bitsandbytes' packed layout)")
    blocks = -(-n * k // qw.blocksize)
    if qw.absmax.numel() != blocks:
        raise ValueError(f"absmax has {qw.absmax.numel()} entries; {n}x{k} in blocks of {qw.blocksize} needs {blocks}")
    if not qw.nested:
        if qw.absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantisation, got {qw.absmax.dtype}")
        return
    if qw.absmax.dtype != torch.uint8:
        raise ValueError(f"double-quantised absmax must be uint8, got {qw.absmax.dtype}")
    if qw.absmax_scale is None or qw.offset is None or qw.absmax_blocksize <= 0:
        raise ValueError("double quantisation needs absmax_code, absmax_scale, absmax_blocksize and offset together")
    if qw.absmax_code.dtype != torch.float32 or qw.absmax_code.numel() != 256:
        raise ValueError(
            f"absmax_code must be the 256-value float32 code, got {qw.absmax_code.dtype} {tuple(qw.absmax_code.shape)}"
        )
    if qw.absmax_scale.numel() != -(-blocks // qw.absmax_blocksize) or qw.absmax_scale.dtype != torch.float32:
        raise ValueError(f"absmax_scale must be float32 with one entry per {qw.absmax_blocksize} absmax bytes")
    if qw.offset.numel() != 1 or qw.offset.dtype != torch.float32:
        raise ValueError("offset must be a 1-element float32 tensor")
    check_same_device([("weight.data", qw.data), ("weight.absmax", qw.absmax), ("weight.absmax_code", qw.absmax_code),
                       ("weight.absmax_scale", qw.absmax_scale), ("weight.offset", qw.offset)])


def qlora_linear(
    x: Tensor,
    weight: QuantWeight,
    bias: Optional[Tensor],
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scalings: Sequence[float],
    dropout_p: Sequence[float] = (),
    *,
    round_dtype: Optional[torch.dtype] = None,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Fused QLoRA linear layer: ``x dequant(W)^T + b + sum_i s_i * (drop_i(x) A_i^T) B_i^T``.

    Args:
        x: (*, K) input, float32 / float16 / bfloat16: the dtype the base product is computed in.
        weight: the frozen quantised (N, K) base weight (:class:`QuantWeight`: nf4 / fp4 with or
            without double quantisation, or int8 row-scaled), on x's device.
        bias: (N,) in x's dtype, or None.
        lora_a, lora_b, scalings, dropout_p, training, backend: as for :func:`tunefast.lora_linear`.
        round_dtype: round the dequantised weight to this dtype before x's dtype: bitsandbytes'
            compute dtype when x's differs (wider, or autocast's). The backward rounds it through
            ``weight.dtype`` first, as bitsandbytes' 4-bit backward does.

    Returns:
        (*, N) tensor of x's dtype.
    """
    check_quant_weight(weight)
    n = len(lora_a)
    dropout_p = list(dropout_p) if len(dropout_p) else [0.0] * n
    # The dense checks on a storage-free (N, K) stand-in of x's dtype: shapes, dtypes, devices.
    check_lora_args(x, x.new_empty(()).expand(*weight.shape), bias, lora_a, lora_b, scalings, dropout_p, backend)
    check_same_device([("x", x), ("weight.data", weight.data), ("weight.absmax", weight.absmax)])
    ps = [float(p) if training else 0.0 for p in dropout_p]
    seeds = None
    if any(p > 0.0 for p in ps):
        seeds = torch.randint(0, _SEED_HIGH, (n,), device=x.device, dtype=torch.int64)
    y, _ = _qlora_linear_fwd(
        x, *_q_args(weight), round_dtype, weight.dtype if weight.quant_type != "int8" else None,
        bias, list(lora_a), list(lora_b), [float(s) for s in scalings], ps, seeds, backend,
    )
    return y

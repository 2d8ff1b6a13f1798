"""The fused QLoRA linear op: LoRA on a frozen bitsandbytes-quantised base weight, registered with
torch.library (fake + autograd), dispatching to Triton or the reference.

    y = x dequant(Wq)^T (+ b) + sum_i s_i * (drop_i(x) A_i^T) B_i^T

The op's inputs are the packed weight and its quantisation state (see tunefast/reference/quant.py),
never a dense weight. The forward dequantises into a transient buffer, runs the fused LoRA math of
tunefast/ops/lora.py on it and frees it; the backward dequantises again for dx (only when dx is
needed) and runs LoRA's backward op on it. Kept for backward: what the LoRA op keeps (x, the (M, r_i)
products xa_i, one seed per adapter) plus references to the packed tensors, which are the module's
own: no dense copy of the weight lives between forward and backward, per layer or across layers.

Ops: ``tunefast::qlora_linear_fwd`` (its backward: ``tunefast::qlora_dequantize``, then LoRA's
``tunefast::lora_linear_bwd``). The public entry is :func:`qlora_linear`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import quant as rq
from ..reference.quant import QuantWeight
from ._common import save_named, saved_named
from ._checks import check_lora_args, check_same_device
from ._lowrank import SEED_HIGH as _SEED_HIGH
from ._lowrank import adapter_grads, run_forward
from .lora import _lora_linear_bwd

__all__ = ["QuantWeight", "qlora_linear", "check_quant_weight"]


# ----------------------------------------------------------------------------------------------------
# Quantised weight <-> op arguments (torch.library ops take tensors, ints, strs and dtypes only)
# ----------------------------------------------------------------------------------------------------


def _q_args(qw: QuantWeight):
    """The op arguments of ``qw``: (tensors [data, absmax, absmax_code, absmax_scale, offset], quant_type,
    layout [N, K, blocksize, absmax_blocksize])."""
    tensors = [qw.data, qw.absmax, qw.absmax_code, qw.absmax_scale, qw.offset]
    return tensors, qw.quant_type, [int(s) for s in qw.shape] + [int(qw.blocksize), int(qw.absmax_blocksize)]


def _q_weight(tensors, quant_type, layout) -> QuantWeight:
    data, absmax, absmax_code, absmax_scale, offset = tensors
    n, k, blocksize, absmax_blocksize = layout
    return QuantWeight(data, absmax, quant_type, (n, k), blocksize, absmax_code, absmax_scale, absmax_blocksize,
                       offset)


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


# ----------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("tunefast::qlora_linear_fwd", mutates_args=())
def _qlora_linear_fwd(
    x: Tensor,
    quant: list[Optional[Tensor]], quant_type: str, layout: list[int],  # the QuantWeight, as _q_args gives it
    round_dtype: Optional[torch.dtype],
    grad_round_dtype: Optional[torch.dtype],
    bias: Optional[Tensor],
    lora_a: list[Tensor], lora_b: list[Tensor], scalings: list[float], dropout_p: list[float],  # the adapters
    seeds: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """The dequantised weight is rounded to ``round_dtype`` before x's dtype; the backward's to
    ``grad_round_dtype``, then ``round_dtype`` (read by autograd, unused here)."""
    impl = _backend.resolve(backend, x.device)
    weight = _dequantize(_q_weight(quant, quant_type, layout), x.dtype, [round_dtype], impl == "triton")
    return run_forward(impl, x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds)


@_qlora_linear_fwd.register_fake
def _(x, quant, quant_type, layout, round_dtype, grad_round_dtype, bias, lora_a, lora_b, scalings, dropout_p, seeds,
      backend):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], layout[0])), [x.new_empty((m, a.shape[0]), dtype=a.dtype) for a in lora_a]


@torch.library.custom_op("tunefast::qlora_dequantize", mutates_args=())
def _qlora_dequantize(
    quant: list[Optional[Tensor]],
    quant_type: str,
    layout: list[int],
    dtype: torch.dtype,
    round_first: Optional[torch.dtype],
    round_second: Optional[torch.dtype],
    backend: str,
) -> Tensor:
    """The dense (N, K) weight in ``dtype``, rounded through ``round_first`` then ``round_second`` (each
    skipped when None): the backward's transient weight for dx."""
    qw = _q_weight(quant, quant_type, layout)
    return _dequantize(qw, dtype, [round_first, round_second], _backend.resolve(backend, qw.device) == "triton")


@_qlora_dequantize.register_fake
def _(quant, quant_type, layout, dtype, round_first, round_second, backend):
    return quant[0].new_empty(tuple(layout[:2]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, quant, quant_type, layout, round_dtype, grad_round, bias, lora_a, lora_b, scalings, dropout_p, seeds, backend = (
        inputs)
    _, xas = output
    need_da = any(a.requires_grad for a in lora_a)
    need_db = any(b.requires_grad for b in lora_b)
    # The packed tensors are the module's own (no new memory); no dense weight is saved.
    save_named(ctx, x=x if need_da else None, quant=list(quant), lora_a=list(lora_a), lora_b=list(lora_b),
               xas=list(xas) if need_db else [], seeds=seeds)
    ctx.flags = (need_da, need_db, bias is not None and bias.requires_grad)
    # bitsandbytes' backward: dequantise to QuantState.dtype, then cast to the gradient's dtype (C)
    rounds = (grad_round, round_dtype)
    ctx.static = (quant_type, list(layout), rounds, list(scalings), list(dropout_p), backend)


def _backward(ctx, grad_y, _grad_xas):
    """LoRA's backward op on the weight dequantised again (only when dx is needed: without dx an (N, K)
    stand-in without storage, never read)."""
    saved = saved_named(ctx)
    x, quant, lora_a, lora_b = saved["x"], saved["quant"], saved["lora_a"], saved["lora_b"]
    need_da, need_db, need_dbias = ctx.flags
    xas, seeds = saved["xas"], saved["seeds"]
    quant_type, layout, rounds, scalings, dropout_p, backend = ctx.static
    need_dx = ctx.needs_input_grad[0]
    if x is None:  # dA not needed, so x was not kept
        x = grad_y.new_empty(0)
    if need_dx:
        weight = _qlora_dequantize(quant, quant_type, layout, grad_y.dtype, *rounds, backend)
    else:
        weight = grad_y.new_empty(()).expand(*layout[:2])
    dx, das, dbs = _lora_linear_bwd(grad_y, x, weight, lora_a, lora_b, xas, scalings, dropout_p, seeds,
                                    [need_dx, need_da, need_db], backend)
    dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_dbias else None
    das, dbs = adapter_grads(das, dbs, lora_a, lora_b, need_da, need_db)
    # torch.library takes a list input holding a None (no double quantisation) as one leaf: its gradient is
    # then None; a list of tensors takes a list of gradients.
    dquant = None if any(t is None for t in quant) else [None] * len(quant)
    return (dx if need_dx else None), dquant, None, None, None, None, dbias, das, dbs, None, None, None, None


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

"""Token-routed multi-adapter LoRA as torch.library ops (fake + autograd), Triton or reference.

    y_t = x_t W^T + b + s_a * (drop_a(x_t) A_a^T) B_a^T,   a = adapter_ids[t]  (-1: base only)

Training and inference: the backward gives each adapter the gradients of its own tokens only. Tokens
are sorted by adapter once; every adapter works on one contiguous segment (reference/routed_lora.py
explains the layout), so the cost is one LoRA pass plus a gather of x and a scatter of y.
Kept for backward: x, the sorted (M, max r) down-projections, the ids and the seeds.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import dropout as rd
from ..reference import routed_lora as ref
from ._common import rows_to_shape, save_named, saved_named
from ._checks import check_lora_args
from ._lowrank import SEED_HIGH as _SEED_HIGH
from ._lowrank import adapter_grads


@torch.library.custom_op("tunefast::routed_lora_linear_fwd", mutates_args=())
def _routed_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: list[Tensor], lora_b: list[Tensor],
    scalings: list[float], dropout_p: list[float], seeds: Optional[Tensor], adapter_ids: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    x2d = x.reshape(-1, x.shape[-1])
    which = _backend.resolve(backend, x.device)
    impl = _triton_forward if which == "triton" else ref.forward
    with _backend.native_kernels(which == "native"):
        y2d, xa_sorted = impl(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, adapter_ids)
    return rows_to_shape(y2d, x.shape[:-1]), xa_sorted


@_routed_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, adapter_ids, backend):
    m = x.numel() // x.shape[-1]
    r_max = max(a.shape[0] for a in lora_a)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((m, r_max), dtype=lora_a[0].dtype)


@torch.library.custom_op("tunefast::routed_lora_linear_bwd", mutates_args=())
def _routed_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], xa_sorted: Tensor,
    scalings: list[float], dropout_p: list[float], seeds: Optional[Tensor], adapter_ids: Tensor,
    needs: list[bool], backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    dy2d, x2d = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
    which = _backend.resolve(backend, grad_y.device)
    impl = _triton_backward if which == "triton" else ref.backward
    with _backend.native_kernels(which == "native"):
        dx, das, dbs = impl(dy2d, x2d, weight, lora_a, lora_b, xa_sorted, scalings, dropout_p, seeds, adapter_ids, *needs)
    dx = dx.view(*grad_y.shape[:-1], weight.shape[1]) if needs[0] else grad_y.new_empty(0)
    return dx, das or [], dbs or []


@_routed_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, xa_sorted, scalings, dropout_p, seeds, adapter_ids, needs, backend):
    dx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if needs[0] else grad_y.new_empty(0)
    return dx, [torch.empty_like(a) for a in lora_a] if needs[1] else [], [torch.empty_like(b) for b in lora_b] if needs[2] else []


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, adapter_ids, backend = inputs
    need_da = any(a.requires_grad for a in lora_a)
    need_db = any(b.requires_grad for b in lora_b)
    save_named(ctx, x=x, weight=weight, xa_sorted=output[1], seeds=seeds, adapter_ids=adapter_ids,
               lora_a=list(lora_a), lora_b=list(lora_b))
    ctx.flags = (need_da, need_db, bias is not None and bias.requires_grad)
    ctx.static = (list(scalings), list(dropout_p), backend)


def _backward(ctx, grad_y, _grad_xa):
    saved = saved_named(ctx)
    x, weight, xa_sorted, seeds, adapter_ids, lora_a, lora_b = (
        saved[k] for k in ("x", "weight", "xa_sorted", "seeds", "adapter_ids", "lora_a", "lora_b"))
    need_da, need_db, need_dbias = ctx.flags
    scalings, dropout_p, backend = ctx.static
    need_dx = ctx.needs_input_grad[0]
    dx, das, dbs = _routed_bwd(
        grad_y, x, weight, list(lora_a), list(lora_b), xa_sorted, scalings, dropout_p, seeds, adapter_ids,
        [need_dx, need_da, need_db], backend,
    )
    dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_dbias else None
    das, dbs = adapter_grads(das, dbs, lora_a, lora_b, need_da, need_db)
    return (dx if need_dx else None), None, dbias, das, dbs, None, None, None, None, None


torch.library.register_autograd("tunefast::routed_lora_linear_fwd", _backward, setup_context=_setup_context)


def routed_lora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
    scalings: Sequence[float], adapter_ids: Tensor, dropout_p: Sequence[float] = (), *,
    training: bool = True, backend: str = "auto",
) -> Tensor:
    """LoRA linear layer where each token (or sequence) uses its own adapter.

    Args:
        x: (*, K) input; weight (N, K); bias (N,) or None — as in :func:`tunefast.lora_linear`.
        lora_a, lora_b, scalings, dropout_p: the n adapters, each (r_a, K) / (N, r_a) (one dtype).
        adapter_ids: integer tensor, per token with shape ``x.shape[:-1]``, or per sequence with
            shape ``x.shape[:1]`` (broadcast over the other leading dims); values in [-1, n), -1 =
            the base model only.
    Returns:
        (*, N) tensor of x's dtype.
    """
    n = len(lora_a)
    dropout_p = list(dropout_p) if len(dropout_p) else [0.0] * n
    check_lora_args(x, weight, bias, lora_a, lora_b, scalings, dropout_p, backend)
    ids = check_adapter_ids(adapter_ids, x, n)
    if len({a.dtype for a in lora_a}) > 1:
        raise TypeError(f"routed adapters must share one dtype, got {sorted(str(a.dtype) for a in lora_a)}")
    ps = [float(p) if training else 0.0 for p in dropout_p]
    seeds = torch.randint(0, _SEED_HIGH, (n,), device=x.device, dtype=torch.int64) if any(ps) else None
    y, _ = _routed_fwd(x, weight, bias, list(lora_a), list(lora_b), [float(s) for s in scalings], ps, seeds, ids, backend)
    return y


def check_adapter_ids(adapter_ids, x: Tensor, n: int) -> Tensor:
    """Validate and flatten routing ids to (M,) int64 on x's device."""
    if not isinstance(adapter_ids, Tensor) or adapter_ids.is_floating_point() or adapter_ids.is_complex():
        raise TypeError(f"adapter_ids must be an integer tensor, got {type(adapter_ids).__name__}"
                        + (f" of {adapter_ids.dtype}" if isinstance(adapter_ids, Tensor) else ""))
    lead = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) == lead[:1] and len(lead) > 1:
        adapter_ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead)
    if tuple(adapter_ids.shape) != lead:
        raise ValueError(
            f"adapter_ids has shape {tuple(adapter_ids.shape)}; expected one id per token {lead} "
            f"or one per sequence {lead[:1]}"
        )
    ids = adapter_ids.reshape(-1).to(device=x.device, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
        raise ValueError(f"adapter_ids must be in [-1, {n}) for {n} adapters; got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


# ---------------------------------------------------------------------------------------------------
# Triton composition: per segment, the fused LoRA kernels of kernels/lora.py on contiguous row slices.
# ---------------------------------------------------------------------------------------------------


def _triton_forward(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, adapter_ids):
    from ..kernels import lora as kl

    order, bounds, xs = ref.sort_rows(adapter_ids, len(lora_a), x2d)
    ys = torch.empty((xs.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    r_max = max(a.shape[0] for a in lora_a)
    xa_sorted = xs.new_zeros((xs.shape[0], r_max), dtype=lora_a[0].dtype)
    st, en = bounds[0], bounds[1]
    if en > st:  # base-only tokens: the main product with an empty low-rank term
        empty = xs.new_empty((en - st, 0))
        kl.lora_linear(ys[st:en], xs[st:en], weight.t(), bias, empty, empty.new_empty((0, ys.shape[1])), 0.0)
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        st, en = bounds[i + 1], bounds[i + 2]
        if st == en:
            continue
        seed = None if seeds is None else seeds[i : i + 1]
        xa = kl.dropout_matmul(xs[st:en], a.t(), a.dtype, rd.keep_scale(p), seed, rd.keep_threshold(p), drop="a",
                               x_row0=st)
        xa_sorted[st:en, : a.shape[0]] = xa
        kl.lora_linear(ys[st:en], xs[st:en], weight.t(), bias, xa, b.t(), s)
    return ref.unsort_rows(ys, order), xa_sorted


def _triton_backward(dy2d, x2d, weight, lora_a, lora_b, xa_sorted, scalings, dropout_p, seeds, adapter_ids,
                     need_dx, need_da, need_db):
    from ..kernels import lora as kl

    order, bounds, dys, xs = ref.sort_rows(adapter_ids, len(lora_a), dy2d, x2d if need_da else None)
    dxs = torch.empty((dys.shape[0], weight.shape[1]), device=dys.device, dtype=dys.dtype) if need_dx else None
    st, en = bounds[0], bounds[1]
    if need_dx and en > st:
        empty = dys.new_empty((en - st, 0))
        kl.lora_linear(dxs[st:en], dys[st:en], weight, None, empty, empty.new_empty((0, dxs.shape[1])), 0.0)
    das, dbs = [], []
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        st, en = bounds[i + 1], bounds[i + 2]
        seed = None if seeds is None else seeds[i : i + 1]
        thr, ks, r = rd.keep_threshold(p), rd.keep_scale(p), a.shape[0]
        if need_db:
            dbs.append(kl.dropout_matmul(dys[st:en].t(), xa_sorted[st:en, :r], b.dtype, s))
        dxa = kl.dropout_matmul(dys[st:en], b, a.dtype, s)
        if need_da:
            das.append(kl.dropout_matmul(dxa.t(), xs[st:en], a.dtype, ks, seed, thr, drop="b", x_row0=st))
        if need_dx and en > st:
            kl.lora_linear(dxs[st:en], dys[st:en], weight, None, dxa, a, ks, seed, thr, x_row0=st)
    return ref.unsort_rows(dxs, order), das, dbs

"""The fused LM-head loss, registered with torch.library (fake + autograd):

``tunefast::linear_cross_entropy_fwd``: per-row (or summed) cross-entropy of ``hidden weight^T + bias``
    with optional logit scale, final-logit softcapping and label smoothing, never holding the (N, V)
    logits: Triton (kernels/linear_cross_entropy.py, vocab tiles, split log-sum-exp) or the reference
    (tunefast/reference/linear_cross_entropy.py, token chunks).
``tunefast::linear_cross_entropy_bwd``: the gradients for per-row upstream gradients, recomputing the
    logits tile by tile (or chunk by chunk) from the saved (N,) log-sum-exp.

Kept for backward:
  reduction "mean" / "sum": the gradients themselves, formed in the forward's pass (dhidden (N, H) and,
    only when the head trains, dweight / dbias); backward scales them by the upstream scalar. The
    matmul count is then that of the unfused head (forward + dhidden), with no recompute.
  reduction "none": hidden, labels and the (N,) fp32 log-sum-exp (the weight is a parameter); the
    upstream gradient differs per row, so backward recomputes the logits.
The unfused head keeps the (N, V) logits (and HF's fp32 copy): 594 MiB at N = 1024, V = 151,936.

Public entry: :func:`linear_cross_entropy`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import linear_cross_entropy as ref
from ._checks import check_same_device, check_tensor

REDUCTIONS = ("mean", "sum", "none")


def _impl(backend: str, device: torch.device):
    if _backend.resolve(backend, device) == "triton":
        from ..kernels import linear_cross_entropy as kernel

        return kernel
    return ref


@torch.library.custom_op("tunefast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    softcap: float,
    logit_scale: float,
    label_smoothing: float,
    reduce_sum: bool,
    needs: list[bool],
    chunk_rows: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, dhidden, dweight, dbias); gradients only with ``reduce_sum``, empty otherwise."""
    impl = _impl(backend, hidden.device)
    loss, lse, dh, dw, db = impl.forward(
        hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing, reduce_sum,
        *needs, chunk_rows,
    )
    empty = lambda: hidden.new_empty(0)  # noqa: E731 (outputs may not alias one another)
    return loss, lse, dh if dh is not None else empty(), dw if dw is not None else empty(), (
        db if db is not None else empty())


@_lce_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing, reduce_sum, needs,
      chunk_rows, backend):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    empty = lambda: hidden.new_empty(0)  # noqa: E731
    return (
        hidden.new_empty((), **f32) if reduce_sum else hidden.new_empty((n,), **f32),
        hidden.new_empty((n,), **f32),
        torch.empty_like(hidden) if reduce_sum and needs[0] else empty(),
        torch.empty_like(weight) if reduce_sum and needs[1] else empty(),
        torch.empty_like(bias) if reduce_sum and needs[2] and bias is not None else empty(),
    )


@torch.library.custom_op("tunefast::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(
    grad_rows: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    ignore_index: int,
    softcap: float,
    logit_scale: float,
    label_smoothing: float,
    needs: list[bool],
    chunk_rows: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dhidden, dweight, dbias) of sum_i grad_rows_i loss_i; empty where not needed."""
    impl = _impl(backend, hidden.device)
    dh, dw, db = impl.backward(grad_rows, hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale,
                               label_smoothing, *needs, chunk_rows)
    empty = lambda: hidden.new_empty(0)  # noqa: E731
    return dh if dh is not None else empty(), dw if dw is not None else empty(), db if db is not None else empty()


@_lce_bwd.register_fake
def _(grad_rows, hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale, label_smoothing, needs,
      chunk_rows, backend):
    empty = lambda: hidden.new_empty(0)  # noqa: E731
    return (
        torch.empty_like(hidden) if needs[0] else empty(),
        torch.empty_like(weight) if needs[1] else empty(),
        torch.empty_like(bias) if needs[2] and bias is not None else empty(),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, softcap, logit_scale, smoothing, reduce_sum, needs, rows, backend = inputs
    ctx.reduce_sum = reduce_sum
    if reduce_sum:
        _, _, dh, dw, db = output
        ctx.save_for_backward(dh, dw, db)  # already the gradients: nothing of size V is kept
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, output[1])
        ctx.static = (ignore_index, softcap, logit_scale, smoothing, rows, backend)


def _backward(ctx, grad_loss, *_unused):
    need = ctx.needs_input_grad[:3]  # (hidden, weight, bias, ...)
    if ctx.reduce_sum:
        grads = [(g * grad_loss).to(g.dtype) if n else None for g, n in zip(ctx.saved_tensors, need)]
    else:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, softcap, logit_scale, smoothing, rows, backend = ctx.static
        out = _lce_bwd(grad_loss.float(), hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale,
                       smoothing, [bool(n) for n in need], rows, backend)
        grads = [g if n else None for g, n in zip(out, need)]
    return (*grads, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("tunefast::linear_cross_entropy_fwd", _backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """``F.cross_entropy(softcap(logit_scale * (hidden weight^T + bias)), labels)`` without the logits.

    Args:
        hidden: (N, H) float32 / float16 / bfloat16: the LM head's input (already shifted for a causal LM).
        weight: (V, H) the head's weight, hidden's dtype; bias: (V,) or None.
        labels: (N,) int64 class per row in [0, V), or ``ignore_index`` to leave the row out.
        reduction: "mean" (over the rows not ignored: NaN when every row is ignored, as
            F.cross_entropy), "sum", or "none" ((N,) fp32, 0 at ignored rows).
        num_items_in_batch: with reduction "mean", divide the sum by this (an int or a tensor) instead
            of the row count: transformers' gradient-accumulation normaliser (ForCausalLMLoss).
        softcap: Gemma-2's final logit softcapping ``softcap * tanh(logits / softcap)``, or None.
        logit_scale: multiplies the logits before softcapping (Cohere's ``logit_scale``).
        label_smoothing: in [0, 1], as F.cross_entropy's.
        backend: "auto", "triton" or "reference" (see tunefast.backend).
        chunk_rows: reference backend: rows of logits formed at once (default: 16M logits, at least 256 rows).

    Returns:
        0-d float32 loss (or (N,) for reduction "none"). Gradients flow to hidden, weight and bias
        (whichever require grad), accumulated in fp32.

    Caution: with reduction "mean"/"sum" the gradients are formed in the forward (as Liger's fused
    linear cross-entropy does), so a forward that is never backpropagated costs the backward's
    matmuls too; under torch.no_grad (evaluation) they are not formed.
    """
    n, vocab = _check_args(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, softcap,
                           logit_scale, label_smoothing, backend, chunk_rows)
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    rows = int(chunk_rows) if chunk_rows is not None else ref.default_chunk_rows(n, vocab)
    reduce_sum = reduction != "none"
    loss, *_ = _lce_fwd(hidden, weight, bias, labels, int(ignore_index), float(softcap or 0.0), float(logit_scale),
                        float(label_smoothing), reduce_sum, needs, rows, backend)
    if reduction != "mean":
        return loss
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return loss / (labels != ignore_index).sum()


def _check_args(hidden, weight, labels, bias, ignore_index, reduction, num_items_in_batch, softcap, logit_scale,
                label_smoothing, backend, chunk_rows):
    _backend.check_backend_name(backend)
    check_tensor(hidden, "hidden", ndim=2)
    check_tensor(weight, "weight", ndim=2)
    n, h = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (V, {h}) for hidden {tuple(hidden.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}: cast hidden to the "
                        "head's dtype (as nn.Linear would require)")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != vocab or bias.dtype != weight.dtype:
            raise ValueError(f"bias must have shape ({vocab},) and dtype {weight.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
        raise ValueError(f"labels must be an int64 tensor of shape ({n},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    if labels.requires_grad:
        raise ValueError("labels must not require grad")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the mean's denominator: it needs reduction='mean', "
                         f"got {reduction!r}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not float(logit_scale) > 0.0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_rows is not None and int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    check_same_device([("hidden", hidden), ("weight", weight), ("bias", bias), ("labels", labels)])
    if not torch.compiler.is_compiling() and n:  # one sync; F.cross_entropy fails on such labels too
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"found {labels[bad][:4].tolist()}")
    return n, vocab


def loss_sum_and_dhidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *, need_dhidden: bool,
                         chunk_rows: Optional[int] = None, backend: str = "auto", ignore_index: int = -100,
                         softcap: Optional[float] = None, logit_scale: float = 1.0) -> tuple[Tensor, Optional[Tensor]]:
    """(0-d fp32 summed loss, its gradient w.r.t. hidden (N, H) or None), from the same implementation as
    :func:`linear_cross_entropy` (same ``ignore_index`` / ``softcap`` / ``logit_scale`` meaning), for
    callers that chain the gradient into an op of their own inside a forward (tunefast::side_lm_loss
    forms the side network's gradients from it, so that neither logits nor an (N, H) hidden state is
    kept). No autograd: inputs are plain tensors."""
    rows = int(chunk_rows) if chunk_rows is not None else ref.default_chunk_rows(hidden.shape[0], weight.shape[0])
    loss, _, dh, _, _ = _impl(backend, hidden.device).forward(
        hidden, weight, bias, labels, int(ignore_index), float(softcap or 0.0), float(logit_scale), 0.0, True,
        need_dhidden, False, False, rows)
    return loss, dh

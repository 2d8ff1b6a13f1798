"""LoRA on an embedding table, registered with torch.library (fake + autograd), dispatching to the LoRA
op's Triton launchers (kernels/lora.py) or the reference (tunefast/reference/lora_embedding.py).

    y = E[ids] + s * A^T[ids] B^T      E (V, N) frozen, A (r, V), B (N, r)

The down-projection of a one-hot input is a gather of A's columns, so there is no first GEMM. Kept for
backward: the ids only (A^T[ids] is regathered, M r values, in backward). PEFT's ``lora.Embedding``
keeps the ids and A^T[ids] (M r values for its ``after_A @ B^T`` product).

Triton path: the gathers are torch ops (an index_select of M rows); the (M, r) x (r, N) product is the
epilogue-only launch of the LoRA kernel accumulating onto the gathered base rows (no second (M, N)
pass), and backward's dB = s dy^T A^T[ids] and dh = s dy B are the LoRA op's matmul launcher; dA is an
index_add of dh into A^T's rows (fp32), never a dense (V, r) temporary per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import lora_embedding as ref
from ._checks import check_same_device, check_tensor
from ._common import rows_to_shape


def _fwd_impl(ids, weight, lora_a, lora_b, scaling, backend):
    ids1d = ids.reshape(-1)
    if _backend.resolve(backend, weight.device) == "triton":
        from ..kernels import lora as kl

        y = torch.nn.functional.embedding(ids1d, weight)
        kl.lora_linear(y, None, None, None, ref.gather(ids1d, lora_a), lora_b.t(), scaling, has_main=False,
                       accumulate=True)
    else:
        y = ref.forward(ids1d, weight, lora_a, lora_b, scaling)
    return rows_to_shape(y, ids.shape)


@torch.library.custom_op("tunefast::lora_embedding_fwd", mutates_args=())
def _lora_embedding_fwd(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                        padding_idx: int, scale_grad_by_freq: bool, backend: str) -> Tensor:
    return _fwd_impl(ids, weight, lora_a, lora_b, scaling, backend)


@_lora_embedding_fwd.register_fake
def _(ids, weight, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, backend):
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _bwd_impl(grad_y, ids, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, needs, backend):
    need_da, need_db = needs
    dy = grad_y.reshape(-1, grad_y.shape[-1])
    ids1d = ids.reshape(-1)
    if _backend.resolve(backend, grad_y.device) == "triton":
        from ..kernels import lora as kl

        da = db = None
        if need_db:
            db = kl.dropout_matmul(dy.t(), ref.gather(ids1d, lora_a), lora_b.dtype, scaling)
        if need_da:
            dh = kl.dropout_matmul(dy, lora_b, torch.float32, scaling)  # (M, r), fp32 for the index_add
            da = ref.scatter_rows(ids1d, dh, lora_a.shape[1], padding_idx, scale_grad_by_freq, lora_a.dtype)
    else:
        da, db = ref.backward(dy, ids1d, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, need_da, need_db)
    empty = lambda: grad_y.new_empty(0)  # noqa: E731  (one each: custom-op returns may not alias)
    return da if need_da else empty(), db if need_db else empty()


@torch.library.custom_op("tunefast::lora_embedding_bwd", mutates_args=())
def _lora_embedding_bwd(grad_y: Tensor, ids: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                        padding_idx: int, scale_grad_by_freq: bool, needs: list[bool],
                        backend: str) -> tuple[Tensor, Tensor]:
    """(dA, dB); those not asked for in ``needs`` = (dA, dB) are empty."""
    return _bwd_impl(grad_y, ids, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, needs, backend)


@_lora_embedding_bwd.register_fake
def _(grad_y, ids, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, needs, backend):
    e = grad_y.new_empty(0)
    return torch.empty_like(lora_a) if needs[0] else e, torch.empty_like(lora_b) if needs[1] else e


def _setup_context(ctx, inputs, output):
    ids, weight, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, backend = inputs
    ctx.save_for_backward(ids, lora_a, lora_b)  # the ids only, beside the parameters
    ctx.static = (scaling, padding_idx, scale_grad_by_freq, backend)


def _backward(ctx, grad_y):
    ids, lora_a, lora_b = ctx.saved_tensors
    eager = getattr(ctx, "eager", False)
    off = 1 if eager else 0
    needs = [ctx.needs_input_grad[2 + off], ctx.needs_input_grad[3 + off]]
    bwd = _bwd_impl if eager else _lora_embedding_bwd
    da, db = bwd(grad_y, ids, lora_a, lora_b, *ctx.static[:3], needs, ctx.static[3])
    return None, None, da if needs[0] else None, db if needs[1] else None, None, None, None, None


torch.library.register_autograd("tunefast::lora_embedding_fwd", _backward, setup_context=_setup_context)


class _EagerLoraEmbedding(torch.autograd.Function):
    """The registered op's forward, backward and saved tensors without the custom-op dispatch (~170 us per
    call in eager mode, see ops/lora.py); under torch.compile the ops run instead."""

    @staticmethod
    def forward(ctx, static, ids, weight, lora_a, lora_b):
        scaling, padding_idx, scale_grad_by_freq, backend = static
        y = _fwd_impl(ids, weight, lora_a, lora_b, scaling, backend)
        _setup_context(ctx, (ids, weight, lora_a, lora_b, *static), y)
        ctx.eager = True
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _, _, da, db, *_ = _backward(ctx, grad_y)
        return None, None, None, da, db


def lora_embedding(ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, *,
                   padding_idx: int | None = None, scale_grad_by_freq: bool = False,
                   backend: str = "auto") -> Tensor:
    """Embedding lookup plus a LoRA update: ``E[ids] + s * A^T[ids] B^T``.

    Args:
        ids: (*) integer token ids in [0, V).
        weight: (V, N) frozen embedding table E, float32 / float16 / bfloat16.
        lora_a: (r, V) down-projection A (PEFT's ``lora_embedding_A``), weight's dtype.
        lora_b: (N, r) up-projection B (PEFT's ``lora_embedding_B``), weight's dtype.
        scaling: s.
        padding_idx: row of A^T that gets no gradient (nn.Embedding's padding_idx), or None.
        scale_grad_by_freq: divide each token's A^T-row gradient by its id's count in the batch.
        backend: "auto", "triton" or "reference" (see tunefast.backend).

    Returns:
        (*, N) tensor of weight's dtype. E never receives a gradient.
    """
    _check(ids, weight, lora_a, lora_b, padding_idx, backend)
    pad = -1 if padding_idx is None else int(padding_idx) % weight.shape[0]  # nn.Embedding's normalisation
    static = (float(scaling), pad, bool(scale_grad_by_freq), backend)
    if torch.compiler.is_compiling():
        return _lora_embedding_fwd(ids, weight, lora_a, lora_b, *static)
    return _EagerLoraEmbedding.apply(static, ids, weight, lora_a, lora_b)


def _check(ids, weight, lora_a, lora_b, padding_idx, backend) -> None:
    _backend.check_backend_name(backend)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be an int64 or int32 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    check_tensor(weight, "weight", ndim=2)
    check_tensor(lora_a, "lora_a", ndim=2)
    check_tensor(lora_b, "lora_b", ndim=2)
    vocab, n = weight.shape
    r = lora_a.shape[0]
    if lora_a.shape[1] != vocab or tuple(lora_b.shape) != (n, r):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not fit a ({vocab}, {n}) "
                         f"embedding table: expected (r, {vocab}) and ({n}, r)")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight requires grad: this op trains only lora_a and lora_b and never forms the table's "
                         "gradient; freeze it (weight.requires_grad_(False))")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from weight dtype {weight.dtype}")
    check_same_device([("ids", ids), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)])
    if padding_idx is not None and not -vocab <= int(padding_idx) < vocab:
        raise ValueError(f"padding_idx must be in [-{vocab}, {vocab}), got {padding_idx}")

"""The sparse-delta linear op, registered with torch.library (fake + autograd): a frozen dense weight plus
trainable sparse deltas, whose cost scales with the number of trained entries.

    y  = x W^T + b + sum_i x Delta_i^T        dense product + SpMM per delta (Delta never densified)
    dx = dy W + sum_i dy Delta_i              dense product + transposed SpMM
    dv_i = (dy^T x) at Delta_i's entries      SDDMM: nnz_i dot products over tokens, no (N, K) gradient

Why SpMM rather than scattering Delta into W for the step (SpIEL, and PEFT's SHiRA, which clones W):
the op never writes the frozen weight, so it is safe with tied or shared weights, FSDP shards and
concurrent streams, and Delta's term is added in fp32: on a bf16 weight a delta entry below half an
ulp of its weight (|W| ~ 0.02 has an ulp of 1.2e-4; freshly trained deltas are ~1e-5) would vanish from
a scattered forward while its gradient kept growing it. The SpMM costs 2 * M * nnz FLOPs, i.e. the
density times the dense product. Scatter is what merge() does, once (tunefast.methods.sparse).

Kept for backward: x (only when some delta trains, for its SDDMM); W, the values and the index
structures are parameters and buffers. A frozen nn.Linear keeps nothing; PEFT's SHiRA keeps x and a
dense (N, K) copy of the weight.

Implementations (``implementation()``): "triton" (kernels/sparse.py: CUDA tensors, or CPU under
TRITON_INTERPRET=1), "native" (tunefast._C on CPU: OpenMP SDDMM and SpMM; tunefast._C_cuda on a GPU:
the SDDMM, with the SpMM from torch; backend "native", or "auto" without Triton), "torch"
(tunefast/reference/sparse.py; backend "reference"). The dense products are always torch's (MKL, cuBLAS).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from .. import backend as _backend
from ..reference import sparse as ref
from ._common import rows_to_shape
from ._checks import check_linear_args, check_same_device, check_tensor

_INT32_MAX = 2**31 - 1


class SparseStructure(NamedTuple):
    """A delta's positions in an (N, K) weight, in the two orders the kernels walk them."""

    indices: Tensor  # (nnz,) int64, strictly increasing flat r * K + c (CSR order)
    row_ptr: Tensor  # (N + 1,) int64: row r's entries are indices[row_ptr[r] : row_ptr[r + 1]]
    col_ptr: Tensor  # (K + 1,) int64: column c's entries are t_perm[col_ptr[c] : col_ptr[c + 1]]
    t_rows: Tensor  # (nnz,) int32: rows of the entries in column order
    t_perm: Tensor  # (nnz,) int32: positions in ``indices`` of the entries in column order

    @property
    def shape(self) -> tuple[int, int]:
        return self.row_ptr.numel() - 1, self.col_ptr.numel() - 1


def check_indices(indices, shape: tuple[int, int] | None, name: str = "indices") -> Tensor:
    """``indices`` as an int64 (nnz,) tensor after checking it: integer, 1-D, within the (N, K) weight
    (only non-negative when ``shape`` is None: the weight is not known yet), unique and sorted. Raises
    ValueError / TypeError naming the first offending entry."""
    if not isinstance(indices, Tensor):
        try:
            indices = torch.as_tensor(indices)  # no dtype: 0.5 must not truncate silently to 0
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a 1-D integer tensor or sequence of ints: {e}") from None
        if indices.numel() == 0:
            indices = indices.to(torch.int64)
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (flat positions r * in_features + c), got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D (flat positions r * in_features + c), got shape {tuple(indices.shape)}")
    idx = indices.to(torch.int64).contiguous()
    if idx.numel() == 0:
        return idx
    negative = (idx < 0).nonzero()
    if negative.numel():
        i = int(negative[0])
        raise ValueError(f"{name} must be non-negative flat positions r * in_features + c: entry {i} is {int(idx[i])}")
    if shape is not None:
        n, k = (int(s) for s in shape)
        size = n * k
        bad = (idx >= size).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{name} out of range: entry {i} is {int(idx[i])}, but a ({n}, {k}) weight has flat "
                             f"positions 0 .. {size - 1}")
    if torch.unique(idx).numel() != idx.numel():
        sorted_idx = idx.sort().values
        dup = int(sorted_idx[1:][sorted_idx[1:] == sorted_idx[:-1]][0])
        where = f" (row {dup // int(shape[1])}, column {dup % int(shape[1])})" if shape is not None else ""
        raise ValueError(f"{name} are duplicated: position {dup}{where} appears more than once; each trained entry "
                         "must be listed once")
    step = idx[1:] - idx[:-1]
    down = (step < 0).nonzero()
    if down.numel():
        i = int(down[0])
        raise ValueError(f"{name} are not sorted: entry {i} is {int(idx[i])} and entry {i + 1} is {int(idx[i + 1])}; "
                         "pass them in increasing order (torch.sort(indices).values)")
    return idx


def sparse_structure(indices, shape: tuple[int, int], *, check: bool = True) -> SparseStructure:
    """The CSR and column-order views of a delta on an (N, K) weight = ``shape`` (out, in features)."""
    n, k = (int(s) for s in shape)
    if n > _INT32_MAX or k > _INT32_MAX:
        raise ValueError(f"weight shape ({n}, {k}) exceeds 2^31 - 1 in a dimension")
    idx = check_indices(indices, (n, k)) if check else indices
    if idx.numel() > _INT32_MAX:
        raise ValueError(f"a delta holds at most 2^31 - 1 entries per layer, got {idx.numel()}")
    rows, cols = ref.rows_cols(idx, k)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
    col_ptr = torch.zeros(k + 1, dtype=torch.int64, device=idx.device)
    if idx.numel():
        row_ptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        col_ptr[1:] = torch.bincount(cols, minlength=k).cumsum(0)
    order = torch.sort(cols, stable=True).indices  # by column, rows ascending within one (idx is sorted)
    return SparseStructure(idx, row_ptr, col_ptr, rows[order].to(torch.int32), order.to(torch.int32))


def implementation(backend: str, device) -> str:
    """"triton", "native" or "torch": what runs the sparse parts for ``backend`` on ``device``."""
    device = torch.device(device)
    impl = _backend.resolve(backend, device)
    if impl == "triton":
        return "triton"
    return "native" if impl == "native" and _native.sparse_usable(device)[0] else "torch"


# ----------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------


def _x2d(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _structs(indices, row_ptrs, col_ptrs, t_rows, t_perms):
    return [SparseStructure(*s) for s in zip(indices, row_ptrs, col_ptrs, t_rows, t_perms)]


@torch.library.custom_op("tunefast::sparse_linear_fwd", mutates_args=())
def _sparse_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    values: list[Tensor],
    # each delta's SparseStructure, field by field (_structs regroups them)
    indices: list[Tensor], row_ptrs: list[Tensor], col_ptrs: list[Tensor], t_rows: list[Tensor], t_perms: list[Tensor],
    backend: str,
) -> Tensor:
    structs = _structs(indices, row_ptrs, col_ptrs, t_rows, t_perms)
    y2d = _forward(implementation(backend, x.device), _x2d(x), weight, bias, values, structs)
    return rows_to_shape(y2d, x.shape[:-1])


@_sparse_linear_fwd.register_fake
def _(x, weight, bias, values, indices, row_ptrs, col_ptrs, t_rows, t_perms, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("tunefast::sparse_linear_bwd", mutates_args=())
def _sparse_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    values: list[Tensor],
    # each delta's SparseStructure, field by field (_structs regroups them)
    indices: list[Tensor], row_ptrs: list[Tensor], col_ptrs: list[Tensor], t_rows: list[Tensor], t_perms: list[Tensor],
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, list[Tensor]]:
    """(dx, [dv_i]); ``needs`` = [dx, dv_0, dv_1, ...]; a gradient not needed comes back empty."""
    need_dx, need_dv = needs[0], needs[1:]
    structs = _structs(indices, row_ptrs, col_ptrs, t_rows, t_perms)
    dy2d = _x2d(grad_y)
    x2d = _x2d(x) if any(need_dv) else x  # without a trained delta x was not kept (empty placeholder)
    dx, dvs = _backward(implementation(backend, grad_y.device), dy2d, x2d, weight, values, structs, need_dx, need_dv)
    dx = dx.view(*grad_y.shape[:-1], weight.shape[1]) if need_dx else grad_y.new_empty(0)
    dvs = [dv.to(v.dtype) if need else v.new_empty(0) for dv, v, need in zip(dvs, values, need_dv)]
    return dx, dvs


@_sparse_linear_bwd.register_fake
def _(grad_y, x, weight, values, indices, row_ptrs, col_ptrs, t_rows, t_perms, needs, backend):
    dx = grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1])) if needs[0] else grad_y.new_empty(0)
    return dx, [torch.empty_like(v) if need else v.new_empty(0) for v, need in zip(values, needs[1:])]


def _setup_context(ctx, inputs, output):
    x, weight, bias, values, indices, row_ptrs, col_ptrs, t_rows, t_perms, backend = inputs
    need_dv = [v.requires_grad for v in values]
    # x only for the SDDMM; never a dense copy of the weight (W, values and structures are module state).
    ctx.save_for_backward(x if any(need_dv) else None, weight, *values, *indices, *row_ptrs, *col_ptrs, *t_rows,
                          *t_perms)
    ctx.n = len(values)
    ctx.need_dv = need_dv
    ctx.need_dbias = bias is not None and bias.requires_grad
    ctx.backend = backend


def _backward_rule(ctx, grad_y):
    saved, n = ctx.saved_tensors, ctx.n
    x, weight = saved[0], saved[1]
    values, indices, row_ptrs, col_ptrs, t_rows, t_perms = (list(saved[2 + i * n : 2 + (i + 1) * n]) for i in range(6))
    need_dx = ctx.needs_input_grad[0]
    if x is None:
        x = grad_y.new_empty(0)
    dx, dvs = _sparse_linear_bwd(grad_y, x, weight, values, indices, row_ptrs, col_ptrs, t_rows, t_perms,
                                 [need_dx, *ctx.need_dv], ctx.backend)
    dbias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.need_dbias else None
    dvs = [g if need else None for g, need in zip(dvs, ctx.need_dv)]
    none = [None] * ctx.n  # list inputs take lists of gradients
    return (dx if need_dx else None), None, dbias, dvs, none, none, none, none, none, None


torch.library.register_autograd("tunefast::sparse_linear_fwd", _backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Dispatch of the sparse parts
# ----------------------------------------------------------------------------------------------------


def _spmm_(impl: str, out: Tensor, inp: Tensor, st: SparseStructure, values: Tensor, transposed: bool) -> None:
    """out (M, S) += inp Delta^T (transposed False) or inp Delta (True), in place, rounded once."""
    if impl == "triton":
        from ..kernels import sparse as ks

        if transposed:
            ks.spmm_(out, inp, st.col_ptr, st.t_rows, values, st.t_perm)
        else:
            ks.spmm_(out, inp, st.row_ptr, st.indices, values, n_in=inp.shape[1])
    elif impl == "native" and out.device.type == "cpu":
        if transposed:
            _native.sparse_spmm_(out, inp, st.col_ptr, st.t_rows, values, st.t_perm)
        else:
            _native.sparse_spmm_(out, inp, st.row_ptr, st.indices, values)
    else:  # torch, or the CUDA native build (SDDMM and scatter only)
        n_out, n_in = (out.shape[1], inp.shape[1]) if not transposed else (inp.shape[1], out.shape[1])
        part = ref.spmm_t(inp, st.indices, values, n_in) if transposed else ref.spmm(inp, st.indices, values, n_out)
        out.copy_((out.float() + part).to(out.dtype))


def _sddmm(impl: str, dy2d: Tensor, x2d: Tensor, st: SparseStructure) -> Tensor:
    n_in = x2d.shape[1]
    if impl == "triton":
        from ..kernels import sparse as ks

        return ks.sddmm(dy2d, x2d, st.indices, n_in)
    if impl == "native":
        return _native.sparse_sddmm(dy2d, x2d, st.indices, st.row_ptr)
    return ref.sddmm(dy2d, x2d, st.indices, n_in)


def _forward(impl, x2d, weight, bias, values, structs):
    if impl == "torch":
        return ref.forward(x2d, weight, bias, values, [s.indices for s in structs])
    y = F.linear(x2d, weight, bias)
    for v, st in zip(values, structs):
        _spmm_(impl, y, x2d, st, v, transposed=False)
    return y


def _backward(impl, dy2d, x2d, weight, values, structs, need_dx, need_dv):
    if impl == "torch":
        return ref.backward(dy2d, x2d, weight, values, [s.indices for s in structs], need_dx, need_dv)
    dx = None
    if need_dx:
        dx = dy2d @ weight
        for v, st in zip(values, structs):
            _spmm_(impl, dx, dy2d, st, v, transposed=True)
    return dx, [_sddmm(impl, dy2d, x2d, st) if need else None for st, need in zip(structs, need_dv)]


# ----------------------------------------------------------------------------------------------------
# Public entry
# ----------------------------------------------------------------------------------------------------


def _check_args(x, weight, bias, values, structs, backend) -> None:
    n_out, n_in = check_linear_args(x, weight, bias, backend, "the deltas' values")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    if len(values) != len(structs):
        raise ValueError(f"{len(values)} values tensors for {len(structs)} index structures")
    for i, (v, st) in enumerate(zip(values, structs)):
        check_tensor(v, f"values[{i}]", ndim=1)
        if st.shape != (n_out, n_in):
            raise ValueError(f"delta {i} was built for a {st.shape} weight, this weight is ({n_out}, {n_in})")
        if v.numel() != st.indices.numel():
            raise ValueError(f"values[{i}] has {v.numel()} entries but its indices have {st.indices.numel()}")
    check_same_device([("x", x), ("weight", weight), ("bias", bias)]
                      + [(f"values[{i}]", v) for i, v in enumerate(values)]
                      + [(f"indices[{i}]", st.indices) for i, st in enumerate(structs)])


def sparse_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    values: Tensor | Sequence[Tensor],
    structures: SparseStructure | Tensor | Sequence[SparseStructure | Tensor],
    *,
    backend: str = "auto",
) -> Tensor:
    """Linear layer with sparse weight deltas: ``x (W + sum_i Delta_i)^T + b``, Delta_i never densified.

    Args:
        x: (*, K) input, float32 / float16 / bfloat16.
        weight: (N, K) frozen base weight, x's dtype and device. For a GPT-2 ``Conv1D`` (weight stored
            (K, N)) pass ``weight.t()``: any strides work, nothing is copied.
        bias: (N,) or None, x's dtype; may require grad (BitFit).
        values: one (nnz_i,) tensor per delta (or a single tensor), any float dtype (fp32 typical); the
            trainable parameters. Their gradients come from an SDDMM at the delta's entries only.
        structures: per delta, a :class:`SparseStructure` from :func:`sparse_structure` (cache it: it
            sorts), or its (nnz_i,) int64 flat indices r * K + c, strictly increasing, checked and
            converted on every call (a single structure, tensor or list of ints: one delta).
        backend: "auto", "triton", "native" (the C++/CUDA kernels) or "reference" (plain PyTorch);
            see tunefast.backend.

    Returns:
        (*, N) tensor of x's dtype: the dense product in x's dtype, each delta's term added in fp32 and
        rounded once. The weight never receives a gradient and no (N, K) tensor is formed.
    """
    if isinstance(values, Tensor):
        values = [values]
    if isinstance(structures, (Tensor, SparseStructure)) or not all(
            isinstance(s, (Tensor, SparseStructure)) for s in structures):
        structures = [structures]  # one delta (a plain list of ints is one delta's indices)
    check_tensor(weight, "weight", ndim=2)
    structs = [s if isinstance(s, SparseStructure) else sparse_structure(s, weight.shape) for s in structures]
    values = list(values)
    _check_args(x, weight, bias, values, structs, backend)
    return _sparse_linear_fwd(
        x, weight, bias, values, [s.indices for s in structs], [s.row_ptr for s in structs],
        [s.col_ptr for s in structs], [s.t_rows for s in structs], [s.t_perm for s in structs], backend,
    )

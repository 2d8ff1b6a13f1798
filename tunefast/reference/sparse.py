"""Plain-PyTorch math of the sparse-delta linear op: the oracle of every kernel and the fallback path.

A sparse delta Delta of an (N, K) weight (N = out_features, K = in_features) is stored as
  indices (nnz,) int64   strictly increasing flat positions r * K + c in the row-major (N, K) weight
  values  (nnz,)         Delta[r, c] at those positions, any float dtype (the math is fp32)
With x2d (M, K), dy2d (M, N), M = tokens:

    y  = x W^T + b,  then  y = y + x Delta_i^T   for each delta i, in fp32, rounded once per delta
    dx = dy W,       then  dx = dx + dy Delta_i  likewise
    dv_i[k] = sum_t dy[t, r_k] * x[t, c_k]       (SDDMM: (dy^T x) at the delta's positions only)

Nothing here forms an (N, K) tensor: every product goes through (M, chunk) gathers of at most
``CHUNK_ELEMENTS`` elements, so the reference is also usable (slowly) on real layer sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per gathered (M, chunk) block


def rows_cols(indices: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(indices, n_in, rounding_mode="floor"), torch.remainder(indices, n_in)


def _step(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def sddmm(dy2d: torch.Tensor, x2d: torch.Tensor, indices: torch.Tensor, n_in: int) -> torch.Tensor:
    """(dy2d^T x2d) at ``indices``: fp32 (nnz,)."""
    rows, cols = rows_cols(indices, n_in)
    nnz, step = indices.numel(), _step(dy2d.shape[0])
    out = torch.empty(nnz, device=dy2d.device, dtype=torch.float32)
    for s in range(0, nnz, step):
        r, c = rows[s : s + step], cols[s : s + step]
        out[s : s + step] = (dy2d[:, r].float() * x2d[:, c].float()).sum(0)
    return out


def _gather_scatter(inp: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor, values: torch.Tensor,
                    n_out: int) -> torch.Tensor:
    """out (M, n_out) fp32 with out[:, scatter[k]] += inp[:, gather[k]] * values[k], in (M, chunk) blocks."""
    out = torch.zeros(inp.shape[0], n_out, device=inp.device, dtype=torch.float32)
    step = _step(inp.shape[0])
    for s in range(0, gather.numel(), step):
        sl = slice(s, s + step)
        out.index_add_(1, scatter[sl], inp[:, gather[sl]].float() * values[sl].float())
    return out


def spmm(x2d: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_out: int) -> torch.Tensor:
    """x2d (M, K) @ Delta^T: fp32 (M, n_out)."""
    rows, cols = rows_cols(indices, x2d.shape[1])
    return _gather_scatter(x2d, cols, rows, values, n_out)


def spmm_t(dy2d: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_in: int) -> torch.Tensor:
    """dy2d (M, N) @ Delta: fp32 (M, n_in)."""
    rows, cols = rows_cols(indices, n_in)
    return _gather_scatter(dy2d, rows, cols, values, n_in)


def forward(x2d, weight, bias, values, indices):
    """y2d (M, N) in x's dtype. ``values`` / ``indices``: one entry per delta."""
    y = F.linear(x2d, weight, bias)
    for v, idx in zip(values, indices):
        y = (y.float() + spmm(x2d, idx, v, weight.shape[0])).to(x2d.dtype)
    return y


def backward(dy2d, x2d, weight, values, indices, need_dx: bool, need_dv: list[bool]):
    """(dx2d (M, K) or None, [dv_i fp32 (nnz_i,) or None])."""
    dx = None
    if need_dx:
        dx = dy2d @ weight
        for v, idx in zip(values, indices):
            dx = (dx.float() + spmm_t(dy2d, idx, v, weight.shape[1])).to(dy2d.dtype)
    dvs = [sddmm(dy2d, x2d, idx, weight.shape[1]) if need else None for idx, need in zip(indices, need_dv)]
    return dx, dvs


def scatter_add_(weight_nk: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weight_nk[r_k, c_k] = round(weight_nk[r_k, c_k] + values[k]) (sum in fp32, rounded to the weight's
    dtype), in place; ``weight_nk`` is the (N, K) weight or a strided view of it (Conv1D). Returns the
    original entries, which :func:`scatter_restore_` writes back bit for bit."""
    rows, cols = rows_cols(indices, weight_nk.shape[1])
    saved = weight_nk[rows, cols]  # advanced indexing: a copy
    weight_nk[rows, cols] = (saved.float() + values.float()).to(weight_nk.dtype)
    return saved


def scatter_restore_(weight_nk: torch.Tensor, indices: torch.Tensor, saved: torch.Tensor) -> None:
    rows, cols = rows_cols(indices, weight_nk.shape[1])
    weight_nk[rows, cols] = saved

"""Triton kernels for sparse weight deltas (the math is tunefast/reference/sparse.py).

A delta of an (N, K) weight: nnz entries at strictly increasing flat indices idx = r * K + c (CSR, with
row_ptr (N + 1,)); its transpose lists the same entries by column: col_ptr (K + 1,), t_rows (their
rows, int32) and t_perm (their positions in idx / values, int32).

``_spmm_kernel``   out[t, s] = round(out[t, s] + sum_{e in segment s} vals[p_e] * inp[t, g_e])
    forward  (segments = rows):    out = y  (M, N), inp = x  (M, K), g_e = idx[e] - s * K, p_e = e
    backward (segments = columns): out = dx (M, K), inp = dy (M, N), g_e = t_rows[e],     p_e = t_perm[e]
  A program owns a (BLOCK_T tokens x BLOCK_S segments) tile of out and walks its segments' entries in
  step, masked past each segment's end (ELL-style over the tile): no atomics, deterministic, each out
  element read and written once.
``_sddmm_kernel``  dv[k] = sum_t dy[t, r_k] * x[t, c_k]   (r_k = idx[k] // K, c_k = idx[k] % K)
  A program owns BLOCK_NZ consecutive entries and one token range; with several ranges (split-T, for
  small deltas) each writes its own row of fp32 partials, summed by torch: deterministic.

Caution:
  * The math is fp32 on converted loads, with no tl.dot: the interpreter's bf16 dot trap does not apply.
  * Both kernels gather columns of row-major activations: on a GPU each (token, column) load is its own
    sector, 2 * M * nnz loads for the SDDMM at any density. Never run on a GPU yet; the autotune lists
    are starting points, not measured.
  * Configs and autotuning (a GPU only, not with TUNEFAST_AUTOTUNE=0): kernels/launch.py; the
    interpreter always uses one small fixed config.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import load_tile, store_tile, tile_range


@triton.jit
def _spmm_kernel(
    # pointers: output (M, S), gathered input (M, G), segment pointers (S + 1,) int64, per-entry gather
    # source (forward: flat indices int64; transposed: t_rows int32), values, t_perm (transposed only)
    out_ptr, inp_ptr, seg_ptr, gather_ptr, val_ptr, perm_ptr,
    # sizes: tokens, segments, K of the flat index (forward: column = idx - segment * n_in)
    M, S, n_in,
    # strides
    stride_om, stride_os, stride_im, stride_ig,
    # autotune key (log2 size buckets; the kernel ignores it)
    size_key,
    # meta-parameters
    TRANSPOSED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rt64, mask_t = tile_range(tl.program_id(0), BLOCK_T, M)
    rs64, mask_s = tile_range(tl.program_id(1), BLOCK_S, S)
    # Segment bounds as (1, BLOCK_S) rows: the loop works on 2-D tiles only. Mixing 1-D segment vectors
    # with their 2-D broadcasts inside the loop fails to compile with triton 3.6 (conflicting layouts in
    # TritonGPURemoveLayoutConversions, sm_80 and sm_90, every dtype).
    start = tl.load(seg_ptr + rs64, mask=mask_s, other=0)[None, :]
    length = tl.load(seg_ptr + rs64 + 1, mask=mask_s, other=0)[None, :] - start
    seg = rs64[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
    # The tile's longest segment sets the trip count: ~density * K steps (41 at 1 % of K = 4096).
    for j in range(0, tl.max(tl.max(length, axis=1), axis=0)):
        live = mask_s[None, :] & (j < length)
        e = start + j
        if TRANSPOSED:
            g = tl.load(gather_ptr + e, mask=live, other=0).to(tl.int64)
            p = tl.load(perm_ptr + e, mask=live, other=0).to(tl.int64)
        else:
            g = tl.load(gather_ptr + e, mask=live, other=0) - seg * n_in
            p = e
        v = tl.load(val_ptr + p, mask=live, other=0.0).to(tl.float32)
        xin = tl.load(inp_ptr + rt64[:, None] * stride_im + g * stride_ig,
                      mask=mask_t[:, None] & live, other=0.0).to(tl.float32)
        acc += xin * v
    acc += load_tile(out_ptr, rt64, rs64, mask_t, mask_s, stride_om, stride_os)
    store_tile(out_ptr, acc, rt64, rs64, mask_t, mask_s, stride_om, stride_os)


@triton.jit
def _sddmm_kernel(
    # pointers: output (splits, nnz) fp32, dy (M, N), x (M, K), flat indices (nnz,) int64
    out_ptr, dy_ptr, x_ptr, idx_ptr,
    # sizes: tokens, entries, K of the flat index, tokens per split
    M, NNZ, n_in, T_PER_SPLIT,
    # strides (stride_os: between splits' partial rows)
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_os,
    # autotune key
    size_key,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_NZ: tl.constexpr,
):
    split = tl.program_id(1)
    rk, mask_k = tile_range(tl.program_id(0), BLOCK_NZ, NNZ)
    flat = tl.load(idx_ptr + rk, mask=mask_k, other=0)
    r = flat // n_in
    c = flat - r * n_in
    t_begin = split * T_PER_SPLIT
    t_end = tl.minimum(M, t_begin + T_PER_SPLIT)
    rt = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_NZ,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        tt = (t0 + rt).to(tl.int64)
        m = (tt < t_end)[:, None] & mask_k[None, :]
        g = tl.load(dy_ptr + tt[:, None] * stride_dym + r[None, :] * stride_dyn, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + tt[:, None] * stride_xm + c[None, :] * stride_xk, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(g * xv, axis=0)
    tl.store(out_ptr + split.to(tl.int64) * stride_os + rk, acc, mask=mask_k)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (kernels/launch.py holds the rules)
# ----------------------------------------------------------------------------------------------------


def _gpu_configs(kernel_name, arch=None):
    """Tiles for Ampere/Hopper, the first being the fixed one. SpMM: (tokens, segments); SDDMM: (tokens per
    step, entries). No tl.dot and no pipelined loads: shared memory is only reductions' scratch."""
    if kernel_name == "_spmm_kernel":
        tiles = [(64, 32, 4), (128, 32, 4), (64, 64, 4), (32, 64, 4), (128, 64, 8), (256, 16, 4)]
        return [triton.Config(dict(BLOCK_T=t, BLOCK_S=s), num_warps=w) for t, s, w in tiles]
    # The (32 x 128) gathers hold two int64 address tiles: on 4 warps 235-255 registers, and on sm_80 with
    # triton 3.6 72 B/thread spilled; the same tile on 8 warps used 153-159 registers, clean (sm_80 / sm_89,
    # triton 3.6). sm_89 / sm_90 keep 4 warps (clean with triton 3.6 and 3.8).
    first = (32, 128, 8) if arch is not None and arch.capability == 80 else (32, 128, 4)
    tiles = [first, (16, 256, 4), (64, 64, 4), (32, 256, 8), (64, 128, 8), (128, 32, 4)]
    return [triton.Config(dict(BLOCK_T=t, BLOCK_NZ=k), num_warps=w) for t, k, w in tiles]


def _scratch_smem(c, named):
    # tl.max / tl.sum across a tile stage one fp32 per element of the reduced axis per warp at most.
    return 4 * max(c.kwargs.values()) * c.num_warps


# One small config per kernel for the CPU interpreter, where every program costs ~ms.
_SPMM = launch.Kernel(
    _spmm_kernel, configs=lambda arch, named: _gpu_configs("_spmm_kernel"), smem=_scratch_smem,
    interpret=dict(BLOCK_T=16, BLOCK_S=16),
    restore=["out_ptr"],  # the SpMM accumulates into out: every trial must start from the same out
)
_SDDMM = launch.Kernel(
    _sddmm_kernel, configs=lambda arch, named: _gpu_configs("_sddmm_kernel", arch), smem=_scratch_smem,
    interpret=dict(BLOCK_T=16, BLOCK_NZ=32),
)


def spmm_(out, inp, seg_ptr, gather, values, perm=None, n_in=0):
    """``out`` (M, S) += the delta's product with ``inp`` (M, G), in place; returns ``out``.

    perm None: y += x Delta^T (segments = rows; ``gather`` = flat indices int64, ``n_in`` = K).
    perm given: dx += dy Delta (segments = columns; ``gather`` = t_rows int32, ``perm`` = t_perm int32).
    ``out`` and ``inp`` may be strided views; ``values`` any float dtype.
    """
    M, S = out.shape
    if M == 0 or S == 0 or values.numel() == 0:
        return out
    transposed = perm is not None
    args = (
        out, inp, seg_ptr, gather, values, perm if transposed else gather,
        M, S, int(n_in),
        out.stride(0), out.stride(1), inp.stride(0), inp.stride(1),
        launch.size_key(M, S, values.numel()),
    )
    grid = lambda m: (triton.cdiv(M, m["BLOCK_T"]), triton.cdiv(S, m["BLOCK_S"]))  # noqa: E731
    _SPMM.launch(grid, args, dict(TRANSPOSED=transposed), like=out)
    return out


def _splits(M, nnz, like, splits):
    if splits is not None:
        return max(1, min(int(splits), M))
    if not launch.on_gpu(like):
        return 1
    # Few entries (0.1 % of 4096^2 is 16.8k: 131 programs of 128) leave SMs idle: split the tokens
    # until there are ~4 programs per SM, keeping >= 256 tokens per split.
    sms = launch.sm_count(like)
    programs = triton.cdiv(nnz, 128)
    return max(1, min(triton.cdiv(4 * sms, programs), M // 256, 64))


def sddmm(dy, x, indices, n_in, *, splits=None):
    """(dy^T x) at ``indices`` as a new fp32 (nnz,) tensor. dy (M, N), x (M, K): strided views allowed.

    ``splits`` forces the number of token ranges (default: 1 on CPU, enough to fill a GPU).
    """
    M = dy.shape[0]
    nnz = indices.numel()
    if nnz == 0 or M == 0:
        return torch.zeros(nnz, device=dy.device, dtype=torch.float32)
    n_split = _splits(M, nnz, dy, splits)
    per = triton.cdiv(M, n_split)
    n_split = triton.cdiv(M, per)
    out = torch.empty((n_split, nnz), device=dy.device, dtype=torch.float32)
    args = (
        out, dy, x, indices,
        M, nnz, int(n_in), per,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), out.stride(0),
        launch.size_key(M, nnz),
    )
    grid = lambda m: (triton.cdiv(nnz, m["BLOCK_NZ"]), n_split)  # noqa: E731
    _SDDMM.launch(grid, args, {}, like=dy)
    return out[0] if n_split == 1 else out.sum(0)


@launch.aot_examples
def _examples():
    """Forward (y += x Delta^T), backward (dx += dy Delta) and the values' gradient per activation dtype
    and value dtype (bf16 activations with fp32 values is the common case)."""
    m, n, k, nnz = 64, 96, 128, 500
    idx = torch.arange(nnz, dtype=torch.int64) * 7
    rows = torch.zeros(n + 1, dtype=torch.int64)
    cols = torch.zeros(k + 1, dtype=torch.int64)
    t_rows, t_perm = torch.zeros(nnz, dtype=torch.int32), torch.zeros(nnz, dtype=torch.int32)
    for act, val in launch.DTYPES:
        x, dy, values = torch.empty(m, k, dtype=act), torch.empty(m, n, dtype=act), torch.empty(nnz, dtype=val)
        spmm_(torch.empty(m, n, dtype=act), x, rows, idx, values, n_in=k)
        spmm_(torch.empty(m, k, dtype=act), dy, cols, t_rows, values, t_perm)
        sddmm(dy, x, idx, k)

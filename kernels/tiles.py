"""Shared ``@triton.jit`` pieces of the GEMM-shaped kernels (lora, scaled_linear, side, linear_cross_entropy,
sparse): tile ids and offsets, the K loop of one output tile, the dot with its upcast rule, and masked
row-vector loads / tile stores.

Triton inlines every ``@triton.jit`` helper into its caller, so these cost nothing at run time; ptxas
still sees slightly different code. Checked with the AOT compile (triton 3.8, sm_90, fixed configs) before
and after the kernels called them: 45 LoRA / dropout-matmul launches and the linear-cross-entropy, ladder
merge, SpMM and SDDMM launches compiled to the same registers and spills; the scaled-linear backward's
epilogue kept its own loads and stores because the helpers there cost 12 registers (48 -> 60 on 8 warps).

Conventions: ``rows`` / ``cols`` are int64 index vectors of one tile (``tile_range``), with their
bounds masks; tiles are fp32 accumulators of shape (len(rows), len(cols)).
"""

import triton
import triton.language as tl


@triton.jit
def grouped_tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program 0's axis in grouped order (Triton tutorial 03): GROUP_M row blocks in a row
    share B's column tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def tile_range(pid, BLOCK: tl.constexpr, size):
    """(indices (BLOCK,) int64, in-bounds mask (BLOCK,)) of block ``pid`` along an axis of ``size``."""
    r = pid * BLOCK + tl.arange(0, BLOCK)
    return r.to(tl.int64), r < size


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b; UPCAST multiplies in fp32 (mixed dtypes, and every low-precision dot under the
    interpreter, which holds bf16 as raw bits: kernels/launch.py)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tile_matmul(
    acc, a_ptr, b_ptr, rows, cols, mask_rows, mask_cols, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc (len(rows), len(cols)) fp32 + A[rows, :K] @ B[:K, cols], K walked in BLOCK_K steps (masked tails)."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=mask_rows[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & mask_cols[None, :], other=0.0)
        acc = dot(a, b, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def row_vector(ptr, cols, mask_cols):
    """(1, len(cols)) fp32 of a per-column vector (bias, scale), 0 past the mask: broadcasts over rows."""
    return tl.load(ptr + cols, mask=mask_cols, other=0.0).to(tl.float32)[None, :]


@triton.jit
def load_tile(ptr, rows, cols, mask_rows, mask_cols, stride_r, stride_c):
    """ptr[rows, cols] as an fp32 (len(rows), len(cols)) tile, 0 outside the bounds."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    return tl.load(ptrs, mask=mask_rows[:, None] & mask_cols[None, :], other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, value, rows, cols, mask_rows, mask_cols, stride_r, stride_c):
    """Store ``value`` (len(rows), len(cols)) into ptr[rows, cols] in ptr's dtype, masked to the bounds."""
    ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=mask_rows[:, None] & mask_cols[None, :])

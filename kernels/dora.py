"""DoRA's weight norm without the (out x in) product B A: a fused low-rank row norm.

    norm[o] = || W[o, :] + s * (B A)[o, :] ||_2        W (N, K), A (r, K), B (N, r)

PEFT forms lora_weight = B A (N x K, via an identity matmul) and W + s * lora_weight every step: two
dense (N x K) temporaries per DoRA layer. Here each program takes BLOCK_N rows, walks K in tiles,
forms the (BLOCK_N x BLOCK_K) tile of B A in registers (one small dot, r <= 256) and accumulates the
squared row sums: W is read once, nothing of shape (N, K) is written.
"""

import triton
import triton.language as tl


@triton.jit
def _lowrank_row_norm_kernel(
    # pointers: base weight, down and up projections, output norms (N,) fp32
    w_ptr, a_ptr, b_ptr, out_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    # scale s of the low-rank term
    scale,
    # meta-parameters
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    mask_r = rr < R
    rn64 = rn.to(tl.int64)
    # B's rows for this block stay in registers for the whole K walk (BLOCK_R <= 256).
    bt = tl.load(b_ptr + rn64[:, None] * stride_bn + rr[None, :] * stride_br,
                 mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    if UPCAST:
        bt = bt.to(tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < K
        at = tl.load(a_ptr + rr[:, None] * stride_ar + kk[None, :].to(tl.int64) * stride_ak,
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            at = at.to(tl.float32)
        ba = tl.dot(bt, at, input_precision=PRECISION)
        wt = tl.load(w_ptr + rn64[:, None] * stride_wn + kk[None, :].to(tl.int64) * stride_wk,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        v = wt + scale * ba
        sq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rn, tl.sqrt(sq), mask=mask_n)


def lowrank_row_norm(w, a, b, scale):
    """Row norms (N,) fp32 of w (N, K) + scale * b (N, r) @ a (r, K); any strides, nothing (N, K) formed."""
    import torch

    n, k = w.shape
    r = a.shape[0]
    out = torch.empty(n, device=w.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(r))
    on_gpu = w.is_cuda
    block_n, block_k = (64, 64) if on_gpu else (32, 32)
    upcast = a.dtype != b.dtype or not on_gpu or a.dtype == torch.float32
    precision = "tf32" if (on_gpu and torch.get_float32_matmul_precision() != "highest") else "ieee"
    _lowrank_row_norm_kernel[(triton.cdiv(n, block_n),)](
        w, a, b, out, n, k, r,
        w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(scale),
        UPCAST=upcast, PRECISION=precision, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=4 if block_r <= 64 else 8,
    )
    return out

"""DoRA's weight norm without the (out x in) product B A: a fused low-rank row norm.

    norm[o] = || W[o, :] + s * (B A)[o, :] ||_2        W (N, K), A (r, K), B (N, r)

PEFT forms lora_weight = B A (N x K, via an identity matmul) and W + s * lora_weight every step: two
dense (N x K) temporaries per DoRA layer. Here each program takes BLOCK_N rows, walks K in tiles,
forms the (BLOCK_N x BLOCK_K) tile of B A in registers (dots over rank tiles of up to 64) and
accumulates the squared row sums: W is read once, nothing of shape (N, K) is written.
"""

import torch
import triton
import triton.language as tl

from . import launch


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
    # meta-parameters: ONE_R_TILE: R <= BLOCK_R, B's rows then stay in registers for the whole K walk
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ONE_R_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    rn64 = rn.to(tl.int64)
    b_ptrs = b_ptr + rn64[:, None] * stride_bn + rr[None, :] * stride_br
    if ONE_R_TILE:
        bt = tl.load(b_ptrs, mask=mask_n[:, None] & (rr < R)[None, :], other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + rk).to(tl.int64)
        mask_k = kk < K
        ba = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if ONE_R_TILE:
            at = tl.load(a_ptr + rr[:, None] * stride_ar + kk[None, :] * stride_ak,
                         mask=(rr < R)[:, None] & mask_k[None, :], other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
            ba = tl.dot(bt, at, ba, input_precision=PRECISION)
        else:
            # Rank tiles: holding all of B's rows (BLOCK_N x 512 at rank 512) needed 270 KB of shared
            # memory in fp16 and spilled in fp32; re-reading a (BLOCK_N x BLOCK_R) slice of B per K tile
            # costs L2 traffic (B is N x r, small) instead.
            for r0 in range(0, R, BLOCK_R):
                mask_r = (r0 + rr) < R
                bt_r = tl.load(b_ptrs + r0 * stride_br, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                at = tl.load(a_ptr + (r0 + rr)[:, None] * stride_ar + kk[None, :] * stride_ak,
                             mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                if UPCAST:
                    bt_r = bt_r.to(tl.float32)
                    at = at.to(tl.float32)
                ba = tl.dot(bt_r, at, ba, input_precision=PRECISION)
        wt = tl.load(w_ptr + rn64[:, None] * stride_wn + kk[None, :] * stride_wk,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        v = wt + scale * ba
        sq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rn, tl.sqrt(sq), mask=mask_n)


def _configs(arch, named):
    # fp32 adapters: the (64 x BLOCK_R) B tile, the A tile and the B A tile are fp32 (sm_90, rank 64,
    # 4 warps: 1.4 KB/thread of spills): 8 warps (and rank tiles of 32, see lowrank_row_norm).
    fp32 = named["a_ptr"].element_size() == 4 or named["UPCAST"]
    # sm_80 / sm_89, fp32 adapters: one bf16-weight launch at rank 16 spilled 8 B (sm_80) / 16 B (sm_89) at
    # 80 registers with 64-wide K tiles (triton 3.6); 32-wide: 40-64 registers, clean in every launch there
    block_k = 32 if fp32 and arch.capability in (80, 89) else 64
    return [triton.Config(dict(BLOCK_N=64, BLOCK_K=block_k), num_warps=8 if fp32 else 4, num_stages=2)]


def _smem(c, named):
    kw = c.kwargs
    elem = launch.elem_bytes(named["a_ptr"], named["UPCAST"])
    return launch.pipeline_smem(c, (kw["BLOCK_N"], named["BLOCK_R"]), (named["BLOCK_R"], kw["BLOCK_K"]), elem=elem)


_ROW_NORM = launch.Kernel(_lowrank_row_norm_kernel, configs=_configs, smem=_smem, key=(),
                          interpret=dict(BLOCK_N=32, BLOCK_K=32))


def lowrank_row_norm(w, a, b, scale):
    """Row norms (N,) fp32 of w (N, K) + scale * b (N, r) @ a (r, K); any strides, nothing (N, K) formed."""
    n, k = w.shape
    r = a.shape[0]
    out = torch.empty(n, device=w.device, dtype=torch.float32)
    if n == 0:
        return out
    # Rank tiles of up to 64 (32 for fp32 adapters, see _configs): one tile (B kept in registers) for
    # r <= 64, the common LoRA ranks.
    max_r = 32 if a.element_size() == 4 or launch.upcast(a, b) else 64
    block_r = min(max_r, max(16, triton.next_power_of_2(r)))
    args = (w, a, b, out, n, k, r, w.stride(0), w.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            float(scale))
    meta = dict(UPCAST=launch.upcast(a, b), PRECISION=launch.precision(w), ONE_R_TILE=r <= block_r, BLOCK_R=block_r)
    _ROW_NORM.launch(lambda c: (triton.cdiv(n, c["BLOCK_N"]),), args, meta, like=w)
    return out


@launch.aot_examples
def _examples():
    """The norm per dtype pair (weight in the activation dtype, adapters in theirs) and rank."""
    n, k = 96, 256
    for act, adapter in launch.DTYPES:
        w = torch.empty(n, k, dtype=act)
        for r in launch.RANKS:
            lowrank_row_norm(w, torch.empty(r, k, dtype=adapter), torch.empty(n, r, dtype=adapter), 0.5)

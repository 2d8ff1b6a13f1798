"""Triton kernels for the input-scaled linear op ((IA)3 on feed-forward layers): y = (x * l) W^T + b.

``_scaled_linear_fwd_kernel``  y = ((x * l) in l's dtype, rounded to x's) @ W^T + b
    the scale is applied to each x tile as it is loaded: x * l is never written to memory.
``_scaled_linear_bwd_kernel``  g = dy @ W per (tokens, features) tile, then in the epilogue
    dx = g * l and the tile's partial dl = sum over its tokens of g * x (fp32, one row per token block,
    summed by torch: deterministic, no atomics).

What this saves over PEFT's unfused ops (estimate, never measured on a GPU): PEFT writes and reads x * l
(and, with fp32 l on a bf16 base, x's fp32 copy and the cast back) in the forward, and g * l, g * x and
the casts in the backward: about 4-10 passes over an (M, K) tensor per step that the kernels fold into
the GEMMs' loads and epilogues. E.g. a Llama-7B down_proj (M 8192, K 11008, N 4096) in bf16: the GEMM is
0.74 TFLOP, ~1 ms on an H200, and PEFT's passes with fp32 l are ~3.5 GB, ~0.8 ms at 4.3 TB/s.

Caution:
  * The rounding of x * l to x's dtype happens in the kernel, as PEFT's ``.to(previous_dtype)``; g is
    rounded to x's dtype before the products, as torch's mm output is. dl's per-tile sums are fp32 (PEFT
    sums g * x in l's dtype): with a bf16 l this is at most more precise.
  * Under TRITON_INTERPRET=1 ``tl.dot`` on bf16/fp16 returns garbage; UPCAST (set by the launcher on
    the interpreter) stages the dot operands in fp32 there.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import dot, grouped_tile_ids, row_vector, store_tile, tile_matmul, tile_range


@triton.jit
def _scaled_linear_fwd_kernel(
    # pointers: x (M, K), W read as W^T (K, N), output y (M, N), bias (N,), per-feature scale l (K,)
    x_ptr, w_ptr, y_ptr, bias_ptr, scale_ptr,
    # sizes
    M, N, K,
    # strides (W^T's: a GPT-2 Conv1D weight is W^T contiguous)
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
    # autotune key
    size_key,
    # meta-parameters
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm64, mask_m = tile_range(pid_m, BLOCK_M, M)
    rn64, mask_n = tile_range(pid_n, BLOCK_N, N)
    rk = tl.arange(0, BLOCK_K)
    # tiles.tile_matmul's loop, with the scale applied to each x tile as it is loaded
    x_ptrs = x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rk[:, None] * stride_wk + rn64[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        scale = tl.load(scale_ptr + k0 + rk, mask=kmask, other=0.0)
        # PEFT's (x.to(l.dtype) * l).to(x.dtype). The product of two fp16/bf16/fp32 values rounded from
        # fp32 to l's dtype is the correctly rounded product in l's dtype (fp16 x fp16 is exact in fp32),
        # and the interpreter cannot do arithmetic on bf16: multiply in fp32, then round as PEFT does.
        xl = x.to(scale_ptr.dtype.element_ty).to(tl.float32)
        xs = (xl * scale.to(tl.float32)[None, :]).to(scale_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        acc = dot(xs, w, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += row_vector(bias_ptr, rn64, mask_n)
    store_tile(y_ptr, acc, rm64, rn64, mask_m, mask_n, stride_ym, stride_yn)


@triton.jit
def _scaled_linear_bwd_kernel(
    # pointers: dy (M, N), W (N, K), x (M, K), scale l (K,), dx (M, K), dl partials (cdiv(M, BLOCK_M), K) fp32
    dy_ptr, w_ptr, x_ptr, scale_ptr, dx_ptr, dl_ptr,
    # sizes: the output tiles are (tokens M, features K); the reduction runs over N
    M, N, K,
    # strides
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_xm, stride_xk, stride_dxm, stride_dxk, stride_dlp,
    # autotune key
    size_key,
    # meta-parameters: BLOCK_N tiles the features K of the output, BLOCK_K the reduction over N
    NEED_DX: tl.constexpr, NEED_DL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = grouped_tile_ids(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rm64, mask_m = tile_range(pid_m, BLOCK_M, M)
    rk64, mask_k = tile_range(pid_k, BLOCK_N, K)
    acc = tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), dy_ptr, w_ptr, rm64, rk64, mask_m, mask_k, N,
                      stride_dym, stride_dyn, stride_wn, stride_wk, UPCAST, PRECISION, BLOCK_K)
    # g as torch's mm returns it (x's dtype), then cast to l's dtype, as PEFT's casts; products in fp32
    # (see the forward) rounded where PEFT rounds
    g = acc.to(dx_ptr.dtype.element_ty).to(scale_ptr.dtype.element_ty).to(tl.float32)
    # Written out rather than with tiles.store_tile / load_tile: the same math, but one shared mask here kept
    # sm_90 (triton 3.8) at 48 registers on 8 warps with a bf16 x and an fp32 l (60 with the helpers).
    tile = mask_m[:, None] & mask_k[None, :]
    if NEED_DX:
        rk = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        scale = tl.load(scale_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
        dx = (g * scale[None, :]).to(scale_ptr.dtype.element_ty).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + rm64[:, None] * stride_dxm + rk64[None, :] * stride_dxk, dx, mask=tile)
    if NEED_DL:
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk64[None, :] * stride_xk, mask=tile, other=0.0)
        part = tl.sum(g * x.to(scale_ptr.dtype.element_ty).to(tl.float32), axis=0)
        tl.store(dl_ptr + pid_m.to(tl.int64) * stride_dlp + rk64, part, mask=mask_k)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (kernels/launch.py holds the rules)
# ----------------------------------------------------------------------------------------------------

# BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps: Triton tutorial 03's matmul tiles (the LoRA
# kernels' list without the narrow-N tiles, which serve ranks; here N and K are model widths).
_TILES = [
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 3, 4),
]


# fp32-staged operands: of _TILES only 64 x 64 x 32 passes the register rule (_regs), so two lean tiles
# more give autotuning a choice.
_FP32_TILES = [(32, 64, 32, 3, 4), (64, 32, 32, 3, 4)]


def _configs(arch, named):
    fp32 = named["UPCAST"] or named["w_ptr"].element_size() == 4
    return launch.matmul_configs(_TILES + (_FP32_TILES if fp32 else []))


def _fixed(arch, named, fits):
    # 64 x 64 tiles, 3 stages: the LoRA kernels' fixed tile. fp32 operands on 8 warps (the LoRA forward
    # at this tile spilled 48 B/thread on 4 warps on sm_90 with fp32 staging; see kernels/lora.py), and
    # the backward with an fp32 l on a bf16 x too: its fp32 epilogue (g, x, l, dl partials) spilled
    # 8 B/thread on 4 warps on sm_80 and sm_89 (AOT check, triton 3.8).
    fp32 = named["UPCAST"] or named["w_ptr"].element_size() == 4 or \
        ("dl_ptr" in named and named["scale_ptr"].element_size() == 4)
    return triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=8 if fp32 else 4,
                         num_stages=3)


def _regs(c, named):
    # launch.TILE_REGS: one fp32 accumulator plus, for fp32-staged operands, 2 registers per value of the
    # K-step tile pair (the LoRA kernels' fitted rule, kernels/lora.py). AOT (triton 3.8, sm_80): fp32
    # 64 x 64 x 64 on 4 warps (32 + 128) spilled 16.6 KB, 128 x 64 x 32 (64 + 96) 80 B; fp16 / bf16
    # tiles up to 256 x 128 on 8 warps (128) spilled at most 128 B.
    kw = c.kwargs
    m, n, k = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    regs = launch.tile_regs(c, m, n)
    if named["UPCAST"] or named["w_ptr"].element_size() == 4:
        regs += 2 * launch.tile_regs(c, m * k + k * n, 1)
    return regs


def _smem(c, named):
    # num_stages buffers, not launch.pipeline_smem's num_stages - 1: the forward's scaled x tile is
    # staged once more. With - 1, three fp32 configs passed the rule and compiled over the limit
    # (AOT, triton 3.8: 128x128x32 s4 115,072 B and 64x64x64 s4 115,456 B > 101,376 B on sm_89;
    # 256x128x64 s3 262,656 B > 232,448 B on sm_90).
    kw = c.kwargs
    elem = launch.elem_bytes(named["w_ptr"], named["UPCAST"])
    return c.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem


_INTERPRET_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)

_FWD = launch.Kernel(_scaled_linear_fwd_kernel, configs=_configs, smem=_smem, regs=_regs, fixed=_fixed,
                     prune=launch.prune_to_sizes(BLOCK_M="M", BLOCK_N="N"), interpret=_INTERPRET_META)
# The backward's output tiles are (tokens M, features K): BLOCK_N tiles K (N is its reduction).
_BWD = launch.Kernel(_scaled_linear_bwd_kernel, configs=_configs, smem=_smem, regs=_regs, fixed=_fixed,
                     prune=launch.prune_to_sizes(BLOCK_M="M", BLOCK_N="K"), interpret=_INTERPRET_META,
                     restore=["dl_ptr"])  # a trial with a smaller BLOCK_M writes rows the chosen one would not


def scaled_linear_fwd(x, weight, bias, scale):
    """y (M, N) = ((x * l) rounded to x's dtype) @ W^T + b for x (M, K), W (N, K) (any strides), l (K,)."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    wt = weight.t()
    args = (x, wt, y, bias if bias is not None else y, scale, M, N, K,
            x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), y.stride(0), y.stride(1), launch.size_key(M, N, K))
    meta = dict(HAS_BIAS=bias is not None, UPCAST=launch.upcast(x, weight), PRECISION=launch.precision(x))
    _FWD.launch(launch.grouped_grid(M, N), args, meta, like=x)
    return y


def scaled_linear_bwd(dy, weight, x, scale, need_dx, need_dl):
    """(dx (M, K) in dy's dtype | None, dl (K,) in l's dtype | None) for dy (M, N), W (N, K), x (M, K)."""
    M, N = dy.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype) if need_dx else None
    if M == 0 or K == 0:
        return dx, torch.zeros_like(scale) if need_dl else None
    # one fp32 row of partial dl per token block; sized for the smallest BLOCK_M any config may pick
    blocks = triton.cdiv(M, 32 if not launch.on_gpu(dy) else min(t[0] for t in _TILES + _FP32_TILES))
    partial = torch.zeros((blocks, K), device=dy.device, dtype=torch.float32) if need_dl else dy
    out = dx if need_dx else dy
    xx = x if need_dl else dy
    args = (dy, weight, xx, scale, out, partial, M, N, K,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), xx.stride(0), xx.stride(1),
            out.stride(0), out.stride(1), partial.stride(0), launch.size_key(M, N, K))
    meta = dict(NEED_DX=bool(need_dx), NEED_DL=bool(need_dl), UPCAST=launch.upcast(dy, weight),
                PRECISION=launch.precision(dy))
    _BWD.launch(launch.grouped_grid(M, K), args, meta, like=dy)
    return dx, partial.sum(0).to(scale.dtype) if need_dl else None


@launch.aot_examples
def _examples():
    """The op's forward and backward per (activation, l) dtype pair, with and without bias / dl."""
    m, k, n = 64, 256, 192
    for act, vec in launch.DTYPES:
        x, w, scale = torch.empty(m, k, dtype=act), torch.empty(n, k, dtype=act), torch.empty(k, dtype=vec)
        scaled_linear_fwd(x, w, torch.empty(n, dtype=act), scale)
        scaled_linear_fwd(x, w.t().contiguous().t(), None, scale)  # Conv1D storage
        dy = torch.empty(m, n, dtype=act)
        scaled_linear_bwd(dy, w, x, scale, True, True)
        scaled_linear_bwd(dy, w, x, scale, True, False)

"""Triton kernels for the ladder merge of side tuning: one side-network rung in one pass over h.

    p = h W^T + b                      down-projection of a backbone hidden state, (M, D) -> (M, N)
    z = g * p + (1 - g) * side         gated ladder merge (side: the side network's state, g: a scalar)
    y = norm(z) * gamma (+ beta)       LayerNorm, or RMSNorm without beta, over the N side features

``_ladder_merge_fwd_kernel`` writes only y: p, z and the row statistics stay in registers.
``_ladder_merge_bwd_kernel`` recomputes them from (h, side) -- the only activations the op keeps; h is
a no-grad backbone output that the weight gradient needs anyway -- and writes dp = d loss / dp (for
dW = dp^T h, a separate split-K matmul from kernels/lora.py), dside, per-row dgate terms and partial
sums of db, dgamma, dbeta over fixed 16-row slices. Every config writes every slice (the layout does
not depend on BLOCK_M), so autotuning runs cannot leave stale partials behind.

Caution:
  * N (the side width, hidden / reduction factor) is held in one tile: N <= MAX_SIDE_WIDTH (512).
    Wider side networks run on the reference backend (tunefast/ops/side.py routes "auto" there). At
    N = 1024 the backward's (16 x 1024) fp32 tiles (p - side, zhat, dy, dz) do not fit the register file:
    every config the AOT check tried spilled (triton 3.8, sm_80 / sm_90: 16 or 32 warps, K tiles of 16 or
    32, 1 or 2 stages: 200-1,100 B/thread), so 1024 waits for a kernel that tiles N (two passes over
    column chunks for the row statistics).
  * Recomputing p in the backward reads h twice there (once for p, once for dW): at bf16, d = 4096,
    16k tokens that is 128 MB more traffic per rung (~30 us on an H200), bought for not keeping p.
  * Under TRITON_INTERPRET=1 ``tl.dot`` on bf16/fp16 returns garbage, so UPCAST is set there; on a GPU
    h and W of one dtype go to the tensor cores, mixed dtypes (bf16 h, fp32 side) are multiplied in fp32.
  * Configs, autotuning (a GPU only) and precision / upcast rules: kernels/launch.py; the interpreter
    always uses one small fixed config.
"""

import torch
import triton
import triton.language as tl

from .lora import dropout_matmul  # dW = dp^T h: a plain matmul with split-K over tokens
from . import launch
from .tiles import load_tile, row_vector, store_tile, tile_matmul, tile_range

MAX_SIDE_WIDTH = 512
PART_ROWS = 16  # rows per partial-sum slice in the backward (the smallest BLOCK_M)


@triton.jit
def _merge_and_normalize(
    h_ptr, w_ptr, b_ptr, s_ptr, g_ptr, M, D, N, eps,
    stride_hm, stride_hd, stride_wn, stride_wd, stride_sm, stride_sn,
    HAS_BIAS: tl.constexpr, HAS_SIDE: tl.constexpr, RMS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_N) tile of row block program_id(0): (rows, cols, row mask, col mask, p - side (or
    p without a side state), zhat, rstd), the last three fp32. W is read as W^T, a (BLOCK_D, BLOCK_N) tile."""
    rm64, mask_m = tile_range(tl.program_id(0), BLOCK_M, M)
    rn64, mask_n = tile_range(0, BLOCK_N, N)
    p = tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), h_ptr, w_ptr, rm64, rn64, mask_m, mask_n, D,
                    stride_hm, stride_hd, stride_wd, stride_wn, UPCAST, PRECISION, BLOCK_D)
    if HAS_BIAS:
        p += row_vector(b_ptr, rn64, mask_n)
    if HAS_SIDE:
        g = tl.load(g_ptr).to(tl.float32)
        side = load_tile(s_ptr, rm64, rn64, mask_m, mask_n, stride_sm, stride_sn)
        z = g * p + (1.0 - g) * side
        diff = p - side
    else:
        z = p
        diff = p
    z = tl.where(mask_n[None, :], z, 0.0)  # padding columns (N < BLOCK_N) must not enter the statistics
    if RMS:
        zc = z
    else:
        mean = tl.sum(z, axis=1) / N
        zc = tl.where(mask_n[None, :], z - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(zc * zc, axis=1) / N + eps)
    return rm64, rn64, mask_m, mask_n, diff, zc * rstd[:, None], rstd


@triton.jit
def _ladder_merge_fwd_kernel(
    # pointers: backbone hidden state, down-projection weight and bias, side state, gate (1 element),
    # norm weight and bias, output
    h_ptr, w_ptr, b_ptr, s_ptr, g_ptr, nw_ptr, nb_ptr, y_ptr,
    # sizes: M tokens, D backbone width, N side width
    M, D, N,
    # strides
    stride_hm, stride_hd, stride_wn, stride_wd, stride_sm, stride_sn, stride_ym, stride_yn,
    # norm epsilon, autotune key (log2 size buckets; the kernel ignores it)
    eps, size_key,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SIDE: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, RMS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rm64, rn64, mask_m, mask_n, _, zhat, _ = _merge_and_normalize(
        h_ptr, w_ptr, b_ptr, s_ptr, g_ptr, M, D, N, eps, stride_hm, stride_hd, stride_wn, stride_wd, stride_sm,
        stride_sn, HAS_BIAS, HAS_SIDE, RMS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    y = zhat * row_vector(nw_ptr, rn64, mask_n)
    if HAS_NORM_BIAS:
        y += row_vector(nb_ptr, rn64, mask_n)
    store_tile(y_ptr, y, rm64, rn64, mask_m, mask_n, stride_ym, stride_yn)


@triton.jit
def _ladder_merge_bwd_kernel(
    # pointers: output gradient; the forward's inputs; outputs: dp (M, N), dside (M, N), per-row
    # dgate terms (M,), partial sums (3, M / PART_ROWS, N) of [dbias, dnorm_weight, dnorm_bias]
    dy_ptr, h_ptr, w_ptr, b_ptr, s_ptr, g_ptr, nw_ptr, dp_ptr, ds_ptr, dg_ptr, part_ptr,
    # sizes: M tokens, D backbone width, N side width, S partial-sum slices
    M, D, N, S,
    # strides
    stride_dym, stride_dyn, stride_hm, stride_hd, stride_wn, stride_wd, stride_sm, stride_sn,
    stride_dpm, stride_dpn, stride_dsm, stride_dsn,
    # norm epsilon, autotune key
    eps, size_key,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_SIDE: tl.constexpr, RMS: tl.constexpr, NEED_DSIDE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, PART_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rm64, rn64, mask_m, mask_n, diff, zhat, rstd = _merge_and_normalize(
        h_ptr, w_ptr, b_ptr, s_ptr, g_ptr, M, D, N, eps, stride_hm, stride_hd, stride_wn, stride_wd, stride_sm,
        stride_sn, HAS_BIAS, HAS_SIDE, RMS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    # Rows past M and padding columns load dy = 0, so they add nothing to any sum below.
    dy = load_tile(dy_ptr, rm64, rn64, mask_m, mask_n, stride_dym, stride_dyn)
    dzhat = dy * row_vector(nw_ptr, rn64, mask_n)
    proj = tl.sum(dzhat * zhat, axis=1) / N
    if RMS:
        dz = (dzhat - zhat * proj[:, None]) * rstd[:, None]
    else:
        dz = (dzhat - tl.sum(dzhat, axis=1)[:, None] / N - zhat * proj[:, None]) * rstd[:, None]
    dz = tl.where(mask_n[None, :], dz, 0.0)
    if HAS_SIDE:
        g = tl.load(g_ptr).to(tl.float32)
        dp = g * dz
        tl.store(dg_ptr + rm64, tl.sum(dz * diff, axis=1), mask=mask_m)
        if NEED_DSIDE:
            store_tile(ds_ptr, (1.0 - g) * dz, rm64, rn64, mask_m, mask_n, stride_dsm, stride_dsn)
    else:
        dp = dz
    store_tile(dp_ptr, dp, rm64, rn64, mask_m, mask_n, stride_dpm, stride_dpn)

    # Column sums over 16-row slices, stored at slice index = row // PART_ROWS whatever BLOCK_M is.
    SLICES: tl.constexpr = BLOCK_M // PART_ROWS
    rs = tl.program_id(0) * SLICES + tl.arange(0, SLICES)
    part_ptrs = part_ptr + rs.to(tl.int64)[:, None] * N + rn64[None, :]
    part_mask = (rs < S)[:, None] & mask_n[None, :]
    tl.store(part_ptrs, _slice_sums(dp, SLICES, PART_ROWS, BLOCK_N), mask=part_mask)
    tl.store(part_ptrs + S * N, _slice_sums(dy * zhat, SLICES, PART_ROWS, BLOCK_N), mask=part_mask)
    tl.store(part_ptrs + 2 * S * N, _slice_sums(dy, SLICES, PART_ROWS, BLOCK_N), mask=part_mask)


@triton.jit
def _slice_sums(t, SLICES: tl.constexpr, PART_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.sum(tl.reshape(t, (SLICES, PART_ROWS, BLOCK_N)), axis=1)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (kernels/launch.py holds the rules)
# ----------------------------------------------------------------------------------------------------

# One small config for the CPU interpreter: every program costs ~ms there, so few, mid-size tiles.
# Shared by both kernels (the tests vary its BLOCK_M).
_INTERPRET_META = dict(BLOCK_M=32, BLOCK_D=32)

# Row tiles x reduction tiles for Ampere/Hopper; the side width N is one whole tile (not tuned). The
# narrow-BLOCK_D, few-stage tiles exist for wide side networks (N up to MAX_SIDE_WIDTH, see _configs).
_TILES = [  # BLOCK_M, BLOCK_D, num_warps, num_stages
    (16, 64, 4, 3), (16, 128, 4, 3), (16, 64, 8, 2), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3),
    (64, 32, 4, 4), (64, 128, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3),
    (16, 32, 4, 2), (16, 32, 8, 2), (16, 16, 4, 2), (16, 16, 4, 1), (32, 32, 4, 2),
]


def _elem(named):
    # Dot operands are staged in fp32 when upcast (N = 512, 16 rows, BLOCK_D = 64, 3 stages: 264 KiB).
    return launch.elem_bytes(named["h_ptr"], named["UPCAST"])


def _smem(c, named):
    bm, bd = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"]
    return launch.pipeline_smem(c, (bm, bd), (bd, named["BLOCK_N"]), elem=_elem(named))


def _configs_for(budget):
    def configs(arch, named):
        # Register budget in (BLOCK_M x BLOCK_N) fp32 elements: past 16k per program the forward spills
        # on 4 warps; the backward holds ~3x more live tiles.
        tiles = [triton.Config(dict(BLOCK_M=m, BLOCK_D=d), num_warps=w, num_stages=s) for m, d, w, s in _TILES]
        kept = [c for c in tiles if c.kwargs["BLOCK_M"] * named["BLOCK_N"] <= budget]
        if arch.capability >= 90:
            # Hopper: Triton allocated num_stages buffers, not _smem's num_stages - 1, for 52 of the 164
            # 3-stage forward compiles (AOT, triton 3.8: 64 x 128 on 8 warps at N = 256, fp16: 245,760 B
            # against 232,448 B); on sm_80 / sm_89 never more than num_stages - 1 (+ 33% at 2 stages).
            kept = [c for c in kept if _smem(c, named) * c.num_stages / max(c.num_stages - 1, 1) <= arch.smem]
        return kept or tiles[-5:-4]  # (16, 32, 4 warps, 2 stages): the smallest that still pipelines
    return configs


def _fixed_for(per_thread):
    def fixed(arch, named, fits):
        # The (BLOCK_M x N) fp32 tiles live in registers: 4 warps spill from N = 512 (sm_90: 300 B/thread
        # forward, 5-9 KB backward at N = 1024). Warps grow with the tile so that each thread holds at
        # most ``per_thread`` elements of one tile (the backward keeps ~3x more tiles live), and the
        # staged K tile shrinks to 32 (16 in fp32) wide from N = 256.
        n = named["BLOCK_N"]
        budget = per_thread // 2 if _elem(named) == 4 else per_thread  # fp32 h tiles: more live registers
        warps = min(16, max(4, 16 * n // (32 * budget)))  # 32 warps cap registers at 64 (65,536 / 1,024)
        if n < 256:
            first = fits[0]
            if per_thread <= 16 and n <= 16 and _elem(named) == 2:
                # the backward at N = 16, fp16 / bf16 h (seen with LayerNorm + side state): 16 x 64 h tiles on
                # 3 stages spilled 16 B at 48 regs on sm_90, triton 3.6; 16 x 32 (52) is clean in every AOT case
                first = triton.Config(dict(BLOCK_M=16, BLOCK_D=32), num_warps=4, num_stages=3)
            return first if first.num_warps >= warps else triton.Config(
                dict(first.kwargs), num_warps=warps, num_stages=first.num_stages)
        # bf16 h with fp32 weights at N = 256, 8 warps: 2 stages spilled 12 B/thread on sm_90, 1 stage was
        # clean on sm_80 / sm_90 (plain fp32 is the other way round: 80 B with 1 stage, none with 2); sm_89
        # is the other way round too (triton 3.8: RMSNorm launch 1 stage 80 registers + 12 B spilled,
        # 2 stages 96-100 registers, clean)
        fp32 = _elem(named) == 4
        stages = 1 if named["UPCAST"] and n <= 256 and arch.capability != 89 else 2
        return triton.Config(dict(BLOCK_M=16, BLOCK_D=16 if fp32 else 32), num_warps=warps, num_stages=stages)
    return fixed


def _regs_for(tiles):
    # launch.TILE_REGS: ``tiles`` live (BLOCK_M x N) fp32 tiles (the forward's accumulator and normalised
    # row, counted as 2; the backward's ~3) plus, for fp32-staged h / W, 2 registers per value of the
    # K-step tile pair. Fitted to AOT (triton 3.8, sm_80, every dtype pair and side width, 908 autotune
    # compiles): the 636 it keeps spilled in 0 cases; of the 272 it drops, 162 spilled (fp32 or
    # upcast operands only, up to 69 KB per thread: 64 x 64 on 4 warps at N = 256).
    def regs(c, named):
        bm, bd, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], named["BLOCK_N"]
        held = tiles * launch.tile_regs(c, bm, n)
        if _elem(named) == 4:
            held += 2 * launch.tile_regs(c, bm * bd + bd * n, 1)
        return held
    return regs


_PRUNE = launch.prune_to_sizes(BLOCK_M="M")  # row tiles far taller than M only waste work
_FWD = launch.Kernel(_ladder_merge_fwd_kernel, configs=_configs_for(16384), smem=_smem, regs=_regs_for(2),
                     prune=_PRUNE, fixed=_fixed_for(32), interpret=_INTERPRET_META)
_BWD = launch.Kernel(_ladder_merge_bwd_kernel, configs=_configs_for(8192), smem=_smem, regs=_regs_for(3),
                     prune=_PRUNE, fixed=_fixed_for(16), interpret=_INTERPRET_META)


def _grid(M):
    return lambda c: (triton.cdiv(M, c["BLOCK_M"]),)


def block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def ladder_merge_forward(h, weight, bias, side, gate, norm_weight, norm_bias, eps, rms):
    """y (M, N) in weight's dtype from h (M, D), weight (N, D), bias (N) | None, side (M, N) | None,
    gate (1,) fp32 (ignored without side), norm_weight (N), norm_bias (N) | None. Any strides."""
    M, D = h.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=h.device, dtype=weight.dtype)
    dummy = y  # placeholder pointer for absent operands; never dereferenced (constexpr-guarded)
    s = side if side is not None else dummy
    args = (
        h, weight, bias if bias is not None else dummy, s, gate if side is not None else dummy,
        norm_weight, norm_bias if norm_bias is not None else dummy, y,
        M, D, N,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        y.stride(0), y.stride(1),
        float(eps), launch.size_key(M, D, N),
    )
    meta = dict(
        HAS_BIAS=bias is not None, HAS_SIDE=side is not None, HAS_NORM_BIAS=norm_bias is not None, RMS=rms,
        UPCAST=launch.upcast(h, weight), PRECISION=launch.precision(h), BLOCK_N=block_n(N),
    )
    _FWD.launch(_grid(M), args, meta, like=h)
    return y


def ladder_merge_backward(dy, h, weight, bias, side, gate, norm_weight, eps, rms, need_dside, need_dweight):
    """(dweight | None, dbias, dside | None, dgate (1,) fp32 | None, dnorm_weight, dnorm_bias) for the
    forward above; dy (M, N). Gradients come in their parameter's dtype (dgate: fp32)."""
    M, D = h.shape
    N = weight.shape[0]
    dev, wdt = h.device, weight.dtype
    has_side = side is not None
    dp = torch.empty((M, N), device=dev, dtype=wdt)
    ds = torch.empty((M, N), device=dev, dtype=side.dtype) if has_side and need_dside else dp
    dg = torch.empty((M,), device=dev, dtype=torch.float32) if has_side else dp
    S = triton.cdiv(M, PART_ROWS)
    part = torch.empty((3, S, N), device=dev, dtype=torch.float32)
    s = side if has_side else dp
    args = (
        dy, h, weight, bias if bias is not None else dp, s, gate if has_side else dp, norm_weight, dp, ds, dg, part,
        M, D, N, S,
        dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
        s.stride(0), s.stride(1), dp.stride(0), dp.stride(1), ds.stride(0), ds.stride(1),
        float(eps), launch.size_key(M, D, N),
    )
    meta = dict(
        HAS_BIAS=bias is not None, HAS_SIDE=has_side, RMS=rms, NEED_DSIDE=has_side and need_dside,
        UPCAST=launch.upcast(h, weight), PRECISION=launch.precision(h), PART_ROWS=PART_ROWS, BLOCK_N=block_n(N),
    )
    _BWD.launch(_grid(M), args, meta, like=h)
    sums = part.sum(1)  # (3, N) fp32: dbias, dnorm_weight, dnorm_bias
    dweight = dropout_matmul(dp.t(), h, wdt) if need_dweight else None  # (N, M) @ (M, D), split over M
    return (
        dweight,
        sums[0].to(bias.dtype, copy=True) if bias is not None else None,  # copies: views of sums may not alias
        ds if has_side and need_dside else None,
        dg.sum().reshape(1) if has_side else None,
        sums[1].to(norm_weight.dtype, copy=True),
        sums[2].to(norm_weight.dtype, copy=True),
    )



@launch.aot_examples
def _examples():
    """Forward and backward per dtype pair and side width class (16 .. MAX_SIDE_WIDTH), LayerNorm with a
    side state and RMSNorm without one (the two extremes of live tiles)."""
    m, d = 64, 256
    for act, param in launch.DTYPES:
        h = torch.empty(m, d, dtype=act)
        for n in (16, 64, 128, 256, 512, MAX_SIDE_WIDTH):
            w, vec = torch.empty(n, d, dtype=param), torch.empty(n, dtype=param)
            side, gate, dy = torch.empty(m, n, dtype=param), torch.empty(1), torch.empty(m, n, dtype=param)
            ladder_merge_forward(h, w, vec, side, gate, vec, vec, 1e-5, False)
            ladder_merge_forward(h, w, None, None, gate, vec, None, 1e-5, True)
            ladder_merge_backward(dy, h, w, vec, side, gate, vec, 1e-5, False, True, False)
            ladder_merge_backward(dy, h, w, None, None, gate, vec, 1e-5, True, False, False)

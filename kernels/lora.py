"""Triton kernels for the fused LoRA linear op: y = x W^T (+ b) + sum_i s_i * (drop_i(x) A_i^T) B_i^T.

Two kernels serve the whole forward and backward (tunefast/ops/lora.py composes them):

``_lora_linear_kernel``  C = [C +] A @ B + bias + lr_scale * keep(C) * (L @ U)
    forward:   y  = x @ W^T + b + s * xa @ B^T              (the up-projection fused as an epilogue)
    backward:  dx = dy @ W + keep(x) / (1-p) * (dxa @ A)    (dropout mask regenerated on dx's tile)
``_dropout_matmul_kernel``  C = scale * op(A) @ op(B), op = dropout on the one operand that is x
    forward:   xa  = drop(x) @ A^T            backward: dA = dxa^T @ drop(x)   (split over tokens)
               dxa = s * dy @ B                         dB = s * dy^T @ xa     (split over tokens)

Neither kernel reads or writes a mask: keep decisions are recomputed from (seed, element offset) by
``philox_keep``. Operands of different dtypes (bf16 x with fp32 adapters, PEFT's default
``autocast_adapter_dtype``) are multiplied in fp32, as PEFT does; every accumulator is fp32.

Caution:
  * Under TRITON_INTERPRET=1 ``tl.dot`` on bf16/fp16 returns garbage (bf16 is held as raw bits), so
    launchers set UPCAST for the interpreter; on a GPU low-precision operands go to the tensor cores.
  * fp32 dots follow torch's matmul precision setting ("ieee" unless TF32 is allowed), so fp32
    parity with PEFT holds on a GPU too.
  * Configs per architecture and dtype, autotuning (a GPU only) and the precision / upcast rules are
    kernels/launch.py's; the interpreter always uses one small fixed config.
"""

import torch
import triton
import triton.language as tl

from .dropout import philox_keep
from . import launch
from .tiles import dot, grouped_tile_ids, load_tile, row_vector, store_tile, tile_matmul, tile_range


@triton.jit
def _lora_linear_kernel(
    # pointers: main operands, output, bias, low-rank operands, dropout seed (int64, device),
    # per-column scale of (main + low-rank) before the bias (DoRA's magnitude / weight norm)
    a_ptr, b_ptr, c_ptr, bias_ptr, l_ptr, u_ptr, seed_ptr, col_scale_ptr,
    # sizes: C is (M, N), main reduction K, low-rank reduction R; x_row0: row of C's first row in the
    # x whose dropout offsets apply (a row segment of a larger x, as in routed multi-adapter batches)
    M, N, K, R, x_row0,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_ur, stride_un,
    # dropout threshold (int64, see kernels/dropout.py), the low-rank term's scale, autotune key
    threshold, lr_scale, size_key,
    # meta-parameters
    HAS_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACCUMULATE: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr, UPCAST_MAIN: tl.constexpr, UPCAST_LR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm64, mask_m = tile_range(pid_m, BLOCK_M, M)
    rn64, mask_n = tile_range(pid_n, BLOCK_N, N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_MAIN:
        acc = tile_matmul(acc, a_ptr, b_ptr, rm64, rn64, mask_m, mask_n, K, stride_am, stride_ak, stride_bk, stride_bn,
                          UPCAST_MAIN, PRECISION, BLOCK_K)
    # Low-rank epilogue: R <= a few hundred, so this loop is short next to the main one.
    lr = tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), l_ptr, u_ptr, rm64, rn64, mask_m, mask_n, R,
                     stride_lm, stride_lr, stride_ur, stride_un, UPCAST_LR, PRECISION, BLOCK_R)
    lr = lr * lr_scale
    if DROPOUT:
        # C's (row, col) is x's (token, feature): the same offsets the forward drew with.
        keep = philox_keep(tl.load(seed_ptr), (x_row0 + rm64[:, None]) * N + rn64[None, :], threshold)
        lr = tl.where(keep, lr, 0.0)
    acc += lr
    if HAS_COL_SCALE:
        acc = acc * row_vector(col_scale_ptr, rn64, mask_n)
    if HAS_BIAS:
        acc += row_vector(bias_ptr, rn64, mask_n)
    if ACCUMULATE:
        acc += load_tile(c_ptr, rm64, rn64, mask_m, mask_n, stride_cm, stride_cn)
    store_tile(c_ptr, acc, rm64, rn64, mask_m, mask_n, stride_cm, stride_cn)


@triton.jit
def _dropout_matmul_kernel(
    # pointers: operands, output (or split-K partials), dropout seed (int64, device)
    a_ptr, b_ptr, c_ptr, seed_ptr,
    # sizes: C is (M, N), reduction K; x_cols is the feature count of the dropped x, x_row0 the row
    # of this x slice's first token in the x whose dropout offsets apply
    M, N, K, x_cols, x_row0,
    # strides (stride_cs: between split-K partial outputs)
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    # dropout threshold (int64), output scale, K range of one split, autotune key
    threshold, scale, K_PER_SPLIT, size_key,
    # meta-parameters: DROP_A: A is x (tokens, features); DROP_B: B is x (tokens, features)
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm64, mask_m = tile_range(pid_m, BLOCK_M, M)
    rn64, mask_n = tile_range(pid_n, BLOCK_N, N)
    rk = tl.arange(0, BLOCK_K)
    k_begin = pid_k * K_PER_SPLIT
    k_end = min(K, k_begin + K_PER_SPLIT)
    if DROP_A or DROP_B:
        seed = tl.load(seed_ptr)
    # tiles.tile_matmul's loop over one split's K range, with the keep mask drawn on the x operand's tile
    a_ptrs = a_ptr + rm64[:, None] * stride_am + (k_begin + rk)[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + (k_begin + rk)[:, None].to(tl.int64) * stride_bk + rn64[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = (k0 + rk).to(tl.int64)
        kmask = kk < k_end
        a = tl.load(a_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        if DROP_A:
            a = tl.where(philox_keep(seed, (x_row0 + rm64[:, None]) * x_cols + kk[None, :], threshold), a, 0.0)
        if DROP_B:
            b = tl.where(philox_keep(seed, (x_row0 + kk[:, None]) * x_cols + rn64[None, :], threshold), b, 0.0)
        acc = dot(a, b, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    store_tile(c_ptr + pid_k.to(tl.int64) * stride_cs, acc * scale, rm64, rn64, mask_m, mask_n, stride_cm, stride_cn)


# ----------------------------------------------------------------------------------------------------
# Launch configuration (kernels/launch.py holds the rules)
# ----------------------------------------------------------------------------------------------------

# Matmul tiles for Ampere/Hopper (Triton tutorial 03's list plus narrow-N tiles for ranks 8-64):
# BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps.
_TILES = [
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (128, 32, 64, 4, 4),
    (64, 32, 64, 5, 2), (128, 16, 64, 4, 4), (64, 16, 128, 4, 4), (32, 64, 64, 5, 2),
]


# Lean tiles for launches that stage fp32 operands (fp32, or bf16 with fp32 adapters): with fp32 x and W
# none of _TILES passes the register rule, so these give autotuning a choice (32 x 64 x 32 on 4 warps is
# the fixed fp32 config, clean in every AOT case).
_FP32_TILES = [(32, 64, 32, 3, 4), (64, 32, 32, 3, 4), (64, 64, 32, 3, 8), (32, 32, 64, 3, 4)]


def _configs(arch, named):
    return launch.matmul_configs(_TILES + (_FP32_TILES if _fp32_operands(named) else []))


def _fixed(arch, named, fits):
    # A mid-size tile that fits every shape here (narrow rank outputs are masked), 3 stages. Operands
    # staged in fp32 (fp32, or bf16 x with fp32 adapters) spill with 64 x 64 tiles: sm_90 12-20 B/thread
    # for the fused kernel on 4 or 8 warps, 8-28 B for the epilogue-only launch on sm_80 / sm_89; 32 x 64
    # on 4 warps was clean for every fp32 launch on sm_80 / sm_89 / sm_90 (triton 3.8's ptxas). The dropout
    # matmul draws its mask inside the K loop (Philox words live per element of the x tile): there the
    # clean tiles were 64 x 64 x 16 for fp32 operands and 32 x 64 x 32 for upcast bf16 ones.
    fp32 = _fp32_operands(named)
    if not fp32:  # fp16 / bf16: on 4 warps the epilogue-only launch (rank <= 16) spilled 12 B on sm_80
        return triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=8, num_stages=3)
    if named.get("DROP_A") or named.get("DROP_B"):
        m, k = (32, 32) if named["UPCAST"] else (64, 16)
        return triton.Config(dict(BLOCK_M=m, BLOCK_N=64, BLOCK_K=k, GROUP_M=8), num_warps=4, num_stages=3)
    if "DROP_A" in named:  # the dropout matmul without a mask (dB, dxa): 64 x 64 on 8 warps was clean
        return triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=8, num_stages=3)
    if not named["HAS_MAIN"] and named["BLOCK_R"] <= 16:
        # the epilogue-only launch at rank <= 16: 32 x 64 spilled 8 B on sm_90, 64 x 32 did not (and 64 x 32
        # spilled 16 B at rank tiles of 32, where 32 x 64 did not). 2 stages: the rank loop is one step here,
        # and with 3 the bf16 / fp32 accumulate launch spilled 8 B at 96 registers on sm_90 with triton 3.6
        # (2 stages: 76 registers, clean)
        return triton.Config(dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8), num_warps=4, num_stages=2)
    return triton.Config(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), num_warps=4, num_stages=3)


def _fp32_operands(named):
    """Whether a launch stages fp32 operands (fp32 tensors, or bf16 ones upcast next to fp32 adapters)."""
    return bool(named.get("UPCAST", False) or named.get("UPCAST_MAIN", False) or named.get("UPCAST_LR", False)
                or named["a_ptr"].element_size() == 4 or named.get("l_ptr", named["a_ptr"]).element_size() == 4)


def _operand_regs(c, fp32_tiles):
    # fp32 operand tiles go through registers for the dot (fp16 / bf16 ones did not add to the fit below):
    # 2 registers per value of the larger K-step tile pair staged in fp32, e.g. 32 x 64 x 64 on 2 warps: 2 x 96.
    return 2 * max([launch.tile_regs(c, values, 1) for values in fp32_tiles] or [0])


# Register estimates (launch.TILE_REGS), fitted to 1,248 AOT compiles of these two kernels' autotune
# candidates (triton 3.8, sm_80 / sm_90, fp16 / bf16 / fp32 / bf16 with fp32 adapters): of the candidates
# they keep, 43 of 917 spilled, at most 232 B per thread; of those they drop, 274 of 331 spilled, up to
# 63 KB. Full matrix after (sm_80 / 89 / 90): autotune spills at most 52 B in the fused forward (54 of
# 2,601 candidates), 1.1 KB in the dropout matmul (was 63 KB and 23 KB).
def _linear_regs(c, named):
    # fp32 (BLOCK_M x BLOCK_N) tiles live at once: the main accumulator, the low-rank one, and with dropout
    # the int64 offsets and Philox words of the keep mask (2 tiles more); at least two (one accumulator of
    # more than 64 registers per thread spilled in the epilogue-only launch too).
    kw = c.kwargs
    m, n, k, r = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], named["BLOCK_R"]
    tiles = max(2, 1 + bool(named["HAS_MAIN"]) + 2 * bool(named["DROPOUT"]))
    fp32 = []  # the K-step tile pairs staged in fp32: the main one (fp32 x or W) and / or the low-rank one
    if named["HAS_MAIN"] and (named["UPCAST_MAIN"] or named["a_ptr"].element_size() == 4):
        fp32.append(m * k + k * n)
    if named["UPCAST_LR"] or named["l_ptr"].element_size() == 4:
        fp32.append(m * r + r * n)
    return tiles * launch.tile_regs(c, m, n) + _operand_regs(c, fp32)


def _matmul_regs(c, named):
    # One accumulator (counted twice, as above) plus, with a keep mask, the masked x tile's offsets and
    # Philox words, 2 per value (sm_80 fp16: 128 x 32 x 64 on 4 warps, 64 x values per thread, spilled
    # 1.3 KB; 128 x 64 x 32, 32 per thread, held 162 registers, clean).
    kw = c.kwargs
    m, n, k = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    acc = launch.tile_regs(c, m, n)
    regs = 2 * acc
    if named["DROP_A"] or named["DROP_B"]:
        regs = max(regs, acc + 2 * launch.tile_regs(c, m * k if named["DROP_A"] else k * n, 1))
    return regs + _operand_regs(c, [m * k + k * n] if _fp32_operands(named) else [])


def _linear_smem(c, named):
    kw = c.kwargs
    main = launch.elem_bytes(named["a_ptr"], named["UPCAST_MAIN"])
    low = launch.elem_bytes(named["l_ptr"], named["UPCAST_LR"])
    stages = launch.pipeline_smem(c, (kw["BLOCK_M"], kw["BLOCK_K"]), (kw["BLOCK_K"], kw["BLOCK_N"]), elem=main)
    lowrank = launch.pipeline_smem(c, (kw["BLOCK_M"], named["BLOCK_R"]), (named["BLOCK_R"], kw["BLOCK_N"]), elem=low)
    return max(stages if named["HAS_MAIN"] else 0, lowrank)


def _matmul_smem(c, named):
    kw = c.kwargs
    elem = launch.elem_bytes(named["a_ptr"], named["UPCAST"])
    a, b = (kw["BLOCK_M"], kw["BLOCK_K"]), (kw["BLOCK_K"], kw["BLOCK_N"])
    smem = launch.pipeline_smem(c, a, b, elem=elem)
    if named["DROP_A"] or named["DROP_B"]:
        # With a keep mask the compiled kernels use more than the two pipelined operands (AOT, sm_89, fp16,
        # 3 stages: 128x256x64 114,688 B against 98,304 estimated without this term, over the 101,376 B limit;
        # 64x64x32 28,672 against 16,384): count the masked x tile once per stage more and an output tile.
        x_rows, x_cols = a if named["DROP_A"] else b
        smem += c.num_stages * x_rows * x_cols * elem + kw["BLOCK_M"] * kw["BLOCK_N"] * named["c_ptr"].element_size()
    return smem


_PRUNE = launch.prune_to_sizes(BLOCK_M="M", BLOCK_N="N")

# One small config for the CPU interpreter: every program costs ~ms there, so few, mid-size tiles.
_INTERPRET_META = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)

_LINEAR = launch.Kernel(
    _lora_linear_kernel, configs=_configs, smem=_linear_smem, regs=_linear_regs, fixed=_fixed, prune=_PRUNE,
    interpret=_INTERPRET_META, restore=["c_ptr"],  # ACCUMULATE reads c: every trial starts from the same c
)
_MATMUL = launch.Kernel(
    _dropout_matmul_kernel, configs=_configs, smem=_matmul_smem, regs=_matmul_regs, fixed=_fixed, prune=_PRUNE,
    interpret=_INTERPRET_META,
)


def _block_r(rank: int, fp32: bool) -> int:
    # fp32 low-rank tiles (fp32, or bf16 x with fp32 adapters) of 64 spill on sm_80 next to the main
    # accumulator (400-650 B/thread with 8 warps): 32 there.
    return min(32 if fp32 else 64, max(16, triton.next_power_of_2(rank)))


def lora_linear(out, a, b, bias, l, u, lr_scale, seed=None, threshold=0, *, has_main=True, accumulate=False,
                col_scale=None, x_row0=0):
    """out (M, N) [+]= g * (a (M, K) @ b (K, N) + lr_scale * keep * (l (M, R) @ u (R, N))) + bias (N).

    ``seed`` (int64 tensor, 1 element, on out's device) with ``threshold`` > 0 applies the dropout
    keep mask of an (M, N) x (rows offset by ``x_row0``) to the low-rank term. ``col_scale`` g (N,)
    defaults to 1. ``a``/``b`` are ignored when ``has_main`` is False; R may be 0.
    All tensors may be strided views; ``out`` is written in place and returned.
    """
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    R = l.shape[1]
    K = a.shape[1] if has_main else 0
    dropout = seed is not None and threshold > 0
    dummy = out  # placeholder pointer for absent operands; never dereferenced (constexpr-guarded)
    a_, b_ = (a, b) if has_main else (dummy, dummy)
    args = (
        a_, b_, out, bias if bias is not None else dummy, l, u, seed if dropout else dummy,
        col_scale if col_scale is not None else dummy,
        M, N, K, R, int(x_row0),
        a_.stride(0), a_.stride(1), b_.stride(0), b_.stride(1), out.stride(0), out.stride(1),
        l.stride(0), l.stride(1), u.stride(0), u.stride(1),
        int(threshold), float(lr_scale), launch.size_key(M, N, K, R),
    )
    meta = dict(
        HAS_MAIN=has_main, HAS_BIAS=bias is not None, DROPOUT=dropout, ACCUMULATE=accumulate,
        HAS_COL_SCALE=col_scale is not None,
        UPCAST_MAIN=launch.upcast(a_, b_) if has_main else False, UPCAST_LR=launch.upcast(l, u),
        PRECISION=launch.precision(out),
        BLOCK_R=_block_r(R, l.element_size() == 4 or u.element_size() == 4 or out.element_size() == 4),
    )
    _LINEAR.launch(launch.grouped_grid(M, N), args, meta, like=out)
    return out


def _split_k(M, N, K, like, split_k):
    if split_k is not None:
        return max(1, min(split_k, triton.cdiv(K, 16)))
    if not launch.on_gpu(like) or K < 4096:
        return 1
    # Reductions over tokens (dA: r x in, dB: out x r) have few output tiles but long K: split K
    # until there are ~2 tiles per SM. 64x64 tiles assumed for the estimate.
    sms = launch.sm_count(like)
    tiles = triton.cdiv(M, 64) * triton.cdiv(N, 64)
    return max(1, min(2 * sms // max(tiles, 1), K // 2048, 64))


def dropout_matmul(a, b, out_dtype, scale=1.0, seed=None, threshold=0, *, drop=None, split_k=None, x_row0=0):
    """Return scale * op(a) (M, K) @ op(b) (K, N) as a new (M, N) tensor of ``out_dtype``.

    ``drop`` is None, "a" or "b": which operand is x (tokens, features) and gets the dropout keep
    mask of ``seed``/``threshold``; its first token is row ``x_row0`` of the x the mask is drawn for.
    Reductions may be split over K (deterministic: partials summed in fp32 by torch, no atomics).
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), device=a.device, dtype=out_dtype)
    dropout = drop is not None and seed is not None and threshold > 0
    splits = _split_k(M, N, K, a, split_k)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), 256) * 256 if splits > 1 else max(K, 1)
    splits = triton.cdiv(K, k_per_split) if K > 0 else 1
    if splits > 1:
        out = torch.empty((splits, M, N), device=a.device, dtype=torch.float32)
    else:
        out = torch.empty((1, M, N), device=a.device, dtype=out_dtype)
    x_cols = K if drop == "a" else N
    args = (
        a, b, out, seed if dropout else out,
        M, N, K, x_cols, int(x_row0),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        int(threshold), float(scale), k_per_split, launch.size_key(M, N, K),
    )
    meta = dict(
        DROP_A=dropout and drop == "a", DROP_B=dropout and drop == "b",
        UPCAST=launch.upcast(a, b), PRECISION=launch.precision(a),
    )
    _MATMUL.launch(launch.grouped_grid(M, N, splits), args, meta, like=a)
    return out.sum(0).to(out_dtype) if splits > 1 else out[0]


@launch.aot_examples
def _examples():
    """The launches of tunefast/ops/lora.py's forward and backward (with dropout) per dtype pair and rank, and
    those of the ops built on the same launchers: DoRA's column scale, routed row segments, bottleneck
    adapters (tunefast/ops/adapter.py)."""
    m, k, n = 64, 256, 192
    seed = torch.zeros(1, dtype=torch.int64)
    for act, adapter in launch.DTYPES:
        x, w = torch.empty(m, k, dtype=act), torch.empty(n, k, dtype=act)
        for r in launch.RANKS:
            a, b = torch.empty(r, k, dtype=adapter), torch.empty(n, r, dtype=adapter)
            xa = dropout_matmul(x, a.t(), adapter, 2.0, seed, 1 << 30, drop="a")
            y = torch.empty(m, n, dtype=act)
            lora_linear(y, x, w.t(), torch.empty(n, dtype=act), xa, b.t(), 0.5)
            lora_linear(y, x, w.t(), None, xa, b.t(), 0.5, has_main=False, accumulate=True)  # second adapter
            dy = torch.empty(m, n, dtype=act)
            dropout_matmul(dy.t(), xa, adapter, 0.5)  # dB
            dxa = dropout_matmul(dy, b, adapter, 0.5)
            dropout_matmul(dxa.t(), x, adapter, 2.0, seed, 1 << 30, drop="b")  # dA
            lora_linear(torch.empty(m, k, dtype=act), dy, w, None, dxa, a, 2.0, seed, 1 << 30)  # dx
            # DoRA: the fused forward with the magnitude / weight-norm column scale
            lora_linear(y, x, w.t(), None, xa, b.t(), 0.5, col_scale=torch.empty(n, dtype=torch.float32))
            # routed (mixed-adapter) batches: row segments past row 0 of x (dropout offsets shifted)
            dropout_matmul(x[17:], a.t(), adapter, 2.0, seed, 1 << 30, drop="a", x_row0=17)
            lora_linear(torch.empty(m - 17, k, dtype=act), dy[17:], w, None, dxa[17:], a, 2.0, seed, 1 << 30,
                        x_row0=17)
            # bottleneck adapters (tunefast/ops/adapter.py): up-projection with its bias as the epilogue-only
            # launch, fp32 dh from activation-dtype operands, dx from the pre-activation gradient
            h = torch.empty(m, r, dtype=act)
            lora_linear(y, None, None, torch.empty(n, dtype=adapter), h, b.t(), 0.5, has_main=False)
            dropout_matmul(dy, b, torch.float32, 0.5)
            lora_linear(torch.empty(m, k, dtype=act), None, None, None, h, a, 2.0, seed, 1 << 30, has_main=False)
        # routed batches' base-only segment: the main product with an empty low-rank term (R = 0)
        empty = torch.empty(m, 0, dtype=act)
        lora_linear(torch.empty(m, n, dtype=act), x, w.t(), torch.empty(n, dtype=act), empty, empty.new_empty(0, n),
                    0.0)

"""Triton dequantisation of bitsandbytes weights: nf4 / fp4 (optionally with double-quantised absmax)
and int8 row-scaled (``Linear8bitLt``). The formats are defined in tunefast/reference/quant.py.

``dequant_tile`` returns the float32 values of any (BLOCK_N, BLOCK_K) tile of the (N, K) weight from
the packed bytes: nibble unpack, 16-entry code lookup, absmax scaling (absmax itself looked up in the
256-entry code and rescaled under double quantisation). It is a ``@triton.jit`` helper, so a matmul can
call it on its B tile inside the K loop (dequantise in registers, no dense weight in memory); today
``_dequantize_kernel`` writes the tiles to a dense (N, K) buffer that the fused LoRA kernels read.

Cost of that buffer (bf16, N = K = 4096), estimated, never measured on a GPU: 8 MiB read, 32 MiB
written, then read by the GEMM: ~72 MiB of traffic, ~17 us at ~4.3 TB/s, per dequantisation, two per
training step (forward; dx in backward), against ~0.17 ms for one 4096-token bf16 GEMM at ~790
TFLOP/s (~10 %) or ~22 us for a 512-token one (~75 %); plus a 32 MiB transient allocation.

Caution:
  * Bit-exact with bitsandbytes needs the absmax of double quantisation computed as a float32
    product, then a float32 sum, as bitsandbytes does in two torch ops: a fused multiply-add rounds
    once and differs in the last bit. The launcher passes ``enable_fp_fusion=False`` on the GPU.
  * The code tables are read by gathers (16 and 256 entries, L1-resident); indices are int64.
  * The Triton interpreter casts float32 to bfloat16 by truncation (Triton 3.8, even with
    fp_downcast_rounding="rtne"); bitsandbytes and the GPU round to nearest even. Under the
    interpreter (SOFT_RNE) the kernel rounds with integer ops first, so the cast is exact.
"""

import torch
import triton
import triton.language as tl

from . import launch

FORMATS = {"nf4": 0, "fp4": 0, "int8": 1}  # FMT constexpr: 0 = 4-bit packed nibbles, 1 = int8 rows
# ROUND1 / ROUND2 constexprs: round the float32 values to fp16 (1) or bf16 (2) before the output cast
_ROUND = {None: 0, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def dequant_tile(
    # pointers: packed data, absmax (float32, or uint8 under double quant), 16-value code,
    # double quant: 256-value absmax code, float32 scale per absmax block, float32 offset (1 element)
    q_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr,
    # row and column indices (int64, 1-D), the tile's mask, in_features K, int8 scale (1/127)
    rn, rk, mask, K, int8_scale,
    # meta-parameters: format, double quant, elements per absmax block, absmax bytes per scale
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
):
    """float32 W[rn, rk] as a (len(rn), len(rk)) tile; masked-off elements are 0."""
    if FMT == 1:
        cb = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0)
        scale = tl.load(absmax_ptr + rn) * int8_scale  # rn must be in bounds (callers clamp it)
        return cb.to(tl.float32) * scale[:, None]
    idx = rn[:, None] * K + rk[None, :]
    byte = tl.load(q_ptr + (idx >> 1), mask=mask, other=0)
    nibble = tl.where((idx & 1) == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble)  # nibble < 16: always in bounds
    block = idx // BLOCKSIZE
    if NESTED:
        qabs = tl.load(absmax_ptr + block, mask=mask, other=0)
        scale = tl.load(absmax_scale_ptr + block // ABSMAX_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(absmax_code_ptr + qabs) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * absmax


@triton.jit
def _round_bf16(x, SOFT_RNE: tl.constexpr):
    """float32 x rounded to the nearest bfloat16 (ties to even), still as float32."""
    if SOFT_RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite x only (weights are)
        return bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _round_to(x, ROUND: tl.constexpr, SOFT_RNE: tl.constexpr):
    if ROUND == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        x = _round_bf16(x, SOFT_RNE)
    return x


@triton.jit
def _dequantize_kernel(
    # pointers: output (N, K), then the format's pieces (see dequant_tile)
    out_ptr, q_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr,
    # sizes
    N, K,
    # strides of the output
    stride_on, stride_ok,
    # int8 scale (1/127 as float32)
    int8_scale,
    # meta-parameters
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, ABSMAX_BLOCKSIZE: tl.constexpr,
    ROUND1: tl.constexpr, ROUND2: tl.constexpr, SOFT_RNE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    rn_safe = tl.where(rn < N, rn, 0)  # int8 scales are loaded per row: keep row indices in bounds
    w = dequant_tile(
        q_ptr, absmax_ptr, code_ptr, absmax_code_ptr, absmax_scale_ptr, offset_ptr,
        rn_safe, rk, mask, K, int8_scale, FMT, NESTED, BLOCKSIZE, ABSMAX_BLOCKSIZE,
    )
    w = _round_to(w, ROUND1, SOFT_RNE)
    w = _round_to(w, ROUND2, SOFT_RNE)
    if SOFT_RNE and out_ptr.dtype.element_ty == tl.bfloat16:
        w = _round_bf16(w, SOFT_RNE)  # the interpreter's cast below truncates
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :] * stride_ok, w.to(out_ptr.dtype.element_ty), mask=mask)


def _smem(c, named):
    return 0  # no dots, no pipelined loops, no reductions: registers only


# Interpreter: each program costs ~ms on CPU, so few large tiles. GPU: 32 x 128 tiles (4 KiB of
# output in bf16 per program), enough programs to fill the SMs for any layer of >= 1M elements; on sm_89
# 8 warps (triton 3.6: the fp32 nf4 launch rounded through bf16 spilled 8 B at 96 registers on 4 warps,
# 58 registers and clean on 8).
# enable_fp_fusion=False: see Caution (bit-exact double-quant absmax). No autotuning: memory-bound.
_DEQUANTIZE = launch.Kernel(
    _dequantize_kernel,
    configs=lambda arch, named: [
        triton.Config(dict(BLOCK_N=32, BLOCK_K=128), num_warps=8 if arch.capability == 89 else 4)],
    smem=_smem, key=(), interpret=dict(BLOCK_N=64, BLOCK_K=128), options=dict(enable_fp_fusion=False),
)


def dequantize(
    q, absmax, code, quant_type, shape, blocksize=0, absmax_code=None, absmax_scale=None, absmax_blocksize=0,
    offset=None, *, dtype, round_through=(), out=None,
):
    """Dense (N, K) weight of ``dtype`` from a bitsandbytes format (arguments as in
    tunefast.reference.quant.QuantWeight; ``code``: the 16-value float32 code of a 4-bit format, None
    for int8; ``q`` may be any storage dtype for 4-bit, read as bytes). ``round_through``: up to two
    dtypes the float32 values are rounded to, in order, before ``dtype``. ``out``: an (N, K) buffer.
    """
    n, k = shape
    if out is None:
        out = torch.empty((n, k), device=q.device, dtype=dtype)
    if n == 0 or k == 0:
        return out
    fmt = FORMATS[quant_type]
    nested = absmax_code is not None
    if fmt == 0 and q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    if len(round_through) > 2:
        raise ValueError(f"round_through takes at most two dtypes, got {round_through}")
    rounds = [_ROUND[d] for d in round_through] + [0, 0]
    dummy = absmax
    args = (
        out, q, absmax, code if fmt == 0 else dummy,
        absmax_code if nested else dummy, absmax_scale if nested else dummy, offset if nested else dummy,
        n, k, out.stride(0), out.stride(1), 1.0 / 127.0,
    )
    meta = dict(
        FMT=fmt, NESTED=nested, BLOCKSIZE=max(int(blocksize), 1), ABSMAX_BLOCKSIZE=max(int(absmax_blocksize), 1),
        ROUND1=rounds[0], ROUND2=rounds[1], SOFT_RNE=not launch.on_gpu(q),
    )
    _DEQUANTIZE.launch(lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(k, c["BLOCK_K"])), args, meta, like=q)
    return out


@launch.aot_examples
def _examples():
    """nf4 / fp4 with and without double quantisation, and int8, into each compute dtype."""
    n, k, blocksize = 64, 256, 64
    code, code256 = torch.empty(16), torch.empty(256)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for nested in (False, True):
            absmax = torch.empty(n * k // blocksize, dtype=torch.uint8 if nested else torch.float32)
            extra = (code256, torch.empty(n * k // blocksize // 256 + 1), 256, torch.empty(1)) if nested else ()
            dequantize(torch.empty(n * k // 2, dtype=torch.uint8), absmax, code, "nf4", (n, k), blocksize, *extra,
                       dtype=dtype, round_through=(torch.bfloat16,))
        dequantize(torch.empty(n, k, dtype=torch.int8), torch.empty(n), None, "int8", (n, k), dtype=dtype)

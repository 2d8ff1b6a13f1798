"""bitsandbytes weight formats in plain PyTorch: dequantisation (the oracle and CPU path of the QLoRA op)
and quantisation (to build test and benchmark weights where bitsandbytes is not installed).

Formats, named as in bitsandbytes' ``QuantState`` (``Linear4bit``) and ``Int8Params`` (``Linear8bitLt``):

  "nf4" / "fp4"  data: uint8, ceil(N*K / 2) bytes (bitsandbytes stores them as (n, 1)); element i of the
                 row-major (N, K) weight is the high nibble of byte i // 2 when i is even, else the low
                 one. W[i] = CODE[nibble] * absmax[i // blocksize], a float32 product, then rounded
                 to the output dtype (so a bf16 weight is rounded once, from float32).
  double quant   (``compress_statistics=True``) absmax is uint8 as well, itself blockwise-quantised:
                 absmax[b] = absmax_code[absmax_q[b]] * absmax_scale[b // absmax_blocksize] + offset,
                 a float32 product and then a float32 sum (two roundings, never a fused multiply-add).
  "int8"         data: int8 CB (N, K); absmax: float32 SCB (N,), the row absmax of the fp16 weight:
                 W = CB * (SCB * (1 / 127)) in float32, then rounded to the output dtype (bitsandbytes'
                 weight-dequantising matmul, ``MatMul8bitFp``, and the dx of ``MatMul8bitLt``).

Every formula above is bitsandbytes' own (backends/default/ops.py, autograd/_functions.py); the tests
check this file bit for bit against ``bitsandbytes.functional.dequantize_4bit``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts

# The 16 values of each 4-bit code: the float32 numbers of bitsandbytes' get_4bit_type, except that fp4
# nibble 0b1000 (sign bit set, magnitude 0) is -0.0. bitsandbytes' CUDA kernel and, from 0.49/0.50, its
# CPU C kernel decode it as -0.0 (sign * 0); its get_4bit_type table and pure-PyTorch backend hold +0.0
# (Python's ``-0`` is the integer 0). The two are equal as numbers and differ only in the sign bit,
# so ``code()`` follows whatever the installed bitsandbytes decodes on that device (see _bnb_code).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5, 0.1666666716337204,
    0.25, -0.0, -0.0052083334885537624, -0.6666666865348816, -1.0, -0.3333333432674408, -0.5,
    -0.1666666716337204, -0.25,
)
INT8_SCALE = 1.0 / 127.0


@dataclass(frozen=True)
class QuantWeight:
    """A frozen quantised (N, K) base weight, as the pieces bitsandbytes keeps.

    data:             uint8 packed nibbles (any shape, ceil(N*K/2) bytes; other storage dtypes are
                      reinterpreted as bytes, as bitsandbytes does), or int8 CB (N, K) for "int8"
    absmax:           float32 per block (4-bit), uint8 per block with double quant, float32 SCB (N,)
    quant_type:       "nf4", "fp4" or "int8"
    shape:            (N, K) = (out_features, in_features)
    blocksize:        elements per absmax block (4-bit only)
    absmax_code:      double quant: the 256-value float32 code of the absmax bytes (``state2.code``)
    absmax_scale:     double quant: float32 absmax of each block of absmax bytes (``state2.absmax``)
    absmax_blocksize: double quant: absmax bytes per such block (``state2.blocksize``, 256)
    offset:           double quant: float32 scalar tensor added to every dequantised absmax
    dtype:            the dtype the weight had when quantised (``QuantState.dtype``): bitsandbytes'
                      4-bit backward dequantises to it before casting to the gradient's dtype. None
                      for "int8", whose backward dequantises straight to the input's dtype.
    """

    data: torch.Tensor
    absmax: torch.Tensor
    quant_type: str
    shape: tuple[int, int]
    blocksize: int = 0
    absmax_code: Optional[torch.Tensor] = None
    absmax_scale: Optional[torch.Tensor] = None
    absmax_blocksize: int = 0
    offset: Optional[torch.Tensor] = None
    dtype: Optional[torch.dtype] = None

    @property
    def nested(self) -> bool:
        return self.absmax_code is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "QuantWeight":
        """The same weight with every tensor on ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("data", "absmax", "absmax_code", "absmax_scale", "offset")
                 if getattr(self, f) is not None}
        return dataclasses.replace(self, **moved)

    def describe(self) -> str:
        """e.g. "nf4, double-quant, blocksize 64" or "int8 (row-scaled)"."""
        if self.quant_type == "int8":
            return "int8 (row-scaled)"
        return f"{self.quant_type}{', double-quant' if self.nested else ''}, blocksize {self.blocksize}"


def _bnb_code(quant_type: str, device: torch.device) -> torch.Tensor | None:
    """The 16 values the installed bitsandbytes decodes for nibbles 0..15 on ``device`` (absmax 1), or
    None where bitsandbytes is missing or cannot dequantise there. One 64-value call, once per device."""
    try:
        import bitsandbytes.functional as bnbF
        from bitsandbytes.functional import QuantState
    except Exception:  # not installed, or a build that fails to load: the fixed table stands
        return None
    nibbles = torch.arange(16, dtype=torch.uint8)
    packed = ((nibbles << 4) | nibbles).repeat(2).unsqueeze(1).to(device)  # 32 bytes = 64 values
    state = QuantState(absmax=torch.ones(1, device=device), shape=torch.Size((1, 64)), blocksize=64,
                       code=bnbF.get_4bit_type(quant_type, device=device), quant_type=quant_type, dtype=torch.float32)
    try:
        values = bnbF.dequantize_4bit(packed, state).reshape(-1)[:32:2].float().contiguous()
    except Exception:  # e.g. no kernel for this device in this bitsandbytes build
        return None
    return values


@functools.cache
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    table = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32, device=device)
    probed = _bnb_code(quant_type, device)
    if probed is None:
        return table
    if not torch.equal(probed.to(device), table):  # == ignores the sign of zero; values must agree
        raise RuntimeError(
            f"the installed bitsandbytes decodes {quant_type} as {probed.tolist()}, not bitsandbytes' published "
            f"code {table.tolist()}: this bitsandbytes version is not supported (see README, QLoRA)"
        )
    return probed.to(device)  # the installed bitsandbytes' signs of zero, bit for bit


def code(quant_type: str, device="cpu") -> torch.Tensor:
    """The 16-value float32 code of "nf4" or "fp4" on ``device``, with the signs of zero the installed
    bitsandbytes decodes on that device (cached: do not modify)."""
    return _code(quant_type, torch.device(device))


def packed_bytes(qw: QuantWeight) -> torch.Tensor:
    """The 4-bit data as a flat uint8 tensor (a view)."""
    data = qw.data if qw.data.dtype == torch.uint8 else qw.data.view(torch.uint8)
    return data.reshape(-1)


def dequantize_absmax(qw: QuantWeight) -> torch.Tensor:
    """float32 absmax per block, undoing double quantisation when present."""
    if not qw.nested:
        return qw.absmax.float()
    q = qw.absmax.reshape(-1).long()
    blocks = torch.arange(q.numel(), device=q.device) // qw.absmax_blocksize
    return qw.absmax_code[q] * qw.absmax_scale[blocks] + qw.offset  # product, then sum: no FMA


def dequantize(
    qw: QuantWeight, dtype: torch.dtype, round_through: Sequence[Optional[torch.dtype]] = ()
) -> torch.Tensor:
    """The dense (N, K) weight in ``dtype``, the float32 values first rounded to each dtype of
    ``round_through`` in turn: bitsandbytes dequantises to its compute dtype (which autocast may cast
    again), and its 4-bit backward to ``QuantState.dtype`` before casting to the gradient's dtype."""
    n, k = qw.shape
    if qw.quant_type == "int8":
        w = qw.data.reshape(n, k).float() * (qw.absmax.float() * INT8_SCALE)[:, None]
    else:
        # One gather per byte from a table of (code[high nibble], code[low nibble]) pairs, each pair
        # viewed as one 8-byte item: a 1-D take (0.5 ms for 1M weights on one core, vs 0.85 ms for
        # index_select of 2-float rows).
        pairs = byte_table(qw.quant_type, qw.device).view(torch.float64).view(-1)
        values = torch.take(pairs, packed_bytes(qw).long()).view(torch.float32)[: n * k]
        absmax, bs = dequantize_absmax(qw), qw.blocksize
        full = (n * k // bs) * bs
        w = torch.empty(n * k, dtype=torch.float32, device=qw.device)
        torch.mul(values[:full].view(-1, bs), absmax[: full // bs, None], out=w[:full].view(-1, bs))
        if full < n * k:
            torch.mul(values[full:], absmax[-1], out=w[full:])
        w = w.view(n, k)
    for d in round_through:
        if d is not None:
            w = w.to(d)
    return w.to(dtype)


@functools.cache
def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    c = code(quant_type, device)
    b = torch.arange(256, device=device)
    return torch.stack((c[b >> 4], c[b & 0xF]), dim=1)


def byte_table(quant_type: str, device="cpu") -> torch.Tensor:
    """(256, 2) float32: the two code values each byte of packed 4-bit data holds (cached)."""
    return _byte_table(quant_type, torch.device(device))


# ----------------------------------------------------------------------------------------------------
# Quantisation: bitsandbytes' default (pure PyTorch) backend, so that the op can be tested and
# benchmarked on machines without bitsandbytes. Tests check the results against bitsandbytes' own.
# ----------------------------------------------------------------------------------------------------


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map()``): the code of absmax bytes."""
    data, max_exp, non_sign_bits = [], 7, 7
    for i in range(max_exp):
        bounds = torch.linspace(0.1, 1, 2 ** (i + non_sign_bits - max_exp) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, flat / absmax clamped to [-1, 1]); a short last block is its own block."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1)[0]
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    scaled = scaled.reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> QuantWeight:
    """Quantise an (N, K) float weight as ``bitsandbytes.functional.quantize_4bit`` does (uint8 storage)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize}")
    cd = code(quant_type, w.device)
    order = torch.argsort(cd)
    bounds = (cd[order[:-1]] + cd[order[1:]]) / 2
    absmax, scaled = _blockwise_absmax(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order[torch.bucketize(scaled, bounds, out_int32=True)].to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    common = dict(quant_type=quant_type, shape=tuple(w.shape), blocksize=blocksize, dtype=w.dtype)
    if not double_quant:
        return QuantWeight(packed, absmax, **common)
    offset = absmax.mean()
    dyn = dynamic_map().to(w.device)
    scale, scaled2 = _blockwise_absmax(absmax - offset, 256)
    qabs = torch.bucketize(scaled2, (dyn[:-1] + dyn[1:]) / 2, out_int32=True).to(torch.uint8)
    return QuantWeight(packed, qabs, absmax_code=dyn, absmax_scale=scale, absmax_blocksize=256, offset=offset, **common)


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    """Quantise an (N, K) weight as ``Int8Params`` does: row-wise absmax of the fp16 weight, CB int8."""
    w16 = w.to(torch.float16)
    scb = w16.abs().max(dim=1).values.float()
    cb = torch.round(w16 * (127.0 / scb[:, None])).to(torch.int8)
    return QuantWeight(cb, scb, "int8", tuple(w.shape))

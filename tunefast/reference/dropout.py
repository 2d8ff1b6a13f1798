"""Counter-based dropout: the one definition of which elements a tunefast dropout keeps.

The fused LoRA op never stores a dropout mask. It draws a 64-bit seed per adapter per forward call
and regenerates the mask whenever it needs it (forward, backward, recompute under checkpointing).
Three implementations must draw the very same mask bit for bit:

  * ``kernels/dropout.py``     Triton, inside the fused kernels (GPU, or CPU under TRITON_INTERPRET=1)
  * ``csrc/dropout_cpu.cpp``   C++ (OpenMP), the fast CPU path of the reference op
  * this file                  plain PyTorch (int64 arithmetic), the oracle and the fallback when the
                               native module is not built

Definition (Philox-4x32 with 10 rounds, Salmon et al. 2011, as in cuRAND and Triton's ``tl.randint``):

  offset  of element (i, j) of x viewed as a 2-D (M, K) matrix: o = i * K + j
  key     k0 = seed & 0xFFFFFFFF,  k1 = seed >> 32             (seed: non-negative int64)
  counter q = o >> 2:  c0 = q & 0xFFFFFFFF, c1 = q >> 32, c2 = c3 = 0
  round   (c0, c1, c2, c3) <- (hi(B*c2) ^ c1 ^ k0, lo(B*c2), hi(A*c0) ^ c3 ^ k1, lo(A*c0))
          k0 += 0x9E3779B9, k1 += 0xBB67AE85                      (all mod 2**32)
          with A = 0xD2511F53, B = 0xCD9E8D57
  draw    u = word (o & 3) of (c0, c1, c2, c3) after 10 rounds (uint32)

One Philox evaluation serves four consecutive elements (all four output words are used, as cuRAND
does): on a CPU the draw is the cost of a dropout mask, and this makes it 4x cheaper.
  keep    u >= threshold(p), threshold(p) = min(floor(p * 2**32), 2**32)
  scale   kept elements are multiplied by 1 / (1 - p)  (0 when p == 1: everything dropped)

The keep decision compares integers, so no float rounding can make the implementations disagree.
"""

from __future__ import annotations

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def keep_threshold(p: float) -> int:
    """Smallest uint32 draw that keeps an element when the drop probability is ``p`` (0 <= p <= 1)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1], got {p}")
    return min(int(p * 4294967296.0), 4294967296)


def keep_scale(p: float) -> float:
    """Factor applied to kept elements: 1 / (1 - p), or 0 when p == 1 (everything is dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 (no int64 overflow)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_block(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four uint32 output words (held in int64), shape (*counters.shape, 4), of Philox-4x32-10."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    counters = counters.to(torch.int64)
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_draw(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """uint32 draws (held in int64) for int64 element ``offsets`` of any shape, on their device."""
    offsets = offsets.to(torch.int64)
    words = philox_block(seed, offsets >> 2)
    return torch.gather(words, -1, (offsets & 3).unsqueeze(-1)).squeeze(-1)


def keep_mask(seed: int, rows: int, cols: int, p: float, device=None, row_start: int = 0) -> torch.Tensor:
    """Boolean keep mask of shape (rows, cols) for rows ``row_start ..`` of an (M, cols) matrix."""
    thr = keep_threshold(p)
    if thr == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    r = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int64, device=device)
    return philox_draw(seed, r[:, None] * cols + c[None, :]) >= thr


def dropout(x2d: torch.Tensor, seed: int, p: float, row_start: int = 0) -> torch.Tensor:
    """``x2d`` (M, K) with the counter-based mask applied and kept elements scaled by 1/(1-p).

    ``row_start``: x2d's first row is row ``row_start`` of the matrix the mask is drawn for.
    """
    if p == 0.0:
        return x2d
    m = keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device, row_start=row_start)
    return x2d * m.to(x2d.dtype) * keep_scale(p)

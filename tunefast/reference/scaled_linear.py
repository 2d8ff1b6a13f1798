"""Plain-PyTorch math of the input-scaled linear op ((IA)3 on feed-forward layers): the CPU path and
the test oracle.

    y = ((x * l) W^T + b),  x * l computed in l's dtype and rounded back to x's dtype

Shapes (M tokens = product of x's leading dims, K = in features, N = out features):
  x2d (M, K), weight W (N, K) (any strides: a GPT-2 Conv1D weight passes its (K, N) storage transposed),
  bias b (N,) or None, scale l (K,).

The dtype rule is PEFT's ``ia3.Linear`` feed-forward branch, step for step: x is cast to l's dtype,
multiplied, cast back to x's dtype, then the base linear runs in x's dtype. With a bf16 base and an
fp32 l (PEFT's default ``autocast_adapter_dtype``) that is one fp32 product rounded to bf16.

Backward, with g = dy W (M, K) in x's dtype and gc = g in l's dtype:
  dl = sum_t gc * x   (in l's dtype; no division, so an entry of l equal to 0 has a finite gradient)
  dx = gc * l         (rounded to x's dtype)
  db = sum_t dy
Nothing but x is needed from the forward (x * l is recomputed from x where it is needed: it is not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """y2d (M, N) in x's dtype."""
    scaled = (x2d.to(scale.dtype) * scale).to(x2d.dtype)
    return F.linear(scaled, weight, bias)


def backward(dy2d, x2d, weight, scale, need_dx: bool, need_dscale: bool, need_dbias: bool):
    """(dx (M, K) | None, dl (K,) | None, db (N,) | None); ``x2d`` is only read when ``need_dscale``."""
    dx = dscale = dbias = None
    if need_dbias:
        dbias = dy2d.sum(0)
    if not (need_dx or need_dscale):
        return dx, dscale, dbias
    g = (dy2d @ weight).to(scale.dtype)  # (M, K): the base linear's input gradient, then PEFT's cast back
    if need_dscale:
        dscale = (g * x2d.to(scale.dtype)).sum(0)
    if need_dx:
        dx = (g * scale).to(dy2d.dtype)
    return dx, dscale, dbias

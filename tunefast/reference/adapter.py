"""Plain-PyTorch math of the fused adapter op: the CPU path and the test oracle.

    y = base + s * (act(drop(x) A^T + a) B^T + b)

Shapes (M tokens = product of x's leading dims, K = in features, N = out features, r = bottleneck):
  x2d (M, K), base2d (M, N) or None, down_w A (r, K), down_b a (r,) or None, up_w B (N, r),
  up_b b (N,) or None. ``pre`` = drop(x) A^T + a (M, r) is what backward keeps besides x: the activation
  and its derivative are recomputed from it, act(pre) is never kept.

Dropout is counter-based (reference/dropout.py): the mask of x is redrawn from one int64 seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dropout as rd
from .lora import apply_dropout, keep_mask

ACTIVATIONS = ("relu", "gelu", "silu", "identity")


def activation(pre: torch.Tensor, name: str) -> torch.Tensor:
    """act(pre), computed in fp32 for half-precision inputs and returned in pre's dtype."""
    p = pre.float()
    if name == "relu":
        h = F.relu(p)
    elif name == "gelu":  # exact (erf) GELU, as nn.GELU()
        h = F.gelu(p)
    elif name == "silu":
        h = F.silu(p)
    elif name == "identity":
        h = p
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return h.to(pre.dtype)


def activation_grad(pre: torch.Tensor, name: str) -> torch.Tensor:
    """d act / d pre at ``pre``, in fp32 (multiplied into the fp32 dh by the callers)."""
    p = pre.float()
    if name == "relu":
        return (p > 0).float()
    if name == "gelu":  # d/dx x Phi(x) = Phi(x) + x phi(x)
        return 0.5 * (1.0 + torch.erf(p * (1.0 / math.sqrt(2.0)))) + p * torch.exp(-0.5 * p * p) / math.sqrt(2 * math.pi)
    if name == "silu":  # sig(x) (1 + x (1 - sig(x)))
        sig = torch.sigmoid(p)
        return sig * (1.0 + p * (1.0 - sig))
    if name == "identity":
        return torch.ones_like(p)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def forward(x2d, base2d, down_w, down_b, up_w, up_b, scale, act, p, seed):
    """Return (y2d (M, N), pre (M, r))."""
    pre = apply_dropout(x2d, seed, p) @ down_w.t()
    if down_b is not None:
        pre = pre + down_b
    h = activation(pre, act)
    y = F.linear(h, up_w, up_b)
    y = y * scale if scale != 1.0 else y
    return (y if base2d is None else base2d + y), pre


def backward(dy2d, x2d, down_w, up_w, pre, scale, act, p, seed, need_dx, need_down, need_up):
    """Gradients (dx (M, K) | None, dA (r, K) | None, da (r,) | None, dB (N, r) | None, db (N,) | None).

    dbase is dy itself (the caller returns it). dh = s dy B; dpre = dh * act'(pre) (fp32, O(M r)).
    """
    dx = da_w = da_b = db_w = db_b = None
    if need_up:
        h = activation(pre, act)
        db_w = (dy2d.t() @ h).mul_(scale)
        db_b = dy2d.float().sum(0).mul_(scale).to(dy2d.dtype)
    if not (need_dx or need_down):
        return dx, da_w, da_b, db_w, db_b
    dpre = ((dy2d @ up_w).float().mul_(scale) * activation_grad(pre, act)).to(pre.dtype)
    if need_down:
        da_b = dpre.float().sum(0).to(pre.dtype)
        if p > 0.0 and need_dx:  # both need the mask: draw it once
            mask = keep_mask(x2d.shape, seed, p, x2d.device).to(x2d.dtype) * rd.keep_scale(p)
            return (dpre @ down_w) * mask, dpre.t() @ (x2d * mask), da_b, db_w, db_b
        da_w = dpre.t() @ apply_dropout(x2d, seed, p)
    if need_dx:
        dx = apply_dropout(dpre @ down_w, seed, p)
    return dx, da_w, da_b, db_w, db_b

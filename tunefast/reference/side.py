"""Plain-PyTorch math of the side-tuning ops: the CPU path and the test oracle.

Shapes (M tokens, D backbone width, N = D // reduction_factor side width, V vocabulary):

Ladder merge (one side-network rung; Triton version in kernels/side.py)
    h (M, D) no-grad backbone hidden state, weight (N, D), bias (N,) | None, side (M, N) | None,
    gate (1,) fp32, norm_weight (N,), norm_bias (N,) | None (LayerNorm only)
    y = norm(g * (h W^T + b) + (1 - g) * side) * norm_weight (+ norm_bias)      (side None: z = p)
  The backward recomputes p, z and the row statistics from (h, side) instead of keeping them.
  Everything is computed in fp32 and rounded once, to weight's dtype, as the kernel does.

LM-head loss (the causal-LM head of a side network): not here. tunefast.ops.side.side_lm_loss chains
  the fused LM-head loss (tunefast/reference/linear_cross_entropy.py and its Triton kernel) into the
  up-projection; this module keeps only the label shift it shares with the side heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _recompute(h2d, weight, bias, side, gate, eps, rms):
    """(p - side (p without a side state), zhat, rstd), fp32."""
    p = F.linear(h2d.float(), weight.float(), bias.float() if bias is not None else None)
    if side is not None:
        g = gate.float()
        sf = side.float()
        z, diff = g * p + (1.0 - g) * sf, p - sf
    else:
        z = diff = p
    zc = z if rms else z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.square().mean(-1, keepdim=True) + eps)
    return diff, zc * rstd, rstd


def merge_forward(h2d, weight, bias, side, gate, norm_weight, norm_bias, eps, rms):
    """y (M, N) in weight's dtype."""
    _, zhat, _ = _recompute(h2d, weight, bias, side, gate, eps, rms)
    y = zhat * norm_weight.float()
    if norm_bias is not None:
        y = y + norm_bias.float()
    return y.to(weight.dtype)


def merge_backward(dy, h2d, weight, bias, side, gate, norm_weight, eps, rms, need_dside, need_dweight):
    """(dweight | None, dbias | None, dside | None, dgate (1,) fp32 | None, dnorm_weight, dnorm_bias)."""
    diff, zhat, rstd = _recompute(h2d, weight, bias, side, gate, eps, rms)
    dy = dy.float()
    dzhat = dy * norm_weight.float()
    proj = (dzhat * zhat).mean(-1, keepdim=True)
    dz = dzhat - zhat * proj if rms else dzhat - dzhat.mean(-1, keepdim=True) - zhat * proj
    dz = dz * rstd
    has_side = side is not None
    g = gate.float() if has_side else None
    dp = g * dz if has_side else dz
    dweight = (dp.to(weight.dtype).float().t() @ h2d.float()).to(weight.dtype) if need_dweight else None
    return (
        dweight,
        dp.sum(0).to(bias.dtype) if bias is not None else None,
        ((1.0 - g) * dz).to(side.dtype) if has_side and need_dside else None,
        (dz * diff).sum().reshape(1) if has_side else None,
        (dy * zhat).sum(0).to(norm_weight.dtype),
        dy.sum(0).to(norm_weight.dtype),
    )


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM shift: position t is scored on labels[t + 1]; the last on nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]

"""Plain-PyTorch math of the side-tuning ops: the CPU path and the test oracle.

Shapes (M tokens, D backbone width, N = D // reduction_factor side width, V vocabulary):

Ladder merge (one side-network rung; Triton version in kernels/side.py)
    h (M, D) no-grad backbone hidden state, weight (N, D), bias (N,) | None, side (M, N) | None,
    gate (1,) fp32, norm_weight (N,), norm_bias (N,) | None (LayerNorm only)
    y = norm(g * (h W^T + b) + (1 - g) * side) * norm_weight (+ norm_bias)      (side None: z = p)
  The backward recomputes p, z and the row statistics from (h, side) instead of keeping them.
  Everything is computed in fp32 and rounded once, to weight's dtype, as the kernel does.

LM-head loss (the causal-LM head of a side network)
    s (M, N) side output, up_weight (D, N), up_bias (D,) | None, h_last (M, D) the backbone's
    last hidden state, lm_weight (V, D) / lm_bias (V,) | None the frozen LM head, targets (M,) int64
    loss_sum = sum_{t: targets[t] != -100} CE(logits_t, targets[t]),
    logits = (h_last + s up_weight^T + up_bias) lm_weight^T + lm_bias
  computed over row chunks, with the gradients for s and the up-projection formed in the same pass,
  so that no (M, V) logits and no (M, D) hidden state are kept for backward. Dtypes follow the
  unfused module chain: x = h_last + up(s) in their promoted dtype, logits in the LM head's dtype,
  then fp32 for the softmax, as Hugging Face's loss does.
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


def lm_loss_and_grads(s, up_weight, up_bias, h_last, lm_weight, lm_bias, targets, chunk_rows, need_ds, need_dup):
    """(loss_sum 0-d fp32, ds (M, N) | None, dup_weight (D, N) | None, dup_bias (D,) | None).

    The gradients are those of loss_sum (unscaled). Transient memory: one (chunk_rows, V) fp32
    block of logits, turned into the softmax in place.
    """
    M = s.shape[0]
    dev = s.device
    loss = torch.zeros((), device=dev, dtype=torch.float32)
    ds = torch.empty_like(s) if need_ds else None
    dw = torch.zeros(up_weight.shape, device=dev, dtype=torch.float32) if need_dup else None
    db = torch.zeros(up_weight.shape[0], device=dev, dtype=torch.float32) if need_dup and up_bias is not None else None
    for r0 in range(0, M, chunk_rows):
        rows = slice(r0, min(M, r0 + chunk_rows))
        s_c, t_c = s[rows], targets[rows]
        x = h_last[rows] + F.linear(s_c, up_weight, up_bias)
        logits = F.linear(x.to(lm_weight.dtype), lm_weight, lm_bias).float()
        valid = t_c != IGNORE_INDEX
        t_safe = torch.where(valid, t_c, 0)
        lse = torch.logsumexp(logits, -1)
        picked = logits.gather(1, t_safe[:, None])[:, 0]
        loss += torch.where(valid, lse - picked, 0.0).sum()
        if not (need_ds or need_dup):
            continue
        probs = logits.sub_(lse[:, None]).exp_()  # d CE / d logits = softmax - onehot (in place)
        probs[torch.arange(probs.shape[0], device=dev), t_safe] -= 1.0
        probs.mul_(valid[:, None])
        dx = (probs.to(lm_weight.dtype) @ lm_weight).to(up_weight.dtype)  # grad of up(s): up's dtype
        if need_ds:
            ds[rows] = (dx @ up_weight).to(s.dtype)
        if need_dup:
            dw += dx.float().t() @ s_c.float()
            if db is not None:
                db += dx.float().sum(0)
    return (
        loss,
        ds,
        dw.to(up_weight.dtype) if dw is not None else None,
        db.to(up_bias.dtype) if db is not None else None,
    )


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM shift: position t is scored on labels[t + 1]; the last on nothing."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]

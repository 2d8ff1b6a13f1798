"""Plain-PyTorch math of prefix attention: the CPU path and the test oracle.

Shapes (B batch, Hq query heads, Hkv key/value heads with Hq % Hkv == 0, T queries, S sequence keys,
P prefix keys, D head dim):
  q (B, Hq, T, D), k / v (B, Hkv, S, D), pk / pv (Hkv, P, D) shared by the whole batch,
  key_padding_mask (B, S) bool (True = a real key) or None,
  o (B, Hq, T, D), lse (B, Hq, T) float32 (natural log).

Query t of head h sees every prefix key of head h // (Hq / Hkv), and sequence key s iff
``key_padding_mask[b, s]`` and, when causal, s <= t + S - T (aligned so the last query sees the last key,
as with a KV cache).

Local window ``window = (left, right)`` (flash-attention's window_size; -1 = unbounded): query t sits at
position t + S - T, key s at s, and t sees s only if -right <= (t + S - T) - s <= left (causal: right = 0).
With ``window_counts_prefix`` (PEFT's semantics: its KV cache puts the prefix at positions 0 .. P-1 in
front of the sequence, and transformers' sliding-window masks count those positions) prefix key j sits
at position j - P and obeys the same window and causality; without it every query sees every prefix key.

Convention for a row that sees no key at all (only possible when P = 0, e.g. a causal query whose keys
are all padding): its output is 0, its lse is +inf, and it gets and gives zero gradients. The kernel does
the same (flash-attention's convention). Eager attention instead averages V over the masked keys; such
rows are padding and never reach a loss.

``bias`` (Hq, T, P + S) or None: added to the scaled scores (columns: prefix keys, then sequence keys),
shared by the batch (T5's relative position bias); it receives no gradient.

Attention dropout (``dropout_p``, ``seed``) drops normalised probabilities with the counter-based mask
of tunefast/reference/dropout.py: element (b, h, t, j) of the (B, Hq, T, P + S) probabilities (j over
[prefix | sequence]) is kept iff the Philox draw at offset ((b * Hq + h) * T + t) * (P + S) + j passes
``keep_threshold(p)``; kept ones are scaled by 1 / (1 - p). The kernel regenerates the same mask.

Everything is computed in float32 (float64 stays float64, for the oracle) and cast back to q's dtype.
GQA is computed by grouping the query heads (B, Hkv, G, T, D); nothing is repeated per head or per
batch element: the prefix broadcasts over the batch.
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _band(t_len: int, n_keys: int, q_shift: int, left: int, right: int, device) -> torch.Tensor:
    """(T, N) bool: -right <= (t + q_shift) - n <= left, a negative extent being unbounded."""
    diff = torch.arange(t_len, device=device)[:, None] + q_shift - torch.arange(n_keys, device=device)[None, :]
    ok = torch.ones_like(diff, dtype=torch.bool)
    if left >= 0:
        ok &= diff <= left
    if right >= 0:
        ok &= diff >= -right
    return ok


def visible(t_len: int, s_len: int, causal: bool, key_padding_mask, device,
            window: tuple[int, int] = (-1, -1)) -> torch.Tensor | None:
    """(B or 1, 1, 1, T, S) bool: which sequence keys each query sees (None: all of them)."""
    left, right = window
    allowed = None
    if causal or left >= 0 or right >= 0:
        allowed = _band(t_len, s_len, s_len - t_len, left, 0 if causal else right, device)[None, None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, None, :]
        allowed = pad if allowed is None else allowed & pad
    return allowed


def prefix_visible(t_len: int, s_len: int, p_len: int, causal: bool, device, window: tuple[int, int] = (-1, -1),
                   window_counts_prefix: bool = True) -> torch.Tensor | None:
    """(1, 1, 1, T, P) bool: which prefix keys each query sees (None: all of them)."""
    left, right = window
    if not window_counts_prefix or (left < 0 and right < 0):
        return None
    return _band(t_len, p_len, s_len - t_len + p_len, left, 0 if causal else right, device)[None, None, None]


def _scores(q, k, v, pk, pv, causal, key_padding_mask, scale, window, window_counts_prefix, bias=None):
    """Grouped inputs and the (B, Hkv, G, T, P + S) scaled, masked scores in the compute dtype."""
    ct = _compute_dtype(q)
    b, hq, t_len, d = q.shape
    hkv, s_len = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.to(ct).reshape(b, hkv, g, t_len, d)
    kc, vc = k.to(ct)[:, :, None], v.to(ct)[:, :, None]  # (B, Hkv, 1, S, D)
    pkc, pvc = pk.to(ct)[None, :, None], pv.to(ct)[None, :, None]  # (1, Hkv, 1, P, D): batch broadcast
    s_pre = (qg @ pkc.transpose(-1, -2)) * scale
    s_seq = (qg @ kc.transpose(-1, -2)) * scale
    if bias is not None:
        bg = bias.to(ct).reshape(1, hkv, g, t_len, -1)  # batch broadcast
        p_len = pk.shape[1]
        s_pre, s_seq = s_pre + bg[..., :p_len], s_seq + bg[..., p_len:]
    allowed = visible(t_len, s_len, causal, key_padding_mask, q.device, window)
    if allowed is not None:
        s_seq = s_seq.masked_fill(~allowed, float("-inf"))
    allowed = prefix_visible(t_len, s_len, pk.shape[1], causal, q.device, window, window_counts_prefix)
    if allowed is not None:
        s_pre = s_pre.masked_fill(~allowed, float("-inf"))
    return qg, kc, vc, pkc, pvc, torch.cat([s_pre, s_seq], dim=-1)


def drop_factor(shape, dropout_p: float, seed: int, dtype, device):
    """(B, Hkv, G, T, P + S) dropout factor (keep / (1 - p), 0 where dropped), or None for p = 0."""
    if dropout_p == 0.0:
        return None
    from . import dropout as rd

    rows = shape[0] * shape[1] * shape[2] * shape[3]  # (b, h = kv * G + g, t) flattened in this order
    keep = rd.keep_mask(seed, rows, shape[-1], dropout_p, device=device).reshape(shape)
    return keep.to(dtype) * rd.keep_scale(dropout_p)


def forward(q, k, v, pk, pv, causal: bool, key_padding_mask=None, scale: float | None = None,
            window: tuple[int, int] = (-1, -1), window_counts_prefix: bool = True, bias=None,
            dropout_p: float = 0.0, seed: int = 0):
    """Return (o (B, Hq, T, D) in q's dtype, lse (B, Hq, T) float32 (float64 for float64 inputs))."""
    scale = default_scale(q) if scale is None else scale
    b, hq, t_len, d = q.shape
    p_len = pk.shape[1]
    _, _, vc, _, pvc, scores = _scores(q, k, v, pk, pv, causal, key_padding_mask, scale, window, window_counts_prefix, bias)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows with no visible key: p = 0
    probs = torch.exp(scores - lse)
    factor = drop_factor(probs.shape, dropout_p, seed, probs.dtype, probs.device)
    probs = probs if factor is None else probs * factor
    o = probs[..., :p_len] @ pvc + probs[..., p_len:] @ vc
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o.reshape(b, hq, t_len, d).to(q.dtype), lse.reshape(b, hq, t_len).to(lse_dtype)


def backward(do, q, k, v, pk, pv, o, lse, causal: bool, key_padding_mask=None, scale: float | None = None,
             window: tuple[int, int] = (-1, -1), window_counts_prefix: bool = True, bias=None,
             dropout_p: float = 0.0, seed: int = 0):
    """Return (dq, dk, dv, dpk, dpv), each of its input's shape and dtype; dpk/dpv summed over the batch."""
    scale = default_scale(q) if scale is None else scale
    b, hq, t_len, d = q.shape
    hkv, p_len = k.shape[1], pk.shape[1]
    g = hq // hkv
    ct = _compute_dtype(q)
    qg, kc, vc, pkc, pvc, scores = _scores(q, k, v, pk, pv, causal, key_padding_mask, scale, window, window_counts_prefix,
                                           bias)
    probs = torch.exp(scores - lse.to(ct).reshape(b, hkv, g, t_len, 1))
    dog = do.to(ct).reshape(b, hkv, g, t_len, d)
    delta = (dog * o.to(ct).reshape(b, hkv, g, t_len, d)).sum(-1, keepdim=True)
    dp = torch.cat([dog @ pvc.transpose(-1, -2), dog @ vc.transpose(-1, -2)], dim=-1)
    factor = drop_factor(probs.shape, dropout_p, seed, probs.dtype, probs.device)
    if factor is not None:  # o = (P * factor) V: dV sees the dropped P, dP passes through the factor
        dp = dp * factor
    ds_pre = probs[..., :p_len] * (dp[..., :p_len] - delta)
    ds_seq = probs[..., p_len:] * (dp[..., p_len:] - delta)
    dropped = probs if factor is None else probs * factor
    p_pre, p_seq = dropped[..., :p_len], dropped[..., p_len:]
    dq = (ds_pre @ pkc + ds_seq @ kc) * scale
    # sums over the query heads of a group (dim 2) and, for the prefix, over the batch (dim 0)
    dk = (ds_seq.transpose(-1, -2) @ qg).sum(2) * scale
    dv = (p_seq.transpose(-1, -2) @ dog).sum(2)
    dpk = (ds_pre.transpose(-1, -2) @ qg).sum((0, 2)) * scale
    dpv = (p_pre.transpose(-1, -2) @ dog).sum((0, 2))
    return (
        dq.reshape(b, hq, t_len, d).to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dpk.to(pk.dtype),
        dpv.to(pv.dtype),
    )


def default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def concat_attention(q, k, v, pk, pv, causal: bool, key_padding_mask=None, scale=None, dropout_p: float = 0.0,
                     window: tuple[int, int] = (-1, -1), window_counts_prefix: bool = True, bias=None):
    """What PEFT computes: the prefix copied into every batch element, K/V repeated per query head,
    explicit mask, softmax in float32 (transformers' eager attention). Differentiable by autograd.

    Used as PyTorch's own low-precision result in tests (``dropout_p`` is torch's own dropout, not the
    kernel's counter-based mask).
    """
    scale = default_scale(q) if scale is None else scale
    b, hq, t_len, _ = q.shape
    hkv, s_len, p_len = k.shape[1], k.shape[2], pk.shape[1]
    g = hq // hkv
    kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2).repeat_interleave(g, dim=1)
    vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2).repeat_interleave(g, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)  # (Hq, T, P + S): broadcast over the batch
    allowed = visible(t_len, s_len, causal, key_padding_mask, q.device, window)
    pre = prefix_visible(t_len, s_len, p_len, causal, q.device, window, window_counts_prefix)
    if allowed is not None or pre is not None:
        ones = torch.ones(1, 1, 1, t_len, 1, dtype=torch.bool, device=q.device)
        allowed = (ones if allowed is None else allowed) & ones  # (B or 1, 1, 1, T, S or 1)
        pre = (ones if pre is None else pre) & ones
        allowed, pre = allowed[:, :, 0].expand(-1, -1, -1, s_len), pre[:, :, 0].expand(allowed.shape[0], -1, -1, p_len)
        allowed = torch.cat([pre, allowed], dim=-1)  # (B or 1, 1, T, P + S)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=_compute_dtype(q)).to(q.dtype)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return probs @ vv

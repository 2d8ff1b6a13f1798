"""Prefix attention, registered with torch.library (fake + autograd), dispatching to Triton or the reference.

    o = softmax(scale * q [pk | k]^T + mask) [pv | v]       (prefix pk / pv shared by the whole batch)

Kept for backward: q, k, v, pk, pv, o and the (B, Hq, T) fp32 logsumexp (plus the (B, S) bool mask, an
input). PEFT's concatenation keeps, per layer, B copies of the prefix in the concatenated K/V, the
K/V repeated per query head for GQA, and (eager) the (B, Hq, T, P + S) probabilities.

Two ops, as flash-attention does, so that ``torch.compile`` sees opaque forward and backward kernels:
``tunefast::prefix_attention_fwd`` and ``tunefast::prefix_attention_bwd``. The public entry is
:func:`prefix_attention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..reference import prefix_attention as ref
from ._checks import check_same_device, check_tensor

MAX_TRITON_HEAD_DIM = 256  # one (BLOCK, D) tile per operand in registers; beyond this use the reference


def _empty_out(q: Tensor) -> Tensor:
    # o is stored (B, T, Hq, D) and returned as a (B, Hq, T, D) view: the attention interface of
    # transformers wants (B, T, Hq, D), which is then a free transpose instead of a copy.
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d)).transpose(1, 2)


@torch.library.custom_op("tunefast::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,  # (B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)
    prefix_k: Tensor, prefix_v: Tensor,  # (Hkv, P, D) each, shared by the batch
    key_padding_mask: Optional[Tensor],
    causal: bool, scale: float, window_left: int, window_right: int, window_counts_prefix: bool,  # the score mask
    bias: Optional[Tensor],
    dropout_p: float, seed: int,  # attention dropout: the counter-based mask's probability and seed
    backend: str,
) -> tuple[Tensor, Tensor]:
    out = _empty_out(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    if q.shape[2] == 0:
        return out, lse
    if _backend.resolve(backend, q.device) == "triton":
        from ..kernels import prefix_attention as kpa

        kpa.attention_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, out, lse,
                              (window_left, window_right), window_counts_prefix, bias, _dropout(dropout_p, seed))
    else:
        o, l = ref.forward(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale,
                           (window_left, window_right), window_counts_prefix, bias, dropout_p, seed)
        out.copy_(o)
        lse.copy_(l)
    return out, lse


@_prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, window_left, window_right, window_counts_prefix,
      bias, dropout_p, seed, backend):
    return _empty_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tunefast::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(
    grad_o: Tensor,
    q: Tensor, k: Tensor, v: Tensor,  # (B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)
    prefix_k: Tensor, prefix_v: Tensor,  # (Hkv, P, D) each, shared by the batch
    o: Tensor, lse: Tensor,  # the forward's output (B, Hq, T, D) and fp32 logsumexp (B, Hq, T)
    key_padding_mask: Optional[Tensor],
    causal: bool, scale: float, window_left: int, window_right: int, window_counts_prefix: bool,  # the score mask
    bias: Optional[Tensor],
    dropout_p: float, seed: int,  # attention dropout: the counter-based mask's probability and seed
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are summed over the batch."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.shape[2] == 0:
        return dq, dk.zero_(), dv.zero_(), prefix_k.new_zeros(prefix_k.shape), prefix_v.new_zeros(prefix_v.shape)
    if _backend.resolve(backend, q.device) == "triton":
        from ..kernels import prefix_attention as kpa

        dpk, dpv = kpa.attention_backward(
            grad_o, q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask, causal, scale, dq, dk, dv,
            (window_left, window_right), window_counts_prefix, bias, _dropout(dropout_p, seed),
        )
    else:
        gq, gk, gv, dpk, dpv = ref.backward(grad_o, q, k, v, prefix_k, prefix_v, o, lse, causal, key_padding_mask, scale,
                                            (window_left, window_right), window_counts_prefix, bias, dropout_p, seed)
        dq.copy_(gq)
        dk.copy_(gk)
        dv.copy_(gv)
    return dq, dk, dv, dpk.to(prefix_k.dtype).contiguous(), dpv.to(prefix_v.dtype).contiguous()


@_prefix_attention_bwd.register_fake
def _(grad_o, q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask, causal, scale, window_left, window_right,
      window_counts_prefix, bias, dropout_p, seed, backend):
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, left, right, counts, bias, dropout_p, seed, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask, bias)
    ctx.static = (causal, scale, left, right, counts)
    ctx.dropout = (dropout_p, seed)
    ctx.backend = backend


def _backward(ctx, grad_o, _grad_lse):
    q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask, bias = ctx.saved_tensors
    grads = _prefix_attention_bwd(grad_o, q, k, v, prefix_k, prefix_v, o, lse, key_padding_mask, *ctx.static, bias,
                                  *ctx.dropout, ctx.backend)
    grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
    return (*grads, *([None] * 10))  # mask, causal, scale, left, right, counts, bias (no gradient), p, seed, backend


torch.library.register_autograd("tunefast::prefix_attention_fwd", _backward, setup_context=_setup_context)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window: Optional[tuple[int, int]] = None,
    window_counts_prefix: bool = True,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of ``q`` over a learned prefix shared by the batch followed by the sequence keys.

    Args:
        q: (B, Hq, T, D) queries, float32 / float16 / bfloat16, any strides.
        k: (B, Hkv, S, D) sequence keys; Hq must be a multiple of Hkv (GQA / MQA: query head h reads
            key head h // (Hq // Hkv); nothing is repeated).
        v: (B, Hkv, S, D) sequence values.
        prefix_k: (Hkv, P, D) prefix keys, shared by every batch element (never expanded); P may be 0.
        prefix_v: (Hkv, P, D) prefix values.
        causal: over the sequence keys, query t sees key s iff s <= t + S - T (the last query sees the
            last key, as with a KV cache); False: every sequence key. Every query sees every prefix key.
        key_padding_mask: (B, S) bool, True for a real key (or 0/1 integers); None: no padding.
        scale: softmax scale, default 1 / sqrt(D).
        window: (left, right) local window over the sequence, flash-attention's ``window_size``: query t
            (at position t + S - T) sees key s only if -right <= (t + S - T) - s <= left; -1 = unbounded,
            None = (-1, -1). transformers' ``sliding_window = W`` (key within the last W positions) is
            (W - 1, 0) with ``causal=True``.
        window_counts_prefix: True: the prefix sits at positions -P .. -1 in front of the sequence and the
            window (and causality) apply to it too, which is what PEFT's KV-cache prefix gives under
            transformers' sliding-window masks (a query more than left positions past the prefix stops
            seeing it). False: every query sees every prefix key whatever the window.
        bias: (Hq, T, P + S) added to the scaled scores (prefix columns first), shared by the batch, in
            q's dtype or float32: T5's relative position bias without a (B, H, T, P + S) mask. It gets no
            gradient (a frozen position bias); one that needs a gradient through its graph is refused.
        dropout_p: attention dropout on the normalised probabilities (0 <= p < 1), by the counter-based
            Philox mask of tunefast/reference/dropout.py, regenerated in the backward (nothing stored).
        seed: the mask's seed (non-negative int); None draws one from torch's default generator, so
            torch.manual_seed and non-reentrant checkpointing (which restores the RNG state) repeat it.
        backend: "auto", "triton", "native" or "reference" (see tunefast.backend).

    Returns:
        (B, Hq, T, D) tensor of q's dtype (a transposed view of (B, T, Hq, D) storage, so that
        ``out.transpose(1, 2)`` is contiguous). A query that sees no key at all (P = 0, every key
        masked) gets 0 and passes no gradient. Gradients reach q, k, v and the prefix (summed over the batch).
    """
    key_padding_mask = check_prefix_attention_args(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, backend)
    left, right = check_window(window, window_counts_prefix)
    check_bias(bias, q, k, prefix_k)
    dropout_p, seed = check_dropout(dropout_p, seed)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), scale, left, right,
                                   window_counts_prefix, bias, dropout_p, seed, backend)
    return out


def _dropout(dropout_p: float, seed: int) -> tuple[int, int, float]:
    """(seed, uint32 keep threshold, keep scale) for the kernel (threshold 0: no dropout)."""
    from ..reference import dropout as rd

    return seed, rd.keep_threshold(dropout_p), rd.keep_scale(dropout_p)


def check_dropout(dropout_p, seed) -> tuple[float, int]:
    """(p, seed) validated; a seed drawn from torch's default generator when p > 0 and seed is None."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or a non-negative int, got {seed!r}")
    if dropout_p == 0.0:
        return 0.0, 0
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return float(dropout_p), seed


def check_bias(bias, q, k, prefix_k) -> None:
    """Raise a clear error for a bias that is not (Hq, T, P + S) on q's device, or that needs a gradient."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    want = (q.shape[1], q.shape[2], prefix_k.shape[1] + k.shape[2])
    if tuple(bias.shape) != want:
        raise ValueError(f"bias must be (Hq, T, P + S) = {want} (shared by the batch), got {tuple(bias.shape)}")
    if bias.dtype not in (q.dtype, torch.float32):
        raise TypeError(f"bias dtype {bias.dtype}: expected q's dtype {q.dtype} or torch.float32")
    check_same_device([("q", q), ("bias", bias)])
    if bias.requires_grad and bias.grad_fn is not None and torch.is_grad_enabled():
        raise NotImplementedError(
            "bias needs a gradient (it comes from trainable parameters); prefix_attention gives the bias none: "
            "freeze what produces it or use PyTorch attention"
        )


def check_window(window, window_counts_prefix) -> tuple[int, int]:
    """(left, right) from ``window`` (None: unbounded), or a clear error."""
    if not isinstance(window_counts_prefix, bool):
        raise TypeError(f"window_counts_prefix must be a bool, got {type(window_counts_prefix).__name__}")
    if window is None:
        return -1, -1
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    ok = ok and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    if not ok:
        raise ValueError(f"window must be None or (left, right), two ints >= -1 (-1 = unbounded), got {window!r}")
    return int(window[0]), int(window[1])


def check_prefix_attention_args(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale, backend):
    """Raise a clear error for bad arguments; return the key-padding mask as bool (or None)."""
    _backend.check_backend_name(backend)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    tensors = (q, k, v, prefix_k, prefix_v)
    for name, t, nd in zip(names, tensors, (4, 4, 4, 3, 3)):
        check_tensor(t, name, ndim=nd)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    b, hq, t_len, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape (B, Hkv, S, D)")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}: expected (B={b}, Hkv, S, D={d})")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of k/v's {hkv} heads (GQA needs Hq % Hkv == 0)")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} and prefix_v {tuple(prefix_v.shape)} must have the same shape")
    if prefix_k.shape[0] != hkv:
        raise ValueError(
            f"the prefix has {prefix_k.shape[0]} heads but k/v have {hkv}: the prefix is (Hkv, P, D), one per "
            "key/value head (for GQA models PEFT sizes it with num_key_value_heads)"
        )
    if prefix_k.shape[2] != d:
        raise ValueError(f"the prefix head dim is {prefix_k.shape[2]} but q/k/v have head dim {d}")
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from q dtype {q.dtype}: cast it to the model's dtype")
    check_same_device(list(zip(names, tensors)) + [("key_padding_mask", key_padding_mask)])
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    if backend == "triton" and d > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_TRITON_HEAD_DIM} is not supported by the Triton kernel; use backend='reference'")
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
    if key_padding_mask.is_meta:
        raise ValueError("key_padding_mask is a meta tensor (shape only, no data)")
    if tuple(key_padding_mask.shape) != (b, k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be (B, S) = ({b}, {k.shape[2]}) (True = a real key), got {tuple(key_padding_mask.shape)}"
        )
    if key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    if key_padding_mask.is_floating_point() or key_padding_mask.is_complex():
        raise TypeError(
            f"key_padding_mask has dtype {key_padding_mask.dtype}: pass a bool (or 0/1 integer) mask, True = a real "
            "key; additive float masks are not supported"
        )
    return key_padding_mask != 0

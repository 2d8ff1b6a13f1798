"""Triton flash attention (FlashAttention-2 schedule) over [shared prefix | sequence] keys.

    o[b, h, t] = softmax_j(scale * q[b, h, t] . key_j) value_j,   j over P prefix keys then S sequence keys

The prefix pk / pv (Hkv, P, D) is shared by the batch: every program reads it through its own pointers
(batch stride 0), so it is never expanded, copied or concatenated per batch element. Query head h reads
key/value head h // (Hq / Hkv) (GQA / MQA without repeat_kv). Sequence keys are causal (aligned so the
last query sees the last key: t sees s iff s <= t + S - T) or bidirectional, with a (B, S) key-padding
mask, and optionally a local window.

Local windows (flash-attention's window_size = (left, right)): query t sits at position t + S - T of the
sequence and key s at position s; t sees s iff -WR <= (t + S - T) - s <= WL. Causal is WR = 0; "no bound"
is WL / WR = NO_BOUND (2**30, far beyond any length, and small enough that sums stay in int32). With
PREFIX_LOCAL the prefix keys are positions -P .. -1 of the same sequence (what a concatenated KV cache
gives: transformers' sliding-window masks count the prefix), so prefix key j is checked with the query
shifted by P: -WR <= (t + S - T + P) - j <= WL. Without it every query sees every prefix key.

An optional additive score bias (Hq, T, P + S), shared by the batch (T5's relative position bias), is
read tile by tile next to the scores in every kernel; it gets no gradient.

Kernels (tunefast/ops/prefix_attention.py composes them):
  ``_fwd_kernel``    one program per (query block, head, batch): online softmax over prefix then
                     sequence blocks; writes o and lse (natural log, fp32; +inf for a row with no key).
  ``_delta_kernel``  delta = rowsum(dO * O), the backward's softmax-Jacobian term.
  ``_dkdv_kernel``   one program per (key block, kv head, batch): loops over the group's query heads and
                     query blocks, recomputing P from lse. Launched once over prefix keys (writing a
                     (B, Hkv, P, D) fp32 partial per batch element, summed by torch: deterministic, no
                     atomics) and once over sequence keys (writing dk / dv).
  ``_dq_kernel``     one program per (query block, head, batch): dq over prefix and sequence keys.

Caution:
  * Under TRITON_INTERPRET=1 ``tl.dot`` on bf16/fp16 returns garbage (bf16 is held as raw bits), so the
    launchers set UPCAST there; on a GPU low-precision operands go to the tensor cores.
  * fp32 dots follow torch's matmul precision setting ("ieee" unless TF32 is allowed).
  * Head dims are padded to the next power of two (min 16) with masks: D = 80 or 96 costs a 128 tile.
  * A row with no visible key (P = 0 and every sequence key masked) gives o = 0, lse = +inf and zero
    gradients (flash-attention's convention; tunefast/reference/prefix_attention.py agrees).
  * The dropout seed and threshold are never specialised (do_not_specialize): Triton turns an int equal
    to 1 into a constexpr, which the Philox code cannot widen (found by the AOT compile, not the interpreter).
  * Launches go through kernels/launch.py: configs per head-dim tile, dtype and extras (_FWD_TILES ..
    _DKDV_FP32), the shared-memory rule per arch, autotune on/off; the interpreter uses one small fixed config.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .dropout import philox_keep

_LOG2E = 1.4426950408889634
NO_BOUND = 1 << 30  # an unbounded window side: beyond any length, and sums with lengths stay within int32


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _band(rows, cols, q_shift, WL, WR):
    """(rows, cols) bool: key col is within the window of query row (query position = row + q_shift)."""
    diff = rows[:, None] + q_shift - cols[None, :]
    return (diff <= WL) & (diff >= -WR)


@triton.jit
def _key_range(row_lo, row_hi, q_shift, n_keys, WL, WR, BANDED: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key blocks that queries row_lo .. row_hi (inclusive) can see: all n_keys unless BANDED
    (by the window); lo block-aligned."""
    lo, hi = 0, n_keys
    if BANDED:
        lo = (tl.maximum(row_lo + q_shift - WL, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(tl.maximum(row_hi + q_shift + WR + 1, 0), n_keys)
    return lo, hi


@triton.jit
def _query_range(key_lo, key_hi, q_shift, n_queries, WL, WR, BLOCK_M: tl.constexpr):
    """[lo, hi) of the query blocks that can see keys key_lo .. key_hi (inclusive); lo block-aligned."""
    lo = tl.maximum(key_lo - q_shift - WR, 0)
    hi = tl.minimum(tl.maximum(key_hi - q_shift + WL + 1, 0), n_queries)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _bias_tile(bias_ptr, h, rows, cols, row_mask, col_mask, stride_bh, stride_bt, stride_bn, HAS_BIAS: tl.constexpr):
    """(rows, cols) additive score bias in log2 units (0.0 without a bias); one (Hq, T, N) tensor shared by
    the batch (T5's relative position bias)."""
    if HAS_BIAS:
        ptrs = bias_ptr + h * stride_bh + rows[:, None].to(tl.int64) * stride_bt + cols[None, :].to(tl.int64) * stride_bn
        return tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        return 0.0


@triton.jit
def _drop_tile(seed, rows, cols, n_cols, threshold, drop_scale, DROPOUT: tl.constexpr):
    """Dropout factor of the (rows, cols) probabilities: 1 / (1 - p) where kept, 0 where dropped (1.0 without
    dropout). ``rows``: global query rows (b * Hq + h) * T + t; ``cols``: key columns in [prefix | sequence].
    Element (row, col) draws Philox offset row * n_cols + col (kernels/dropout.py), so the backward
    regenerates the forward's mask instead of storing it."""
    if DROPOUT:
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :].to(tl.int64)
        return tl.where(philox_keep(seed, offs, threshold), drop_scale, 0.0)
    else:
        return 1.0


@triton.jit
def _key_block(n, n_keys, offs_m, m_mask, q_shift, WL, WR, keep_ptr, stride_ks,
               bias_ptr, h, stride_bh, stride_bt, stride_bn, seed, drop_rows, col0, n_cols, drop_threshold, drop_scale,
               BANDED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """What query rows offs_m (BLOCK_M,) see of keys n (BLOCK_N,) of one key part (prefix or sequence):
    (n's bounds mask, visible (BLOCK_M, BLOCK_N) bool, score bias in log2 units, dropout factor).
    Visible: in bounds, not padding (HAS_MASK: keep_ptr[n * stride_ks] != 0), in the window (BANDED; query
    position = row + q_shift). col0: the part's first column in [prefix | sequence] (dropout offsets).
    Query rows past T need no mask: their lse is +inf and their dO and delta 0, so they add nothing."""
    n_mask = n < n_keys
    valid = n_mask[None, :]
    if HAS_MASK:
        keep = tl.load(keep_ptr + n.to(tl.int64) * stride_ks, mask=n_mask, other=0)
        valid = valid & (keep != 0)[None, :]
    if BANDED:
        valid = valid & _band(offs_m, n, q_shift, WL, WR)
    bias = _bias_tile(bias_ptr, h, offs_m, n, m_mask, n_mask, stride_bh, stride_bt, stride_bn, HAS_BIAS)
    drop = _drop_tile(seed, drop_rows, col0 + n, n_cols, drop_threshold, drop_scale, DROPOUT)
    return n_mask, valid, bias, drop


@triton.jit
def _attend_keys(acc, m_i, l_i, q, do, lse, delta, offs_m, m_mask, offs_d, d_mask, row_lo, row_hi, qk_scale,
                 k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, n_keys, q_shift, WL, WR, keep_ptr,
                 stride_ks, bias_ptr, h, stride_bh, stride_bt, stride_bn, seed, drop_rows, col0, n_cols,
                 drop_threshold, drop_scale, DQ: tl.constexpr, BANDED: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows offs_m against the visible key blocks of one key part (prefix or sequence; see _key_block):
    k_base / v_base point at this (batch, kv head)'s (n_keys, D) keys / values. The forward (DQ False) runs
    the online softmax on acc (BLOCK_M, BLOCK_D) fp32, m_i and l_i (BLOCK_M,); the dQ pass (DQ True) adds
    dS K to acc = dq from do, lse (log2 units) and delta, and leaves m_i / l_i as given."""
    lo, hi = _key_range(row_lo, row_hi, q_shift, n_keys, WL, WR, BANDED, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_mask, valid, bias, drop = _key_block(n, n_keys, offs_m, m_mask, q_shift, WL, WR, keep_ptr, stride_ks,
                                               bias_ptr, h, stride_bh, stride_bt, stride_bn, seed, drop_rows, col0,
                                               n_cols, drop_threshold, drop_scale, BANDED, HAS_MASK, HAS_BIAS, DROPOUT)
        rows_n = n.to(tl.int64)
        v_ptrs = v_base + rows_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
        if DQ:
            k_ptrs = k_base + rows_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # (BLOCK_N, BLOCK_D)
            acc = _dq_step(acc, q, do, lse, delta, k_ptrs, v_ptrs, n_mask[:, None] & d_mask[None, :], valid, bias,
                           drop, qk_scale, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
        else:
            k_ptrs = k_base + rows_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (BLOCK_D, BLOCK_N)
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_mask, d_mask, valid, qk_scale, bias,
                                          drop, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    return acc, m_i, l_i


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_mask, d_mask, valid, qk_scale, bias, drop,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One online-softmax step over a key block. Scores are in log2 units (scale * log2(e) folded in)."""
    k = tl.load(k_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
    s = _dot(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION) * qk_scale + bias
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen no key yet keeps m = -inf; exponentiate against 0 there so that no inf - inf
    # (NaN) appears: its p and alpha are exactly 0
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    # dropout acts on the normalised probabilities: l_i sums the undropped p, acc the dropped ones
    acc = _dot((p * drop).to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _query_program(T, HEAD_DIM, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program over (query block, query head, batch): (b, h, kv head h // GROUP (int64), query rows
    (BLOCK_M,) and their bounds mask, head-dim offsets (BLOCK_D,) and their bounds mask)."""
    h = tl.program_id(1)
    hkv = (h // GROUP).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return tl.program_id(2).to(tl.int64), h.to(tl.int64), hkv, offs_m, offs_m < T, offs_d, offs_d < HEAD_DIM


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _fwd_kernel(
    # pointers: inputs, key-padding mask (int8, B x S), score bias over prefix / sequence keys, outputs
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, pbias_ptr, sbias_ptr, o_ptr, lse_ptr,
    # sizes: queries, sequence keys, prefix keys, head dim, query heads per kv head
    T, S, P, HEAD_DIM, GROUP,
    # strides (prefix: no batch stride, it is shared)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkh, stride_pkp, stride_pkd,
    stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ms,
    stride_bh, stride_bt, stride_bn,
    stride_ob, stride_oh, stride_ot, stride_od,
    # softmax scale * log2(e), window extents (left, right; causal is WR = 0), dropout seed / uint32
    # threshold / 1 / (1 - p), autotune key
    qk_scale, WL, WR, seed, drop_threshold, drop_scale, size_key,
    # meta-parameters: LOCAL bounds the sequence keys by the window, PREFIX_LOCAL the prefix keys too
    LOCAL: tl.constexpr, PREFIX_LOCAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, hkv, offs_m, m_mask, offs_d, d_mask = _query_program(T, HEAD_DIM, GROUP, BLOCK_M, BLOCK_D)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    row_lo = tl.program_id(0) * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, T) - 1
    drop_rows = (b * tl.num_programs(1) + h) * T + offs_m
    # prefix keys (positions -P .. -1): no padding mask, windowed only under PREFIX_LOCAL; then sequence keys,
    # whose blocks outside the window (past the diagonal when causal) are never visited
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q, m_i, l_i, offs_m, m_mask, offs_d, d_mask, row_lo, row_hi, qk_scale, pk_ptr + hkv * stride_pkh,
        pv_ptr + hkv * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd, P, S - T + P, WL, WR, mask_ptr, 0,
        pbias_ptr, h, stride_bh, stride_bt, stride_bn, seed, drop_rows, 0, P + S, drop_threshold, drop_scale,
        False, PREFIX_LOCAL, False, HAS_BIAS, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attend_keys(
        acc, m_i, l_i, q, q, m_i, l_i, offs_m, m_mask, offs_d, d_mask, row_lo, row_hi, qk_scale,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh, stride_ks, stride_kd, stride_vs,
        stride_vd, S, S - T, WL, WR, mask_ptr + b * stride_mb, stride_ms, sbias_ptr, h, stride_bh, stride_bt, stride_bn,
        seed, drop_rows, P, P + S, drop_threshold, drop_scale, False, LOCAL, HAS_MASK, HAS_BIAS, DROPOUT, UPCAST,
        PRECISION, BLOCK_M, BLOCK_N)

    empty = l_i == 0.0  # no visible key: o = 0, lse = +inf (then P = exp(s - lse) = 0 in the backward)
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    n_heads = tl.num_programs(1)
    tl.store(lse_ptr + (b * n_heads + h) * T + offs_m, lse, mask=m_mask)


@triton.jit
def _delta_kernel(
    # pointers: output, its gradient, delta (B, Hq, T) fp32
    o_ptr, do_ptr, delta_ptr,
    # sizes
    T, HEAD_DIM,
    # strides
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (b * tl.num_programs(1) + h) * T + offs_m, delta, mask=offs_m < T)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _dkdv_kernel(
    # pointers: inputs, keys/values of this launch (prefix or sequence), key-padding mask, outputs
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, bias_ptr, dk_ptr, dv_ptr,
    # sizes: queries, sequence keys, keys of this launch, head dim, query heads per kv head, query heads,
    # column of this launch's first key in [prefix | sequence] and P + S (for the dropout offsets)
    T, S, N_KEYS, HEAD_DIM, GROUP, HQ, COL0, N_COLS,
    # strides (stride_kb = 0 for the prefix; dk/dv of the prefix are per-batch fp32 partials)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_mb, stride_ms,
    stride_bh, stride_bt, stride_bn,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    # softmax scale (natural) and scale * log2(e), window extents, dropout (as _fwd_kernel's), autotune key
    sm_scale, qk_scale, WL, WR, seed, drop_threshold, drop_scale, size_key,
    # meta-parameters: PREFIX keys have no padding mask and are windowed only under PREFIX_LOCAL
    PREFIX: tl.constexpr, LOCAL: tl.constexpr, PREFIX_LOCAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_mb = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N_KEYS
    d_mask = offs_d < HEAD_DIM
    kv_mask = n_mask[:, None] & d_mask[None, :]
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + hkv * stride_kh + rows_n * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hkv * stride_vh + rows_n * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    col_ok = n_mask
    if not PREFIX:
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n.to(tl.int64) * stride_ms, mask=n_mask, other=0)
            col_ok = col_ok & (keep != 0)
    # the prefix keys sit P positions before the sequence: queries are shifted by P against them
    q_shift = S - T
    if PREFIX:
        q_shift += N_KEYS
    lo, hi = 0, T
    if (PREFIX and PREFIX_LOCAL) or (not PREFIX and LOCAL):  # queries outside the window of every key of this block are never visited
        lo, hi = _query_range(start_n, tl.minimum(start_n + BLOCK_N, N_KEYS) - 1, q_shift, T, WL, WR, BLOCK_M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, GROUP):
        h = hkv * GROUP + g
        row_base = (b * HQ + h) * T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_mb
            m_mask = offs_m < T
            rows_m = offs_m[:, None].to(tl.int64)
            qd_mask = m_mask[:, None] & d_mask[None, :]
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows_m * stride_qt + offs_d[None, :] * stride_qd,
                        mask=qd_mask, other=0.0)
            do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows_m * stride_dot + offs_d[None, :] * stride_dod,
                         mask=qd_mask, other=0.0)
            lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION) * qk_scale
            s += _bias_tile(bias_ptr, h, offs_m, offs_n, m_mask, n_mask, stride_bh, stride_bt, stride_bn, HAS_BIAS)
            valid = m_mask[:, None] & col_ok[None, :]
            if (PREFIX and PREFIX_LOCAL) or (not PREFIX and LOCAL):
                valid = valid & _band(offs_m, offs_n, q_shift, WL, WR)
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            drop = _drop_tile(seed, row_base + offs_m, COL0 + offs_n, N_COLS, drop_threshold, drop_scale, DROPOUT)
            dv = _dot(tl.trans((p * drop).to(do.dtype)), do, dv, UPCAST, PRECISION)
            dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
            ds = p * (dp * drop - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, UPCAST, PRECISION)
    dk = dk * sm_scale
    tl.store(dk_ptr + b * stride_dkb + hkv * stride_dkh + rows_n * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * stride_dvb + hkv * stride_dvh + rows_n * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptrs, v_ptrs, kv_mask, valid, bias, drop,
             qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION) * qk_scale + bias
    p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST, PRECISION)
    ds = p * (dp * drop - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)


@triton.jit(do_not_specialize=["seed", "drop_threshold"])
def _dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, pbias_ptr, sbias_ptr, dq_ptr,
    # sizes
    T, S, P, HEAD_DIM, GROUP,
    # strides
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkh, stride_pkp, stride_pkd,
    stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_mb, stride_ms,
    stride_bh, stride_bt, stride_bn,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    # softmax scale (natural) and scale * log2(e), window extents, dropout (as _fwd_kernel's), autotune key
    sm_scale, qk_scale, WL, WR, seed, drop_threshold, drop_scale, size_key,
    # meta-parameters (as _fwd_kernel's)
    LOCAL: tl.constexpr, PREFIX_LOCAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, h, hkv, offs_m, m_mask, offs_d, d_mask = _query_program(T, HEAD_DIM, GROUP, BLOCK_M, BLOCK_D)
    rows_m = offs_m[:, None].to(tl.int64)
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows_m * stride_qt + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows_m * stride_dot + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)
    row_base = (b * tl.num_programs(1) + h) * T
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row_lo = tl.program_id(0) * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, T) - 1

    # prefix keys, then sequence keys (as _fwd_kernel)
    drop_rows = row_base + offs_m
    dq, lse, delta = _attend_keys(
        dq, lse, delta, q, do, lse, delta, offs_m, m_mask, offs_d, d_mask, row_lo, row_hi, qk_scale,
        pk_ptr + hkv * stride_pkh, pv_ptr + hkv * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd, P,
        S - T + P, WL, WR, mask_ptr, 0, pbias_ptr, h, stride_bh, stride_bt, stride_bn, seed, drop_rows, 0, P + S,
        drop_threshold, drop_scale, True, PREFIX_LOCAL, False, HAS_BIAS, DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N)
    dq, lse, delta = _attend_keys(
        dq, lse, delta, q, do, lse, delta, offs_m, m_mask, offs_d, d_mask, row_lo, row_hi, qk_scale,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh, stride_ks, stride_kd,
        stride_vs, stride_vd, S, S - T, WL, WR, mask_ptr + b * stride_mb, stride_ms, sbias_ptr, h, stride_bh,
        stride_bt, stride_bn, seed, drop_rows, P, P + S, drop_threshold, drop_scale, True, LOCAL, HAS_MASK, HAS_BIAS,
        DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N)

    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows_m * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------

def _elem(named) -> int:
    return launch.elem_bytes(named["q_ptr"], named["UPCAST"])


# Tiles per head-dim tile (BLOCK_D) as (BLOCK_M, BLOCK_N, warps, stages); the first one whose shared
# memory fits the arch is the fixed config (TUNEFAST_AUTOTUNE=0), the rest are autotune candidates.
# Registers, not shared memory, are what spill, and the first entries below are the ones the AOT check's
# ptxas log (triton 3.8 and 3.6, sm_80 / sm_89 / sm_90) showed clean; ptxas is not monotone in the tile size
# (e.g. the fp32 dK/dV kernel at BLOCK_D = 128: 16 x 16 x 8 warps x 1 stage spills 44 B, 16 x 32 does not).
#   * fp16 / bf16 (tensor cores): the forward holds an fp32 (BLOCK_M, BLOCK_D) accumulator, dK/dV two
#     fp32 (BLOCK_N, BLOCK_D) ones plus its K and V tiles.
#   * _HEAVY: launches with dropout or a score bias also hold the Philox words / bias tile of every
#     (BLOCK_M, BLOCK_N) score (sm_90, D = 32, 64 x 64 x 4 warps: 272 B/thread of spills in the forward,
#     1 KB in dK/dV), so their fixed tiles are smaller.
#   * fp32 operands: with "ieee" precision (torch's default "highest") tl.dot runs on FMA units, whose
#     operand layout holds a whole K extent per thread: the forward at D = 128, 64 x 32 x 4 warps spilled
#     9.6 KB/thread (and needed 106 KB of shared memory, over the RTX 4090's 99 KB). The fp32 tables use
#     16- and 32-wide tiles, and more warps at large head dims.
# The forward at D = 256, 64 x 64 x 8 warps compiled to 104 KB of shared memory (the estimate below counts
# 96 KB), over the RTX 4090's 99 KB: that tile is not listed for sm_89
_FWD_TILES = {
    64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (32, 32, 4, 2)],
    128: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
    256: {89: [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
          0: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2), (16, 32, 4, 2)]},
}
# dQ at D = 128 on sm_90: 32 x 32 x 4 warps spilled 8 B with triton 3.6 (128 regs), 64 x 64 x 8 warps is clean
# with 3.6 and 3.8 (158 regs, 96 KB of shared memory); the sm_80 / sm_89 tables were not re-swept for it
_BWD_TILES = {
    64: [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2), (16, 64, 4, 2)],
    128: {90: [(64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (16, 32, 4, 2)],
          0: [(32, 32, 4, 2), (64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2), (16, 32, 4, 2)]},
    256: [(16, 32, 8, 1), (32, 32, 8, 1), (16, 16, 4, 1)],
}
# dK/dV: the fp32 accumulators are per key, so its tiles differ from dQ's (sm_80, D = 32, 32 x 32 x 4 warps
# spilled 8 B without dropout and none with it, 32 x 32 x 8 warps 20 B, while on sm_89 32 x 32 x 8 warps was
# the clean one; 16 x 32 x 8 warps x 1 stage spilled 32-36 B at D = 256; sm_90, D = 64: 32 x 32 x 8 warps
# spilled 8 B with triton 3.6 (128 regs), 64 x 64 x 8 warps is clean with 3.6 and 3.8, 200-227 regs)
_DKDV_TILES = {
    32: {89: [(32, 32, 8, 2), (64, 64, 4, 2)], 0: [(64, 64, 4, 2), (32, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)]},
    64: {90: [(64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
         0: [(32, 32, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)]},
    128: [(32, 32, 8, 2), (32, 16, 4, 2), (64, 64, 8, 2), (32, 64, 8, 2), (16, 32, 4, 2)],
    256: [(16, 32, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1)],
}
_FWD_HEAVY = {32: [(32, 32, 4, 2)], 64: [(64, 32, 4, 2)], 128: [(32, 32, 4, 2)], 256: [(32, 64, 8, 2)]}
# dQ with dropout / bias at D = 256 on sm_80, triton 3.6: 16 x 32 x 8 warps spilled 28 B at 128 registers,
# 32 x 32 x 8 warps is clean at 200-204 (triton 3.6 and 3.8, fp16 and bf16); sm_90, D = 32 / 64: 32 x 32 x 4
# warps spilled 8 / 16 B at 168 regs (3.6 / 3.8), 32 x 32 x 8 warps is clean with both (128-168 regs)
_DQ_HEAVY = {64: {90: [(32, 32, 8, 2)], 0: [(32, 32, 4, 2)]}, 128: [(32, 32, 4, 2)],
             256: {80: [(32, 32, 8, 1)], 0: [(16, 32, 8, 1)]}}
# dK/dV with dropout / bias at D = 32: 32 x 32 x 4 warps spilled 56 B on sm_90 with triton 3.6 (168 regs);
# 32 x 32 x 8 warps is clean on sm_89 and sm_90 with 3.6 and 3.8 (184-237 regs)
_DKDV_HEAVY = {32: {80: [(32, 32, 4, 2)], 0: [(32, 32, 8, 2)]}, 64: [(32, 32, 4, 2)], 128: [(32, 32, 8, 2)],
               256: [(16, 32, 4, 1)]}
_FWD_FP32 = {
    64: [(16, 32, 8, 1), (32, 16, 4, 2), (32, 32, 4, 2)],
    128: [(32, 16, 8, 2), (16, 16, 4, 2)],
    256: [(32, 16, 8, 2), (16, 16, 4, 2)],
}
# fp32 forward with dropout / bias: sm_80, D = 64, 16 x 32 x 8 warps spilled 16 B, 32 x 16 x 4 warps none;
# D = 128, 32 x 16 x 8 warps x 2 stages spilled 32 B on sm_80 (80 registers, triton 3.6 and 3.8), 32 x 16 x 4
# warps is clean there and on sm_89 (150 registers) but spilled 1.3 KB on sm_90, which keeps 8 warps
_FWD_FP32_HEAVY = {
    64: [(32, 16, 4, 2), (16, 32, 8, 1)],
    128: {90: [(32, 16, 8, 2), (16, 16, 4, 2)], 0: [(32, 16, 4, 2), (16, 16, 4, 2)]},
    256: [(32, 16, 8, 2), (16, 16, 4, 2)],
}
_DQ_FP32 = {
    64: [(32, 32, 4, 2), (32, 16, 8, 2)],
    128: [(32, 16, 8, 2), (16, 16, 4, 2)],
    256: [(32, 16, 8, 2), (16, 16, 4, 2)],  # 32 x 16 needs 102,400 B at D = 256: not on an RTX 4090
}
# dQ fp32 with dropout / bias at D = 128: 32 x 16 x 8 warps x 2 stages spilled 32 B at 80 registers on sm_80,
# sm_89 and sm_90 (triton 3.6; sm_89 with 3.8 too); 16 x 16 x 4 warps x 2 stages is clean on all three, 96 regs;
# sm_90, D = 32: 32 x 32 x 4 warps spilled 8 B (3.8, 96 regs), 32 x 32 x 8 warps is clean at D <= 64 (80-98 regs)
_DQ_FP32_HEAVY = {**_DQ_FP32, 64: {90: [(32, 32, 8, 2)], 0: _DQ_FP32[64]}, 128: [(16, 16, 4, 2)]}
# fp32 dK/dV is where ptxas differs most between archs (D = 128 without dropout: 16 x 32 x 8 warps clean on
# sm_90, 16 B on sm_80; 16 x 16 x 4 warps clean on sm_80, 36 B on sm_90): entries keyed by arch where they do
_DKDV_FP32 = {
    64: [(16, 32, 4, 1), (16, 16, 4, 1)],
    128: {90: [(16, 32, 8, 1)], 0: [(16, 16, 4, 1), (16, 32, 8, 1)]},
    256: {90: [(16, 16, 8, 1), (16, 32, 8, 1)], 0: [(16, 16, 4, 1), (16, 16, 8, 1)]},
}
_DKDV_FP32_HEAVY = {64: [(16, 32, 8, 1)], 128: [(16, 32, 8, 1)], 256: [(16, 32, 8, 1), (16, 16, 8, 1)]}


def _for_head_dim(table, named, arch):
    tiles = table[min(t for t in table if t >= named["BLOCK_D"])]
    if isinstance(tiles, dict):  # per arch: its capability's entry, else the default (0)
        tiles = tiles.get(arch.capability, tiles[0])
    return tiles


def _tiles(tables, named, arch):
    """(BLOCK_M, BLOCK_N, warps, stages) candidates of one launch, the intended fixed tile first."""
    plain, heavy, fp32, fp32_heavy = tables
    if _elem(named) == 4:
        plain, heavy = fp32, fp32_heavy or fp32
    tiles = _for_head_dim(plain, named, arch)
    if named["DROPOUT"] or named["HAS_BIAS"]:
        # the bias and dropout tiles add (BLOCK_M, BLOCK_N) scratch the shared-memory estimates do not count:
        # the forward at D = 64, 128 x 64 x 8 warps x 3 stages compiled to 112 KB with them (estimate 48 KB),
        # over sm_89's 99 KB; so no tile larger than the first heavy one is tried
        first = _for_head_dim(heavy, named, arch)
        area = first[0][0] * first[0][1]
        tiles = first + [t for t in tiles if t not in first and t[0] * t[1] <= area]
    return tiles


def _configs(*tables):
    def configs(arch, named):
        return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st)
                for m, n, w, st in _tiles(tables, named, arch)]
    return configs


def _fwd_smem(c, named):
    # K and V (BLOCK_D x BLOCK_N each) pipelined, Q resident; the bias / mask tiles are small
    d, m, n = named["BLOCK_D"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    return launch.pipeline_smem(c, (d, n), (n, d), elem=_elem(named)) + m * d * _elem(named)


def _bwd_smem(c, named):
    # Q and dO (BLOCK_M x BLOCK_D) or K and V pipelined; the other pair resident
    d, m, n = named["BLOCK_D"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    return launch.pipeline_smem(c, (max(m, n), d), (max(m, n), d), elem=_elem(named)) + 2 * max(m, n) * d * _elem(named)


# One small config for the CPU interpreter: every program costs ~ms there, so few, mid-size tiles.
_INTERPRET = dict(BLOCK_M=32, BLOCK_N=32)
_FWD = launch.Kernel(_fwd_kernel, configs=_configs(_FWD_TILES, _FWD_HEAVY, _FWD_FP32, _FWD_FP32_HEAVY),
                     smem=_fwd_smem, interpret=_INTERPRET)
_DQ = launch.Kernel(_dq_kernel, configs=_configs(_BWD_TILES, _DQ_HEAVY, _DQ_FP32, _DQ_FP32_HEAVY), smem=_bwd_smem,
                    interpret=_INTERPRET)
_DKDV = launch.Kernel(_dkdv_kernel, configs=_configs(_DKDV_TILES, _DKDV_HEAVY, _DKDV_FP32, _DKDV_FP32_HEAVY),
                      smem=_bwd_smem, interpret=_INTERPRET)
# fp32 dK/dV (FMA dots) compiles with .maxnreg 255. Left to itself ptxas aimed below what the kernel needs and
# spilled in 6 fixed configs on sm_89 with triton 3.8 (D = 64, 16 x 32 x 4 warps: 96 regs + 24 B; D = 128,
# 16 x 16 x 4 warps: 80 + 24; D = 256, 16 x 16 x 4 warps: 168 + 8; with dropout / bias 16 x 32 x 8 warps:
# 64-80 + 8-16) and in 7 with 3.6 (sm_90, D = 128, 16 x 32 x 8 warps: 80 + 68). No tile was clean everywhere:
# at D = 256 on sm_89 every 16-wide one spilled (16 x 16 x 8 warps: 80 + 16-48 B, 16 x 32 x 8 warps: 128 + 72).
# With the cap named the same tiles compile clean (sm_89, D = 256: 16 x 16 x 4 warps 168-255 regs, 8 warps
# 92-124; the AOT results in benchmarks/results/aot/*prefix-after.json have every launch). fp16 / bf16
# (tensor cores) keep ptxas's own choice, clean with the tables above.
_DKDV_MAXNREG = launch.Kernel(_dkdv_kernel, configs=_DKDV.configs, smem=_bwd_smem, interpret=_INTERPRET,
                               options=dict(maxnreg=255))
_DELTA = launch.Kernel(
    _delta_kernel, configs=lambda arch, named: [triton.Config(dict(BLOCK_M=64), num_warps=4, num_stages=1)],
    smem=lambda c, named: 0, interpret=dict(BLOCK_M=64), key=(),
)


def _size_key(causal, *sizes):
    # Autotune key: log2 buckets of T, S, P, D packed in one int (the kernels ignore it), plus causality:
    # a new sequence length does not retune, a 16x longer one does.
    return sum(int(s).bit_length() << (6 * i) for i, s in enumerate(sizes)) * 2 + int(causal)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _mask_args(mask, dummy):
    if mask is None:
        return dummy, 0, 0
    m = mask.view(torch.int8)  # bool -> int8 reinterpretation (same itemsize), no copy
    return m, m.stride(0), m.stride(1)


def _window_args(causal: bool, window: tuple[int, int], window_counts_prefix: bool):
    """(WL, WR, LOCAL, PREFIX_LOCAL) from flash-attention style ``window`` (-1: unbounded) and causality."""
    left, right = window
    wl = NO_BOUND if left < 0 else left
    wr = 0 if causal else (NO_BOUND if right < 0 else right)
    local = causal or left >= 0 or right >= 0
    # the prefix is windowed only when a window was asked for and counts it; causality alone never hides
    # the prefix (it precedes every query)
    prefix_local = window_counts_prefix and (left >= 0 or right >= 0)
    return wl, wr, local, prefix_local


def _dropout_args(dropout: tuple[int, int, float]):
    """(seed, uint32 keep threshold, keep scale): tunefast/reference/dropout.py's definitions, computed by the
    op layer; threshold 0 is no dropout."""
    seed, threshold, scale = dropout
    return int(seed), int(threshold), float(scale)


def _bias_args(bias, p_len, dummy):
    """(prefix-part pointer, sequence-part pointer, strides) of a (Hq, T, P + S) bias, or dummies."""
    if bias is None:
        return dummy, dummy, (0, 0, 0)
    return bias, bias[:, :, p_len:], bias.stride()


def attention_forward(q, k, v, pk, pv, mask, causal: bool, scale: float, out, lse,
                      window: tuple[int, int] = (-1, -1), window_counts_prefix: bool = True, bias=None,
                      dropout: tuple[int, int, float] = (0, 0, 1.0)):
    """Fill ``out`` (B, Hq, T, D), any strides, and ``lse`` (B, Hq, T) fp32 contiguous.

    q (B, Hq, T, D), k / v (B, Hkv, S, D), pk / pv (Hkv, P, D), mask (B, S) bool or None; all strided.
    window: (left, right) extents, -1 unbounded (see the module docstring).
    """
    B, HQ, T, D = q.shape
    S, P = k.shape[2], pk.shape[1]
    m, smb, sms = _mask_args(mask, out)
    wl, wr, local, prefix_local = _window_args(causal, window, window_counts_prefix)
    pb, sb, bias_strides = _bias_args(bias, P, out)
    args = (
        q, k, v, pk, pv, m, pb, sb, out, lse,
        T, S, P, D, HQ // k.shape[1],
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), smb, sms, *bias_strides, *out.stride(),
        scale * _LOG2E, wl, wr, *_dropout_args(dropout), _size_key(local, T, S, P, D),
    )
    meta = dict(LOCAL=local, PREFIX_LOCAL=prefix_local, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                DROPOUT=dropout[1] > 0,
                UPCAST=launch.upcast(q, q), PRECISION=launch.precision(q), BLOCK_D=_block_d(D))
    _FWD.launch(lambda mt: (triton.cdiv(T, mt["BLOCK_M"]), HQ, B), args, meta, like=q)


def attention_backward(do, q, k, v, pk, pv, o, lse, mask, causal: bool, scale: float, dq, dk, dv,
                       window: tuple[int, int] = (-1, -1), window_counts_prefix: bool = True, bias=None,
                       dropout: tuple[int, int, float] = (0, 0, 1.0)):
    """Fill dq / dk / dv (strided like q / k / v) and return (dpk, dpv) fp32 (Hkv, P, D), summed over
    the batch in a fixed order (deterministic)."""
    B, HQ, T, D = q.shape
    HKV, S, P = k.shape[1], k.shape[2], pk.shape[1]
    upcast = launch.upcast(q, q)
    block_d = _block_d(D)
    delta = torch.empty((B, HQ, T), device=q.device, dtype=torch.float32)
    _DELTA.launch(lambda mt: (triton.cdiv(T, mt["BLOCK_M"]), HQ, B),
                  (o, do, delta, T, D, *o.stride(), *do.stride()), dict(BLOCK_D=block_d), like=q)
    m, smb, sms = _mask_args(mask, dq)
    wl, wr, local, prefix_local = _window_args(causal, window, window_counts_prefix)
    pb, sb, bias_strides = _bias_args(bias, P, dq)
    common = dict(LOCAL=local, PREFIX_LOCAL=prefix_local, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                  DROPOUT=dropout[1] > 0, UPCAST=upcast,
                  PRECISION=launch.precision(q), BLOCK_D=block_d)
    key = _size_key(local, T, S, P, D)

    def dkdv(keys, values, n_keys, dk_out, dv_out, prefix, bias_part):
        kb = 0 if prefix else keys.stride(0)  # the prefix is read by every batch element
        vb = 0 if prefix else values.stride(0)
        kh, ks, kd = keys.stride()[-3:]
        vh, vs, vd = values.stride()[-3:]
        args = (
            q, keys, values, do, lse, delta, m, bias_part, dk_out, dv_out,
            T, S, n_keys, D, HQ // HKV, HQ, 0 if prefix else P, P + S,
            *q.stride(), kb, kh, ks, kd, vb, vh, vs, vd, *do.stride(), smb, sms, *bias_strides,
            *dk_out.stride(), *dv_out.stride(),
            scale, scale * _LOG2E, wl, wr, *_dropout_args(dropout), key,
        )
        kernel = _DKDV_MAXNREG if launch.elem_bytes(q, upcast) == 4 else _DKDV
        kernel.launch(lambda mt: (triton.cdiv(n_keys, mt["BLOCK_N"]), HKV, B), args, dict(PREFIX=prefix, **common),
                      like=q)

    dpk = torch.zeros((HKV, P, D), device=q.device, dtype=torch.float32)
    dpv = torch.zeros_like(dpk)
    if P > 0:
        # per-batch-element partials, reduced by torch in a fixed order: deterministic, no atomics;
        # (B, Hkv, P, D) fp32 is small next to q (P << T)
        part_k = torch.empty((B, HKV, P, D), device=q.device, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
        dkdv(pk, pv, P, part_k, part_v, True, pb)
        dpk, dpv = part_k.sum(0), part_v.sum(0)
    if S > 0:
        dkdv(k, v, S, dk, dv, False, sb)
    args = (
        q, k, v, pk, pv, do, lse, delta, m, pb, sb, dq,
        T, S, P, D, HQ // HKV,
        *q.stride(), *k.stride(), *v.stride(), *pk.stride(), *pv.stride(), *do.stride(), smb, sms, *bias_strides,
        *dq.stride(),
        scale, scale * _LOG2E, wl, wr, *_dropout_args(dropout), key,
    )
    _DQ.launch(lambda mt: (triton.cdiv(T, mt["BLOCK_M"]), HQ, B), args, common, like=q)
    return dpk, dpv


@launch.aot_examples
def _examples():
    """Every dtype x head-dim class, causal with a prefix, and bidirectional + window + bias + dropout."""
    for dtype, _ in launch.DTYPES[:3]:
        for d in launch.HEAD_DIMS:
            q = torch.empty(2, 8, 300, d, dtype=dtype)
            k, pk = torch.empty(2, 2, 300, d, dtype=dtype), torch.empty(2, 16, d, dtype=dtype)
            mask, bias = torch.ones(2, 300, dtype=torch.bool), torch.empty(8, 300, 316)
            out, lse = torch.empty_like(q), torch.empty(2, 8, 300)
            for extra in (dict(), dict(window=(63, 0), bias=bias, dropout=(1, 1 << 30, 1.5))):
                causal = not extra
                attention_forward(q, k, k, pk, pk, mask, causal, 0.1, out, lse, **extra)
                attention_backward(q, q, k, k, pk, pk, out, lse, mask, causal, 0.1, out, k, k, **extra)

"""Triton kernels for the fused LM-head loss: cross-entropy of hidden W^T without the (N, V) logits.

    y = logit_scale * (h W^T + b),  z = softcap * tanh(y / softcap) (or y),  loss_i = lse(z_i) - z_i[label_i]
    (with label smoothing eps: lse - (1 - eps) z_i[label_i] - eps / V * sum_j z_ij)

Both kernels run on a (row block, vocab tile) grid and form their (BLOCK_N, BLOCK_V) logits tile in
registers from H-chunks of h and W; no logits ever reach global memory.

``_lce_fwd_kernel`` writes, per row and vocab tile, the tile's max and sum of exp(z - max) (and the sum
of z for label smoothing) into (V / PART_V, N) fp32 partials, plus the target logit from the one tile
holding it; the launcher combines the partials into the (N,) log-sum-exp (a split log-sum-exp: every
tile is independent, so a 1k-token batch still fills 132 SMs with V / BLOCK_V tiles).
``_lce_grad_kernel`` recomputes the tile, turns it into d loss / d (h W^T + b) with the saved lse and
the per-row upstream gradient, and adds d W_tile into dh and d^T h into dW (fp32 atomics).

Caution:
  * Atomics: dh gets V / BLOCK_V fp32 additions per element (1,187 at V = 151,936, BLOCK_V = 128) and
    dW N / BLOCK_N, in an arbitrary order: results agree with the reference to fp32 rounding but are
    not bit-reproducible run to run. (The repository's other kernels are deterministic; this one is not.)
  * The grad kernel recomputes the logits: one matmul more than the unfused head, for no (N, V) logits.
  * NEVER RUN ON A GPU in this repository's sessions so far: tested only under TRITON_INTERPRET=1 on
    tiny shapes; configs are sized for sm_80 / sm_89 / sm_90 shared memory but not tuned.
  * Under the interpreter ``tl.dot`` on bf16/fp16 returns garbage: launch.upcast makes those dots fp32.
"""

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import row_vector, tile_matmul, tile_range

GPU_PART_V = 128  # vocab columns per partial slice on a GPU: the smallest BLOCK_V of the forward's configs


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, N, V, H, softcap, logit_scale,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The (BLOCK_N, BLOCK_V) tile of program (row block, vocab tile): (rows, vocab columns, row mask, column
    mask, z, tanh(y / softcap) or z), z the post-processed fp32 logits (padding columns: any value). W is
    read as W^T, a (BLOCK_H, BLOCK_V) tile."""
    rn64, mask_n = tile_range(tl.program_id(0), BLOCK_N, N)
    rv64, mask_v = tile_range(tl.program_id(1), BLOCK_V, V)
    acc = tile_matmul(tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32), h_ptr, w_ptr, rn64, rv64, mask_n, mask_v, H,
                      stride_hn, stride_hh, stride_wh, stride_wv, UPCAST, PRECISION, BLOCK_H)
    if HAS_BIAS:
        acc += row_vector(b_ptr, rv64, mask_v)
    acc = acc * logit_scale
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 for large |x| (exp overflows to inf, or 0)
        t = 1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0)
        return rn64, rv64, mask_n, mask_v, t * softcap, t
    return rn64, rv64, mask_n, mask_v, acc, acc


@triton.jit
def _lce_fwd_kernel(
    # pointers: inputs h (N, H), W (V, H), b (V,), labels (N,); outputs (n_parts, N) partials, target (N,)
    h_ptr, w_ptr, b_ptr, lab_ptr, pmax_ptr, psum_ptr, pzsum_ptr, tgt_ptr,
    # sizes and scalars
    N, V, H, ignore_index, softcap, logit_scale, part_v,
    # strides
    stride_hn, stride_hh, stride_wv, stride_wh,
    size_key,  # autotune key only
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rn64, rv64, mask_n, mask_v, z, _ = _logits_tile(
        h_ptr, w_ptr, b_ptr, N, V, H, softcap, logit_scale, stride_hn, stride_hh, stride_wv, stride_wh,
        HAS_BIAS, SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    pid_v = tl.program_id(1)
    zm = tl.where(mask_v[None, :], z, float("-inf"))
    m = tl.max(zm, axis=1)
    s = tl.sum(tl.exp(zm - m[:, None]), axis=1)
    part = (pid_v * BLOCK_V) // part_v  # this tile's slice (BLOCK_V is a multiple of part_v)
    out = part.to(tl.int64) * N + rn64
    tl.store(pmax_ptr + out, m, mask=mask_n)
    tl.store(psum_ptr + out, s, mask=mask_n)
    if SMOOTH:
        tl.store(pzsum_ptr + out, tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1), mask=mask_n)
    lab = tl.load(lab_ptr + rn64, mask=mask_n, other=ignore_index).to(tl.int64)
    hit = (rv64[None, :] == lab[:, None]) & mask_v[None, :]
    picked = tl.sum(tl.where(hit, z, 0.0), axis=1)
    tl.store(tgt_ptr + rn64, picked, mask=mask_n & (lab >= pid_v * BLOCK_V) & (lab < pid_v * BLOCK_V + BLOCK_V))


@triton.jit
def _lce_grad_kernel(
    # pointers: inputs h, W, b, labels, lse (N,), upstream grad per row; fp32 outputs dh (N, H), dW (V, H), db (V,)
    h_ptr, w_ptr, b_ptr, lab_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    # sizes and scalars
    N, V, H, ignore_index, softcap, logit_scale, smoothing,
    # strides (stride_g 0: one upstream scalar for every row)
    stride_hn, stride_hh, stride_wv, stride_wh, stride_g,
    size_key,  # autotune key only
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rn64, rv64, mask_n, mask_v, z, t = _logits_tile(
        h_ptr, w_ptr, b_ptr, N, V, H, softcap, logit_scale, stride_hn, stride_hh, stride_wv, stride_wh,
        HAS_BIAS, SOFTCAP, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    lab = tl.load(lab_ptr + rn64, mask=mask_n, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + rn64, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + rn64 * stride_g, mask=mask_n, other=0.0).to(tl.float32)
    g = tl.where(lab != ignore_index, g, 0.0)
    d = tl.exp(z - lse[:, None]) - smoothing / V
    d -= tl.where(rv64[None, :] == lab[:, None], 1.0 - smoothing, 0.0)
    d = tl.where(mask_v[None, :], d * g[:, None], 0.0)
    if SOFTCAP:
        d = d * (1.0 - t * t)
    d = d * logit_scale
    if NEED_DB:
        tl.atomic_add(db_ptr + rv64, tl.sum(d, axis=0), mask=mask_v)
    d_dot = d.to(tl.float32) if UPCAST else d.to(w_ptr.dtype.element_ty)
    rh = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + rh
        hmask = cols < H
        if NEED_DH:
            w = tl.load(w_ptr + rv64[:, None] * stride_wv + cols[None, :] * stride_wh,
                        mask=mask_v[:, None] & hmask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            part = tl.dot(d_dot, w, input_precision=PRECISION)  # (BLOCK_N, BLOCK_H)
            tl.atomic_add(dh_ptr + rn64[:, None] * H + cols[None, :], part, mask=mask_n[:, None] & hmask[None, :])
        if NEED_DW:
            h = tl.load(h_ptr + rn64[:, None] * stride_hn + cols[None, :] * stride_hh,
                        mask=mask_n[:, None] & hmask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            part = tl.dot(tl.trans(d_dot), h, input_precision=PRECISION)  # (BLOCK_V, BLOCK_H)
            tl.atomic_add(dw_ptr + rv64[:, None] * H + cols[None, :], part, mask=mask_v[:, None] & hmask[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch configuration (kernels/launch.py holds the rules)
# ----------------------------------------------------------------------------------------------------


def _cfg(shapes):
    return [triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_H=h), num_warps=w, num_stages=st) for n, v, h, w, st in shapes]


# (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages); the first of each list is the fixed config. Sized from the
# AOT check (triton 3.8, ptxas): with (64, 128, 64) at 4 warps the grad kernel used 255 registers and
# spilled 1.4 KB on sm_80/89 in bf16 and ~80 KB in fp32 (fp32 dots hold both operands as fp32), so the
# fixed configs halve the H chunk and double the warps, and fp32 takes 32-row tiles.
def _fwd_configs(arch, named):
    if launch.elem_bytes(named["h_ptr"], named["UPCAST"]) == 4:
        return _cfg([(32, 128, 32, 8, 2), (32, 128, 32, 4, 2)])
    return _cfg([(64, 128, 64, 4, 3), (64, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3)])


def _grad_configs(arch, named):
    if launch.elem_bytes(named["h_ptr"], named["UPCAST"]) == 4:
        # fp32 on 8 warps: on 4 warps the 16 x 64 tile spilled 8 B at 128 registers on sm_90 with triton 3.6
        # (8 warps: 68 registers, clean)
        return _cfg([(16, 64, 32, 8, 2), (16, 64, 32, 4, 2), (32, 64, 16, 4, 2)])
    return _cfg([(64, 128, 32, 8, 2), (64, 64, 64, 4, 3), (32, 128, 64, 4, 2)])


def _fwd_smem(c, named):
    kw = c.kwargs
    elem = launch.elem_bytes(named["h_ptr"], named["UPCAST"])
    return launch.pipeline_smem(c, (kw["BLOCK_N"], kw["BLOCK_H"]), (kw["BLOCK_H"], kw["BLOCK_V"]), elem=elem)


def _grad_smem(c, named):
    kw = c.kwargs
    elem = launch.elem_bytes(named["h_ptr"], named["UPCAST"])
    tiles = (kw["BLOCK_N"], kw["BLOCK_H"]), (kw["BLOCK_H"], kw["BLOCK_V"])  # logits recompute, then dh / dW
    return launch.pipeline_smem(c, *tiles, elem=elem) + (kw["BLOCK_N"] + kw["BLOCK_H"]) * kw["BLOCK_V"] * 4


_INTERPRET = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)
_FWD = launch.Kernel(_lce_fwd_kernel, configs=_fwd_configs, smem=_fwd_smem, interpret=dict(_INTERPRET),
                     restore=("pmax_ptr", "psum_ptr", "pzsum_ptr"))
_GRAD = launch.Kernel(_lce_grad_kernel, configs=_grad_configs, smem=_grad_smem, interpret=dict(_INTERPRET),
                      restore=("dh_ptr", "dw_ptr", "db_ptr"))


def _grid(n, v):
    return lambda c: (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(v, c["BLOCK_V"]))


def _lse_and_losses(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing):
    """(lse (N,) fp32, row losses (N,) fp32, 0 at ignored rows)."""
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    part_v = GPU_PART_V if launch.on_gpu(hidden) else _FWD.interpret["BLOCK_V"]
    n_parts = triton.cdiv(vocab, part_v)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    pmax = torch.full((n_parts, n), float("-inf"), **f32)
    psum = torch.zeros((n_parts, n), **f32)
    pzsum = torch.zeros((n_parts, n), **f32) if label_smoothing else psum
    tgt = torch.zeros(n, **f32)
    if n:
        args = (hidden, weight, bias if bias is not None else hidden, labels, pmax, psum, pzsum, tgt,
                n, vocab, hdim, ignore_index, float(softcap), float(logit_scale), part_v,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), launch.size_key(n, vocab, hdim))
        meta = dict(HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), SMOOTH=bool(label_smoothing),
                    UPCAST=launch.upcast(hidden, weight), PRECISION=launch.precision(hidden))
        _FWD.launch(_grid(n, vocab), args, meta, like=hidden)
    m = pmax.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    lse = m_safe + (psum * torch.exp(pmax - m_safe)).sum(0).log()
    rows = lse - (1.0 - label_smoothing) * tgt
    if label_smoothing:
        rows = rows - (label_smoothing / vocab) * pzsum.sum(0)
    return lse, torch.where(labels != ignore_index, rows, 0.0)


def _grads(grad_rows, hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale, label_smoothing,
           need_dh, need_dw, need_db):
    n, hdim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    dh = torch.zeros((n, hdim), **f32) if need_dh else None
    dw = torch.zeros((vocab, hdim), **f32) if need_dw else None
    db = torch.zeros(vocab, **f32) if need_db else None
    if n:
        dummy = lse
        args = (hidden, weight, bias if bias is not None else hidden, labels, lse, grad_rows,
                dh if dh is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
                n, vocab, hdim, ignore_index, float(softcap), float(logit_scale), float(label_smoothing),
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                grad_rows.stride(0) if grad_rows.dim() else 0, launch.size_key(n, vocab, hdim))
        meta = dict(HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), NEED_DH=need_dh, NEED_DW=need_dw,
                    NEED_DB=need_db, UPCAST=launch.upcast(hidden, weight), PRECISION=launch.precision(hidden))
        _GRAD.launch(_grid(n, vocab), args, meta, like=hidden)
    return (dh.to(hidden.dtype) if dh is not None else None, dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None)


def forward(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing,
            reduce_sum, need_dh, need_dw, need_db, chunk_rows=None):
    """Same contract as tunefast/reference/linear_cross_entropy.forward (chunk_rows is unused: tiles)."""
    lse, rows = _lse_and_losses(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing)
    if not reduce_sum:
        return rows, lse, None, None, None
    dh = dw = db = None
    if need_dh or need_dw or need_db:
        one = torch.ones((), device=hidden.device, dtype=torch.float32)
        dh, dw, db = _grads(one, hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale,
                            label_smoothing, need_dh, need_dw, need_db and bias is not None)
    return rows.sum(), lse, dh, dw, db


def backward(grad_rows, hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale, label_smoothing,
             need_dh, need_dw, need_db, chunk_rows=None):
    """Same contract as tunefast/reference/linear_cross_entropy.backward."""
    return _grads(grad_rows.float().contiguous(), hidden, weight, bias, labels, lse, ignore_index, softcap,
                  logit_scale, label_smoothing, need_dh, need_dw, need_db and bias is not None)


@launch.aot_examples
def _examples():
    for act, _ in launch.DTYPES[:3]:  # the op takes hidden and weight of one dtype
        for hdim, vocab, bias, softcap in ((896, 1000, False, 0.0), (4096, 1000, True, 30.0)):  # V only sizes the grid
            h = torch.zeros(4, hdim, dtype=act)
            w = torch.zeros(vocab, hdim, dtype=act)
            b = torch.zeros(vocab, dtype=act) if bias else None
            labels = torch.zeros(4, dtype=torch.int64)
            forward(h, w, b, labels, -100, softcap, 1.0, 0.1, True, True, True, bias)

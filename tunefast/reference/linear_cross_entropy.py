"""Plain-PyTorch math of the fused LM-head loss: the CPU path and the test oracle.

Shapes (N tokens, H hidden size, V vocabulary):
    hidden (N, H), weight (V, H), bias (V,) | None, labels (N,) int64 (``ignore_index`` to skip a row)

    y = logit_scale * (hidden weight^T + bias)            (Cohere's logit scale; 1 for most models)
    z = softcap * tanh(y / softcap)                        (Gemma-2's final logit softcapping; or z = y)
    loss_i = lse(z_i) - (1 - eps) z_i[labels_i] - (eps / V) sum_j z_ij      (0 where labels_i is ignored)

which is ``F.cross_entropy(z, labels, ignore_index=..., label_smoothing=eps, reduction="none")`` on the
materialised fp32 logits. Rows are processed ``chunk_rows`` at a time, so at most one (chunk_rows, V)
block of logits exists; it is turned into d loss / d logits in place.

Numerics follow the unfused Hugging Face chain: ``hidden weight^T + bias`` in the inputs' dtype (the
LM head's nn.Linear), then fp32 for everything after it (HF's loss upcasts the logits); the gradient
of the logits is cast back to the inputs' dtype for the two matmuls, as autograd does there, and the
weight gradient is accumulated over chunks in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits formed at once: 16M fp32 = 64 MiB (524 rows at V = 32,000), but never fewer than MIN_ROWS rows:
# each chunk's two matmuls stream the whole (V, H) weight, and on one CPU thread at V = 151,936, H = 896
# they took 9.9 / 9.1 / 8.1 / 7.8 ms per row at 64 / 110 / 220 / 441 rows (110 rows made the fused loss
# ~7 % slower than the unfused head; 256 rows is 148 MiB of fp32 logits at that vocabulary).
CHUNK_ELEMENTS = 1 << 24
MIN_ROWS = 256


def default_chunk_rows(n: int, vocab: int) -> int:
    return max(1, min(max(n, 1), max(MIN_ROWS, CHUNK_ELEMENTS // max(vocab, 1))))


def _logits(h_c, weight, bias, softcap, logit_scale):
    """(z fp32 (c, V), tanh(y / softcap) or None): the post-processed logits of one chunk."""
    z = F.linear(h_c, weight, bias).float()
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if not softcap:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _row_losses(logp, t_safe, valid, label_smoothing):
    """Row losses from the chunk's log-probabilities: -(1 - eps) logp[label] - eps / V sum_j logp_j,
    which equals lse - (1 - eps) z[label] - eps / V sum_j z_j."""
    picked = logp.gather(1, t_safe[:, None])[:, 0]
    if label_smoothing:
        rows = -(1.0 - label_smoothing) * picked - (label_smoothing / logp.shape[1]) * logp.sum(1)
    else:
        rows = -picked
    return torch.where(valid, rows, 0.0)


def _dlogits_(p, t, t_safe, valid, grad_rows, label_smoothing, softcap, logit_scale):
    """d loss / d (hidden weight^T + bias), in place in ``p`` (the chunk's softmax): the gradient of
    sum_i grad_rows_i loss_i, or of sum_i loss_i when ``grad_rows`` is None."""
    if label_smoothing:
        p.sub_(label_smoothing / p.shape[1])
    p[torch.arange(p.shape[0], device=p.device), t_safe] -= 1.0 - label_smoothing
    if grad_rows is not None:
        p.mul_(torch.where(valid, grad_rows, 0.0)[:, None])
    elif not bool(valid.all()):  # zero only the ignored rows: a full multiply is one more pass over (c, V)
        p[~valid] = 0.0
    if t is not None:  # d/dy softcap tanh(y / softcap) = 1 - tanh^2
        p.mul_(1.0 - t.square_())
    if logit_scale != 1.0:
        p.mul_(logit_scale)
    return p


def forward(hidden, weight, bias, labels, ignore_index, softcap, logit_scale, label_smoothing,
            reduce_sum, need_dh, need_dw, need_db, chunk_rows):
    """(loss, lse (N,) fp32, dhidden | None, dweight | None, dbias | None).

    loss: 0-d fp32 sum over rows when ``reduce_sum``, else the (N,) fp32 row losses. The gradients
    (of the summed loss) are formed in the same pass, only when ``reduce_sum``: backward then only
    scales them, and nothing of size V is kept (see ops/linear_cross_entropy.py).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    grads = reduce_sum and (need_dh or need_dw or need_db)
    rows_loss = torch.empty(n, device=dev, dtype=torch.float32)
    lse = torch.empty(n, device=dev, dtype=torch.float32)
    dh = torch.empty_like(hidden) if grads and need_dh else None
    dw = torch.zeros(weight.shape, device=dev, dtype=torch.float32) if grads and need_dw else None
    db = torch.zeros(vocab, device=dev, dtype=torch.float32) if grads and need_db else None
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(n, r0 + chunk_rows))
        h_c, lab = hidden[rows], labels[rows]
        valid = lab != ignore_index
        t_safe = torch.where(valid, lab, 0)
        z, t = _logits(h_c, weight, bias, softcap, logit_scale)
        # One fused log_softmax instead of logsumexp + (z - lse).exp(): at 110 x 151,936 logits on one
        # CPU thread 54 ms against 70 + 57 ms. lse is read off at each row's maximum, where |logp| is
        # at most log(V): exact to fp32 rounding however small other logits are.
        logp = torch.log_softmax(z, 1)
        zmax, at = z.max(1)
        del z
        lse[rows] = zmax - logp.gather(1, at[:, None])[:, 0]
        rows_loss[rows] = _row_losses(logp, t_safe, valid, label_smoothing)
        if grads:
            g = _dlogits_(logp.exp_(), t, t_safe, valid, None, label_smoothing, softcap, logit_scale)
            _accumulate(g, h_c, weight, dh, dw, db, rows)
    loss = rows_loss.sum() if reduce_sum else rows_loss
    return (loss, lse, dh, _cast(dw, weight), _cast(db, bias))


def backward(grad_rows, hidden, weight, bias, labels, lse, ignore_index, softcap, logit_scale, label_smoothing,
             need_dh, need_dw, need_db, chunk_rows):
    """(dhidden | None, dweight | None, dbias | None) of sum_i grad_rows_i loss_i, recomputing the
    logits chunk by chunk from ``lse`` (the reduction="none" path). grad_rows: (N,) fp32."""
    n = hidden.shape[0]
    dev = hidden.device
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, device=dev, dtype=torch.float32) if need_dw else None
    db = torch.zeros(weight.shape[0], device=dev, dtype=torch.float32) if need_db else None
    for r0 in range(0, n, chunk_rows):
        rows = slice(r0, min(n, r0 + chunk_rows))
        lab = labels[rows]
        valid = lab != ignore_index
        z, t = _logits(hidden[rows], weight, bias, softcap, logit_scale)
        g = _dlogits_(z.sub_(lse[rows, None]).exp_(), t, torch.where(valid, lab, 0), valid, grad_rows[rows].float(),
                      label_smoothing, softcap, logit_scale)
        _accumulate(g, hidden[rows], weight, dh, dw, db, rows)
    return dh, _cast(dw, weight), _cast(db, bias)


def _accumulate(g, h_c, weight, dh, dw, db, rows):
    g_low = g.to(weight.dtype)
    if dh is not None:
        dh[rows] = (g_low @ weight).to(dh.dtype)
    if dw is not None:
        dw += (g_low.t() @ h_c.to(weight.dtype)).float()
    if db is not None:
        db += g.sum(0)


def _cast(grad, like):
    return grad.to(like.dtype) if grad is not None else None

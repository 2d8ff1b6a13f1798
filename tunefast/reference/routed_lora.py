"""Token-routed multi-adapter LoRA, plain PyTorch: the CPU path and the oracle.

    y_t = x_t W^T + b + s_a * (drop_a(x_t) A_a^T) B_a^T,   a = adapter_ids[t]  (-1: base model only)

Tokens are sorted by adapter once (a stable argsort); each adapter then works on one contiguous
segment, so the adapters together cost one LoRA pass over the batch plus a gather of x and a scatter
of y — not one pass over the whole batch per adapter (PEFT's mixed-batch loop indexes per adapter).

Dropout offsets are those of the *sorted* x: token at sorted position i, feature j has offset
i * K + j, with the adapter's own seed. Forward and backward sort identically, so they draw the same
mask; the mask of a token therefore depends on the batch's routing, which is fine for dropout.

Shapes: x2d (M, K), weight (N, K), lora_a[a] (r_a, K), lora_b[a] (N, r_a), adapter_ids (M,) int64,
xa_sorted (M, max r_a): row i holds the down-projection of sorted token i (its adapter's first r_a
columns; zeros elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import apply_dropout


def segments(adapter_ids: torch.Tensor, n_adapters: int) -> tuple[torch.Tensor, list[int]]:
    """(order, bounds): sorted positions bounds[a + 1] : bounds[a + 2] hold adapter a's tokens
    (bounds[0] : bounds[1] the base-only tokens, id -1). One host sync for the counts."""
    order = torch.argsort(adapter_ids, stable=True)
    counts = torch.bincount(adapter_ids + 1, minlength=n_adapters + 1).tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return order, bounds


def sort_rows(adapter_ids: torch.Tensor, n_adapters: int, *tensors):
    """(order, bounds, *sorted): each (M, ...) tensor's rows gathered into segment order (None stays None)."""
    order, bounds = segments(adapter_ids, n_adapters)
    return (order, bounds, *(None if t is None else t.index_select(0, order) for t in tensors))


def unsort_rows(rows: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    """Segment-ordered rows back in token order (None stays None)."""
    if rows is None:
        return None
    out = torch.empty_like(rows)
    out[order] = rows
    return out


def _seed(seeds, a) -> int:
    return 0 if seeds is None else int(seeds[a])


def forward(x2d, weight, bias, lora_a, lora_b, scalings, dropout_p, seeds, adapter_ids):
    """Return (y2d (M, N), xa_sorted (M, max r))."""
    order, bounds, xs = sort_rows(adapter_ids, len(lora_a), x2d)
    ys = F.linear(xs, weight, bias)
    r_max = max(a.shape[0] for a in lora_a)
    xa_sorted = xs.new_zeros((xs.shape[0], r_max), dtype=lora_a[0].dtype)
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        st, en = bounds[i + 1], bounds[i + 2]
        if st == en:
            continue
        xa = apply_dropout(xs[st:en].to(a.dtype), _seed(seeds, i), p, row_start=st) @ a.t()
        xa_sorted[st:en, : a.shape[0]] = xa
        ys[st:en] = (ys[st:en] + (xa @ b.t()) * s).to(ys.dtype)
    return unsort_rows(ys, order), xa_sorted


def backward(dy2d, x2d, weight, lora_a, lora_b, xa_sorted, scalings, dropout_p, seeds, adapter_ids,
             need_dx, need_da, need_db):
    """Gradients (dx (M, K) or None, [dA_a] or None, [dB_a] or None)."""
    order, bounds, dys, xs = sort_rows(adapter_ids, len(lora_a), dy2d, x2d if need_da else None)
    dxs = dys @ weight if need_dx else None
    das, dbs = [], []
    for i, (a, b, s, p) in enumerate(zip(lora_a, lora_b, scalings, dropout_p)):
        st, en = bounds[i + 1], bounds[i + 2]
        seed, r = _seed(seeds, i), a.shape[0]
        dyl = dys[st:en].to(b.dtype)
        if need_db:
            dbs.append((dyl.t() @ xa_sorted[st:en, :r]).mul_(s))
        dxa = (dyl @ b).mul_(s)
        if need_da:
            das.append(dxa.t() @ apply_dropout(xs[st:en].to(a.dtype), seed, p, row_start=st))
        if need_dx and en > st:
            dxs[st:en] += apply_dropout(dxa @ a, seed, p, row_start=st).to(dxs.dtype)
    return unsort_rows(dxs, order), (das if need_da else None), (dbs if need_db else None)

"""Plain-PyTorch math of the LoRA-on-embedding op: the CPU path and the test oracle.

    y = E[ids] + s * A^T[ids] B^T

Shapes (M = number of ids): ids (M,) int64, weight E (V, N) frozen, lora_a A (r, V), lora_b B (N, r).
A^T[ids] (M, r) is a gather of A's columns (no down-projection GEMM); it is regathered in backward
rather than kept, so the bytes kept are the ids alone.

Backward, with dh = s * dy B (M, r):
  dB   = s * dy^T A^T[ids]                         (N, r)
  dA^T = index_add over ids of dh, per row          (V, r): no dense (V, r) temporary per token
         (row ``padding_idx`` gets no gradient; with ``scale_grad_by_freq`` each token's row is divided by
         its id's count in the batch, as nn.Embedding does)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather(ids: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """A^T[ids] (M, r), contiguous."""
    return F.embedding(ids, lora_a.t())


def forward(ids, weight, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """y (M, N) in weight's dtype."""
    return torch.addmm(F.embedding(ids, weight), gather(ids, lora_a), lora_b.t(), alpha=scaling)


def scatter_rows(ids, dh, vocab: int, padding_idx: int, scale_grad_by_freq: bool, dtype) -> torch.Tensor:
    """dA (r, V) from the per-token row gradients dh (M, r): index_add into A^T's rows, accumulated in fp32.

    ``padding_idx`` < 0 means none."""
    dh = dh.float()
    if scale_grad_by_freq:
        counts = torch.bincount(ids, minlength=vocab)
        dh = dh / counts[ids].unsqueeze(-1)
    rows = torch.zeros((vocab, dh.shape[1]), device=dh.device, dtype=torch.float32).index_add_(0, ids, dh)
    if padding_idx >= 0:
        rows[padding_idx] = 0
    return rows.t().to(dtype)


def backward(dy, ids, lora_a, lora_b, scaling, padding_idx, scale_grad_by_freq, need_da, need_db):
    """(dA (r, V) | None, dB (N, r) | None)."""
    da = db = None
    if need_db:
        db = (dy.t() @ gather(ids, lora_a)).mul_(scaling)
    if need_da:
        dh = (dy @ lora_b).mul_(scaling)
        da = scatter_rows(ids, dh, lora_a.shape[1], padding_idx, scale_grad_by_freq, lora_a.dtype)
    return da, db

"""Small helpers shared by the ops."""

from __future__ import annotations

import torch
from torch import Tensor


def rows_to_shape(t2d: Tensor, lead: tuple[int, ...]) -> Tensor:
    """``t2d`` (M, N) as (*lead, N) over the same memory, as a tensor that is not a view.

    An op's output that is a view of one of its own intermediates makes autograd refuse in-place ops on
    it ("Output 0 of ... is a view and is being modified inplace"): ``nn.ReLU(inplace=True)`` or
    ``y += residual`` after a patched layer would fail where PEFT trains. Re-pointing a fresh tensor at the
    storage (no copy) gives a base tensor instead.
    """
    shape = (*lead, t2d.shape[-1])
    if t2d.dim() == len(shape) and t2d._base is None:
        return t2d
    view = t2d.view(shape)
    out = torch.empty((0,), dtype=t2d.dtype, device=t2d.device)
    return out.set_(t2d.untyped_storage(), t2d.storage_offset(), shape, view.stride())


def save_named(ctx, **groups) -> None:
    """``ctx.save_for_backward`` by name: each value a tensor, None, or a list of tensors (one group).
    :func:`saved_named` gives them back by the same names, so backward never slices by position."""
    flat, layout = [], []
    for name, value in groups.items():
        if isinstance(value, (list, tuple)):
            layout.append((name, len(value)))
            flat.extend(value)
        else:
            layout.append((name, None))
            flat.append(value)
    ctx.save_for_backward(*flat)
    ctx.saved_layout = layout


def saved_named(ctx) -> dict:
    """Name -> tensor (or list of tensors) saved by :func:`save_named`."""
    flat, out, i = ctx.saved_tensors, {}, 0
    for name, count in ctx.saved_layout:
        if count is None:
            out[name] = flat[i]
            i += 1
        else:
            out[name] = list(flat[i : i + count])
            i += count
    return out

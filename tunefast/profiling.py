"""Device-independent memory accounting: the bytes autograd keeps for backward.

Counted as the unique storages packed by ``torch.autograd.graph.saved_tensors_hooks`` during a forward,
parameters (and anything else passed in ``exclude``) left out: what a training step holds between
forward and backward beyond the model itself. Views of one storage count once, at the storage's size.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    """data_ptrs of the untyped storages behind ``tensors`` (views share their base's)."""
    out = set()
    for t in tensors:
        try:
            out.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            pass
    return out


class SavedTensors:
    """Context manager recording the storages autograd saves; read ``.bytes`` / ``.tensors`` after.

    ``exclude``: tensors (parameters, buffers) or storage data_ptrs whose storages do not count. A
    storage counts once however many saved tensors view it, and in full (its nbytes), since keeping
    any view keeps all of it alive; saved tensors are held so no address is reused during the count.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] | set[int] = ()):
        exclude = list(exclude)
        self._excluded = {e for e in exclude if isinstance(e, int)} | storage_ptrs(
            e for e in exclude if isinstance(e, torch.Tensor))
        self._storages: dict[int, torch.Tensor] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        if key and key not in self._excluded and key not in self._storages:
            self._storages[key] = t
        return t

    def __enter__(self) -> "SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._storages.values())

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self._storages.values())


def saved_activation_bytes(forward: Callable[[], object], module: torch.nn.Module | None = None) -> int:
    """Bytes kept for backward by ``forward()``, excluding ``module``'s parameters and buffers."""
    exclude = [*module.parameters(), *module.buffers()] if module is not None else []
    with SavedTensors(exclude) as rec:
        out = forward()
    del out
    return rec.bytes

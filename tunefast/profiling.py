"""Device-independent memory accounting: the bytes autograd keeps for backward.

Counted as the unique storages packed by ``torch.autograd.graph.saved_tensors_hooks`` during a forward,
parameters (and anything else passed in ``exclude``) left out: what a training step holds between
forward and backward beyond the model itself. Views of one storage count once, at the storage's size.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class SavedTensors:
    """Context manager recording the storages autograd saves; read ``.bytes`` / ``.tensors`` after."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude if t.device.type != "meta"}
        self._storages: dict[int, torch.Tensor] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in self._excluded and key not in self._storages:
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

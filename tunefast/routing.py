"""Per-token adapter routing for patched models: a different LoRA adapter for each token or sequence.

    with tunefast.route(model, token_modality, adapters=["text", "image"]):
        out = model(**batch)          # token t uses adapters[token_modality[t]]; -1 = base model

Inside the block every patched LoRA layer runs the token-routed op (tunefast/ops/routed_lora.py):
training and inference, each adapter receiving the gradients of its own tokens. Layers that lack one
of the adapters treat its tokens as base-model tokens. PEFT's own ``model(..., adapter_names=[...])``
mixed batches take the same op on a patched model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

# A plain list, not a ContextVar: torch.compile traces reads of a module global (and guards on them),
# but graph-breaks on ContextVar.get. Routing is therefore per process, not per thread.
_ROUTING: list[tuple[list[str], torch.Tensor]] = []


def current_routing():
    """(adapter names, ids) of the innermost :func:`route` block, or None."""
    return _ROUTING[-1] if _ROUTING else None


@contextmanager
def route(model: nn.Module, adapter_ids: torch.Tensor, adapters: Sequence[str]):
    """Route tokens to adapters inside the ``with`` block.

    Args:
        model: a model patched by :func:`tunefast.patch` whose LoRA layers hold ``adapters``.
        adapter_ids: integer tensor, one id per token (shape = the LoRA layers' input shape without
            the feature dim, e.g. (batch, seq)) or per sequence (batch,); values in [-1, len(adapters)).
        adapters: adapter names; id i selects ``adapters[i]``.
    """
    from .patching import get_report

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if get_report(model) is None:
        raise ValueError("model is not patched: call tunefast.patch(model) before tunefast.route(...)")
    adapters = list(adapters)
    known = {name for m in model.modules() if hasattr(m, "lora_A") for name in m.lora_A}
    missing = [a for a in adapters if a not in known]
    if not adapters or missing:
        raise ValueError(f"adapters must name LoRA adapters of the model; unknown: {missing or '(empty list)'}; "
                         f"known: {sorted(known)}")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.is_floating_point():
        raise TypeError("adapter_ids must be an integer tensor")
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= len(adapters)):
        raise ValueError(f"adapter_ids must be in [-1, {len(adapters)}) for {len(adapters)} adapters; got values in "
                         f"[{int(adapter_ids.min())}, {int(adapter_ids.max())}]")
    _ROUTING.append((adapters, adapter_ids.long()))
    try:
        yield
    finally:
        _ROUTING.pop()

"""Per-token adapter routing for patched models: a different LoRA adapter for each token or sequence.

    with tunefast.route(model, token_modality, adapters=["text", "image"]):
        out = model(**batch)          # token t uses adapters[token_modality[t]]; -1 = base model
    out.loss.backward()               # may run after the block, also with gradient checkpointing

Inside the block every patched LoRA layer of ``model`` runs the token-routed op
(tunefast/ops/routed_lora.py): training and inference, each adapter receiving the gradients of its own
tokens. Layers that lack one of the adapters treat its tokens as base-model tokens.

Scope: the route belongs to ``model`` and to the thread that entered the block. Other models (a teacher
in distillation) and forwards in other threads are unaffected. Layers checkpointed through transformers'
gradient checkpointing recompute under the same route during backward, after the block too. A LoRA
layer of ``model`` that cannot run routed (DoRA, ``lora_bias``, LoRA on embeddings or other layer types,
a layer left on PEFT's forward) makes ``route`` raise, naming it, rather than apply its active adapter
to every token.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .patching import get_report
from .patching.registry import is_patched
from .patching.state import root_state, wrap_checkpointing


def _unroutable_layers(model: nn.Module, adapters: list[str]) -> list[str]:
    from .patching.lora import routable

    bad = []
    for name, m in model.named_modules():
        held = getattr(m, "lora_A", None)
        if not isinstance(held, nn.ModuleDict) or not any(a in held for a in adapters):
            continue
        why = routable(m, adapters) if is_patched(m) else "not patched by tunefast (see the report)"
        if why:
            bad.append(f"{name or type(m).__name__}: {why}")
    return bad


@contextmanager
def route(model: nn.Module, adapter_ids: torch.Tensor, adapters: Sequence[str]):
    """Route tokens to adapters inside the ``with`` block.

    Args:
        model: a model patched by :func:`tunefast.patch` whose LoRA layers hold ``adapters``.
        adapter_ids: integer tensor, one id per token (shape = the LoRA layers' input shape without
            the feature dim, e.g. (batch, seq)) or per sequence (batch,); values in [-1, len(adapters)).
        adapters: adapter names; id i selects ``adapters[i]``.

    Raises:
        ValueError: ``model`` is not patched, an adapter is unknown, ids are out of range, or a LoRA layer
            holding one of ``adapters`` cannot run routed (the message names each such layer and why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if get_report(model) is None:
        raise ValueError("model is not patched: call tunefast.patch(model) before tunefast.route(...)")
    state = root_state(model)
    if isinstance(adapters, (str, torch.Tensor)):
        raise TypeError(f"adapters must be a list of adapter names, got {type(adapters).__name__}")
    adapters = list(adapters)
    known = {name for m in model.modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
             for name in m.lora_A}
    missing = [a for a in adapters if a not in known]
    if not adapters or missing:
        raise ValueError(f"adapters must name LoRA adapters of the model; unknown: {missing or '(empty list)'}; "
                         f"known: {sorted(known)}")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.is_floating_point() or adapter_ids.is_complex():
        raise TypeError(f"adapter_ids must be an integer tensor, got {type(adapter_ids).__name__}"
                        + (f" of {adapter_ids.dtype}" if isinstance(adapter_ids, torch.Tensor) else ""))
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= len(adapters)):
        raise ValueError(f"adapter_ids must be in [-1, {len(adapters)}) for {len(adapters)} adapters; got values in "
                         f"[{int(adapter_ids.min())}, {int(adapter_ids.max())}]")
    bad = _unroutable_layers(model, adapters)
    if bad:
        raise ValueError("tunefast.route cannot route these LoRA layers (they would apply their active adapter to "
                         "every token):\n  " + "\n  ".join(bad))
    wrap_checkpointing(model, state)
    with state.routed((adapters, adapter_ids.long())):
        yield

"""Which entries each targeted layer trains: random, largest magnitude, largest accumulated gradient.

Every function returns, per layer, strictly increasing int64 flat positions r * K + c in the logical
(out_features, in_features) weight. Memory: random selection is O(nnz); magnitude and gradient
selection hold one layer's dense (N, K) score at a time (``gradient_chunk_layers`` of them for the
gradient, which needs one pass over the batches per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .layer import SparseLinear, weight_nk


def entries(density: float, shape: tuple[int, int]) -> int:
    return max(1, round(density * shape[0] * shape[1]))


def random_indices(numel: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random nnz-subset of range(numel), sorted, in O(nnz) memory (no randperm(numel))."""
    if 4 * nnz >= numel:
        return torch.randperm(numel, generator=generator)[:nnz].sort().values
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < nnz:  # draws with replacement; the distinct ones are a uniform random set
        draw = torch.randint(0, numel, (int(1.25 * (nnz - picked.numel())) + 16,), generator=generator)
        picked = torch.unique(torch.cat([picked, draw]))
    keep = torch.randperm(picked.numel(), generator=generator)[:nnz]
    return picked[keep].sort().values


def top_indices(score: torch.Tensor, nnz: int) -> torch.Tensor:
    """Positions of the nnz largest entries of a flat score, sorted."""
    return torch.topk(score, nnz, sorted=False).indices.sort().values


def magnitude_indices(layer: nn.Module, nnz: int) -> torch.Tensor:
    return top_indices(weight_nk(layer).detach().abs().reshape(-1), nnz).cpu()


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, SparseLinear) else module


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Hugging Face style: ``model(**batch).loss`` (the batch holds labels)."""
    if not isinstance(batch, Mapping):
        raise TypeError("gradient selection without loss_fn needs batches that are dicts of model inputs with "
                        f"labels (model(**batch).loss); got a {type(batch).__name__}: pass "
                        "loss_fn=(model, batch) -> loss")
    out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out["loss"] if isinstance(out, Mapping) else None
    if loss is None:
        raise ValueError("model(**batch) returned no loss: include labels in the batches or pass loss_fn")
    return loss


def gradient_indices(model: nn.Module, layers: list[tuple[str, nn.Module, int]], batches: Iterable,
                     loss_fn: Callable | None, chunk_layers: int) -> dict[str, torch.Tensor]:
    """Per layer, the nnz entries with the largest |sum over batches of dL/dW|.

    ``layers``: (qualified name, module, nnz). For each chunk of ``chunk_layers`` layers the batches are
    run once: hooks make each chunk layer's input a leaf that requires grad (if nothing upstream does),
    ``torch.autograd.grad`` returns dL/dy at the layer outputs only (no parameter gradients anywhere),
    and dy^T x is added into the layer's fp32 score in place. Scores of other chunks do not exist yet.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("gradient selection needs at least one batch: apply(model, config, batches=[...])")
    loss_fn = loss_fn or default_loss
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(layers), chunk_layers):
        chunk = layers[start : start + chunk_layers]
        scores = {}
        calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        handles = []
        for name, module, _ in chunk:
            w = weight_nk(_base(module))
            scores[name] = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
            handles.append(module.register_forward_pre_hook(_leaf_input))
            handles.append(module.register_forward_hook(_recorder(calls.setdefault(name, []))))
        try:
            with torch.enable_grad():
                for batch in batches:
                    loss = loss_fn(model, batch)
                    recorded = [(n, x, y) for n, lst in calls.items() for x, y in lst]
                    dys = torch.autograd.grad(loss, [y for _, _, y in recorded], allow_unused=True)
                    for (name, x, _), dy in zip(recorded, dys):
                        if dy is not None:
                            scores[name].addmm_(dy.reshape(-1, dy.shape[-1]).float().t(),
                                                x.detach().reshape(-1, x.shape[-1]).float())
                    for lst in calls.values():
                        lst.clear()
                    del loss, recorded, dys
        finally:
            for h in handles:
                h.remove()
        for name, _, nnz in chunk:
            score = scores.pop(name)
            out[name] = top_indices(score.abs_().view(-1), nnz).cpu()
            del score
    return out


def _leaf_input(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(True), *args[1:])
    return None


def _recorder(store: list):
    def hook(module, args, output):
        store.append((args[0], output))

    return hook

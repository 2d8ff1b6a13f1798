"""apply / merge / unmerge / remove: sparse deltas on a model, in place.

    model = apply(model, SparseConfig(density=0.01))             # a trainable delta named "default"
    load(model, "lang_sft/", name="lang"); load(model, "task_sft/", name="task")   # compose (io.py)
    merge(model)   # every delta written into its base weight (originals at the indices kept)
    unmerge(model) # base weights back bit for bit
    remove(model)  # deltas gone, original modules back in place

Several deltas on one layer add up (Composable Sparse Fine-Tuning's task + language deltas); merge writes
them in order and unmerge undoes them in reverse, so overlapping indices restore exactly too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ... import _native
from ...patching.registry import Patch
from ...patching.report import PatchedEntry, PatchReport, SkippedEntry
from ...reference import sparse as ref
from ..protocol import check_apply_args, resolve_backend
from .config import SparseConfig
from .layer import SparseDelta, SparseLinear, transposed_storage, weight_nk
from .selection import entries, gradient_indices, magnitude_indices, random_indices

_CONFIGS = "_tunefast_sparse_configs"  # in model.__dict__: {delta name: SparseConfig.to_dict()}
# in model.__dict__: {parameter name: requires_grad} from before the first apply / load (no layer wrapped
# yet, so the names are the model's own), restored when the last delta is removed and the names are back.
_FLAGS = "_tunefast_sparse_flags"


def record_flags(model: nn.Module) -> None:
    """Remember every parameter's requires_grad before sparse deltas change any (first call only)."""
    if _FLAGS not in model.__dict__:
        model.__dict__[_FLAGS] = {n: p.requires_grad for n, p in model.named_parameters()}


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Qualified name -> SparseLinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def delta_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in sparse_layers(model).values():
        names.update(dict.fromkeys(layer.deltas))
    return list(names)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The values (and bias deltas) of trainable deltas: what the optimizer should get."""
    return [p for layer in sparse_layers(model).values() for d in layer.deltas.values()
            for p in (d.values, d.bias) if p is not None and p.requires_grad]


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, SparseLinear) or transposed_storage(module) is not None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without the base layers inside SparseLinear wrappers (they are addressed by the
    wrapper's name, the original module's name)."""
    inner = {id(m.base_layer) for m in model.modules() if isinstance(m, SparseLinear)}
    return [(n, m) for n, m in model.named_modules() if id(m) not in inner and n]


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def find_targets(model: nn.Module, config: SparseConfig) -> list[tuple[str, nn.Module]]:
    """(qualified name, nn.Linear / Conv1D / SparseLinear) of every layer ``config`` targets."""
    cands = _candidates(model)
    if config.explicit:
        by_name = dict(cands)
        missing = [k for k in config.selection if k not in by_name]
        if missing:
            raise ValueError(f"explicit indices name module(s) {missing} that {type(model).__name__} does not have; "
                             f"linear layers here include {_examples(cands)}")
        matched = [(k, by_name[k]) for k in config.selection]
    elif config.target_modules == "all-linear":
        head = _output_head(model)
        matched = [(n, m) for n, m in cands if _is_linear(m) and m is not head
                   and not (isinstance(m, SparseLinear) and m.base_layer is head)]
    elif isinstance(config.target_modules, str):
        pattern = re.compile(config.target_modules)
        matched = [(n, m) for n, m in cands if pattern.fullmatch(n)]
    else:
        names = config.target_modules
        matched = [(n, m) for n, m in cands if any(n == t or n.endswith("." + t) for t in names)]
    if not matched:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
                         f"its linear layers include {_examples(cands)}")
    bad = [f"{n} ({type(m).__name__})" for n, m in matched if not _is_linear(m)]
    if bad:
        raise ValueError(f"sparse deltas go on nn.Linear and transformers' Conv1D layers, but the targets include "
                         f"non-linear module(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return matched


def _examples(cands) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in cands if _is_linear(m)))
    return ", ".join(leaves[:12]) or "none"


# ----------------------------------------------------------------------------------------------------
# apply
# ----------------------------------------------------------------------------------------------------


def _wrap(model: nn.Module, name: str, module: nn.Module, backend: str) -> SparseLinear:
    if isinstance(module, SparseLinear):
        return module
    wrapper = SparseLinear(module, backend)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return wrapper


def add_delta(model: nn.Module, layer_name: str, module: nn.Module, delta_name: str, indices: torch.Tensor,
              values: torch.Tensor, bias: torch.Tensor | None, trainable: bool, backend: str = "auto") -> SparseDelta:
    """Wrap ``module`` (if needed), freeze its weight and give it a delta; used by apply and io.load."""
    base = module.base_layer if isinstance(module, SparseLinear) else module
    shape = tuple(weight_nk(base).shape)
    if isinstance(module, SparseLinear) and delta_name in module.deltas:
        raise ValueError(f"{layer_name} already has a delta named {delta_name!r}: pick another name or remove it first")
    delta = SparseDelta(indices, shape, values, bias, trainable)
    base.weight.requires_grad_(False)  # the sparse op never forms a dense weight gradient
    _wrap(model, layer_name, module, backend).deltas[delta_name] = delta
    return delta


def apply(model: nn.Module, config: SparseConfig, *, name: str = "default", batches: Iterable | None = None,
          loss_fn: Callable | None = None, backend: str | None = None) -> nn.Module:
    """Freeze ``model`` and give every targeted linear layer a trainable sparse delta named ``name``.

    Args:
        model: any nn.Module (a transformers model, a PEFT-free one); changed in place and returned.
        config: a :class:`SparseConfig`.
        name: the delta's name (several named deltas can live on one model: see load, merge).
        batches: gradient selection only: a few batches (dicts of model inputs with labels, or anything
            ``loss_fn`` takes); the scores are computed once, here.
        loss_fn: gradient selection: ``(model, batch) -> scalar loss`` (default ``model(**batch).loss``).
        backend: None runs ``config.backend``; a backend may replace a config's "auto" and must otherwise
            equal it (a ValueError names both). Layers wrapped here keep it (``SparseLinear.backend``).

    The deltas' values start at zero (the model's function is unchanged) in ``config.dtype``; they and,
    with ``train_bias``, the bias deltas are the only parameters left trainable.
    """
    check_apply_args(model, config, SparseConfig)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"name must be a non-empty string without '.', got {name!r}")
    backend = resolve_backend(config.backend, backend, what="SparseConfig")
    if config.selection == "gradient" and batches is None:
        raise ValueError("selection='gradient' needs batches: apply(model, config, batches=[...]) (and loss_fn "
                         "unless each batch is a dict of inputs with labels)")
    targets = find_targets(model, config)
    for n, m in targets:
        if isinstance(m, SparseLinear) and name in m.deltas:
            raise ValueError(f"{n} already has a delta named {name!r}: pass another name= or remove it first")
        if (m.base_layer if isinstance(m, SparseLinear) else m).weight.is_meta:
            raise ValueError("the model has meta-device weights: load or materialise them before apply")
    indices = _select(model, config, targets, batches, loss_fn)
    record_flags(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in targets:
        base = m.base_layer if isinstance(m, SparseLinear) else m
        w = base.weight
        idx = indices[n]
        values = torch.zeros(idx.numel(), device=w.device, dtype=config.values_dtype(w.dtype))
        bias = None
        if config.train_bias and base.bias is not None:
            bias = torch.zeros_like(base.bias, dtype=config.values_dtype(base.bias.dtype))
        add_delta(model, n, m, name, idx, values, bias, trainable=True, backend=backend)
    model.__dict__.setdefault(_CONFIGS, {})[name] = config.to_dict()
    return model


def _select(model, config, targets, batches, loss_fn) -> dict[str, torch.Tensor]:
    shapes = {n: tuple(weight_nk(m.base_layer if isinstance(m, SparseLinear) else m).shape) for n, m in targets}
    if config.explicit:
        return {n: _in_range(n, config.selection[n], shapes[n]) for n, _ in targets}
    counts = {n: entries(config.density, shapes[n]) for n, _ in targets}
    if config.selection == "random":
        gen = torch.Generator().manual_seed(config.seed)
        return {n: random_indices(shapes[n][0] * shapes[n][1], counts[n], gen) for n, _ in targets}
    if config.selection == "magnitude":
        return {n: magnitude_indices(m.base_layer if isinstance(m, SparseLinear) else m, counts[n]) for n, m in targets}
    layers = [(n, m, counts[n]) for n, m in targets]
    return gradient_indices(model, layers, batches, loss_fn, config.gradient_chunk_layers)


def _in_range(name: str, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    size = shape[0] * shape[1]
    if idx.numel() and int(idx[-1]) >= size:
        raise ValueError(f"explicit indices of {name!r} out of range: {int(idx[-1])} >= {size}, the number of entries "
                         f"of its ({shape[0]}, {shape[1]}) (out_features, in_features) weight")
    return idx


# ----------------------------------------------------------------------------------------------------
# merge / unmerge / remove
# ----------------------------------------------------------------------------------------------------


def _select_names(model: nn.Module, names) -> list[str]:
    present = delta_names(model)
    if names is None:
        return present
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in present]
    if unknown:
        raise ValueError(f"no delta named {unknown} on this model; it has {present}")
    return names


def _scatter_add(weight: torch.Tensor, delta: SparseDelta) -> torch.Tensor:
    if _native.sparse_usable(weight.device)[0]:
        return _native.sparse_scatter_add_(weight, delta.indices, delta.values.detach())
    return ref.scatter_add_(weight, delta.indices, delta.values.detach())


@torch.no_grad()
def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Write the deltas ``names`` (default: all) into their base weights (and bias deltas into biases).

    Each merged delta keeps the weight's original entries at its indices (nnz values, not a copy of the
    weight) for :func:`unmerge`. Merged deltas no longer run in the forward (the weight has them) and get
    no gradients: merge for inference or to freeze a composed delta. The sum is fp32, rounded once to the
    weight's dtype.
    """
    names = _select_names(model, names)
    layers = sparse_layers(model)
    _refuse_tied(model, {n: layer for n, layer in layers.items()
                         if any(d in layer.deltas and not layer.deltas[d].merged for d in names)})
    for layer in layers.values():
        _merge_layer(layer, names)
    return model


def _refuse_tied(model: nn.Module, layers: dict[str, SparseLinear]) -> None:
    """Raise, before anything changes, if a weight to be merged is shared with another module (a tied LM
    head and input embedding): writing the delta into it would change both."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for layer_name, layer in layers.items():
        for tensor, what in ((layer.base_layer.weight, "weight"), (layer.base_layer.bias, "bias")):
            shared = names_of.get(id(tensor), []) if tensor is not None else []
            if len(shared) > 1:
                raise ValueError(
                    f"cannot merge into {layer_name}: its {what} is tied to {', '.join(shared)} (e.g. an LM head "
                    "tied to the input embedding); merging would change every module that shares it. Nothing was "
                    "merged. Keep the delta unmerged, or untie the weights first (e.g. config.tie_word_embeddings=False)"
                )


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge: base weights and biases back bit for bit (in reverse merge order)."""
    for layer in sparse_layers(model).values():
        _unmerge_layer(layer)
    return model


@torch.no_grad()
def _merge_layer(layer: SparseLinear, names: list[str]) -> None:
    w = layer.weight_nk()
    for n in names:
        d = layer.deltas[n] if n in layer.deltas else None
        if d is None or d.merged:
            continue
        d.saved_weight = _scatter_add(w, d)
        if d.bias is not None:
            b = layer.base_layer.bias
            d.saved_bias = b.detach().clone()
            b.copy_((b.float() + d.bias.float()).to(b.dtype))
        d.merged = True
        layer.merge_order.append(n)


@torch.no_grad()
def _unmerge_layer(layer: SparseLinear) -> None:
    w = layer.weight_nk()
    while layer.merge_order:
        d = layer.deltas[layer.merge_order.pop()]
        ref.scatter_restore_(w, d.indices, d.saved_weight)
        if d.saved_bias is not None:
            layer.base_layer.bias.copy_(d.saved_bias)
        d.saved_weight = d.saved_bias = None
        d.merged = False


def remove(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Remove the deltas ``names`` (default: all); a layer left without deltas gets its original module
    back in place. Merged deltas are unmerged first (the others that were merged are merged again).
    When no delta is left, every parameter's requires_grad is back to what it was before the first
    apply / load. Returns ``model``."""
    names = _select_names(model, names)
    for layer_name, layer in sparse_layers(model).items():
        doomed = [n for n in names if n in layer.deltas]
        if not doomed:
            continue
        remerge = [n for n in layer.merge_order if n not in doomed]
        if any(layer.deltas[n].merged for n in doomed):
            _unmerge_layer(layer)
        for n in doomed:
            del layer.deltas[n]
        if remerge:
            _merge_layer(layer, remerge)
        if not len(layer.deltas):
            parent_name, _, child = layer_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    configs = model.__dict__.get(_CONFIGS, {})
    for n in names:
        configs.pop(n, None)
    if not sparse_layers(model):
        model.__dict__.pop(_CONFIGS, None)
        flags = model.__dict__.pop(_FLAGS, {})
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
    return model


def config_of(model: nn.Module, name: str) -> dict | None:
    """The SparseConfig (as a dict) a delta was applied or loaded with, if known."""
    return model.__dict__.get(_CONFIGS, {}).get(name)


def report(model: nn.Module) -> PatchReport:
    """Every sparse layer of ``model``: a PatchedEntry with the kernel that runs it
    (``sparse_linear[triton | native | torch]``, from the layer's backend) and its deltas, or a
    SkippedEntry saying why its base layer runs (every delta merged; a dtype the op does not take).
    ``backend`` of the report: the layers' backend when they share one, else "mixed"."""
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("model has no sparse deltas (sparse.apply or sparse.load was not called, or remove was)")
    backends = {layer.backend for layer in layers.values()}
    out = PatchReport(backend=backends.pop() if len(backends) == 1 else "mixed")
    for name, layer in layers.items():
        decision = layer.plan()
        if isinstance(decision, Patch):
            out.patched.append(PatchedEntry(name, decision.kernel, decision.detail))
        else:
            out.skipped.append(SkippedEntry(name, decision.reason))
    return out

"""Save and load one sparse delta: ``sparse_delta.safetensors`` (per layer: indices, values and, with bias
training, bias; nothing of the base model) and ``sparse_config.json`` (format, the config, layer shapes).

    save(model, "lang_sft/", name="default")
    load(model, "lang_sft/", name="lang")             # frozen; trainable=True to continue training it
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..protocol import read_checkpoint

from ... import backend as _backend

from .layer import SparseLinear, weight_nk
from .model import (_CONFIGS, _candidates, _is_linear, add_delta, config_of, delta_names, record_flags,
                    sparse_layers)

CONFIG_NAME = "sparse_config.json"
WEIGHTS_NAME = "sparse_delta.safetensors"
FORMAT = "tunefast-sparse"
FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write the delta ``name`` of every layer that has one into the folder ``path``; returns it.

    Values are saved as they are (merged or not: a merged delta's values are unchanged)."""
    from safetensors.torch import save_file

    layers = {ln: layer.deltas[name] for ln, layer in sparse_layers(model).items() if name in layer.deltas}
    if not layers:
        raise ValueError(f"model has no delta named {name!r} (deltas: {delta_names(model)})")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors, meta_layers = {}, {}
    for ln, d in layers.items():
        tensors[f"{ln}.indices"] = d.indices.detach().cpu().contiguous()
        tensors[f"{ln}.values"] = d.values.detach().cpu().contiguous()
        if d.bias is not None:
            tensors[f"{ln}.bias"] = d.bias.detach().cpu().contiguous()
        meta_layers[ln] = {"shape": list(d.shape), "nnz": d.nnz}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "config": config_of(model, name),
            "model_class": type(model).__name__, "layers": meta_layers}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load(model: nn.Module, path: str | os.PathLike, name: str | None = None, *, trainable: bool = False,
         backend: str | None = None) -> nn.Module:
    """Add the delta saved in ``path`` to ``model`` under ``name`` (default: the saved name), in place.

    ``backend``: None runs the saved SparseConfig's ("auto" when the file has none); another replaces
    it (a backend is no part of the weights). Layers that already have a delta keep their backend.

    The layers must exist with the saved (out_features, in_features) shapes; indices are checked again
    (range, order, uniqueness). The values keep their saved dtype and move to each layer's device. With
    ``trainable`` the values (and bias deltas) require grad. The weights of the layers that get the delta
    are frozen (the sparse op never forms their dense gradient); no other parameter's flag is touched.
    """
    from safetensors.torch import load_file

    meta, weights_file = read_checkpoint(path, CONFIG_NAME, WEIGHTS_NAME, FORMAT, FORMAT_VERSION,
                                         "tunefast.sparse.save")
    name = name or meta["name"]
    if backend is None:
        backend = (meta.get("config") or {}).get("backend", "auto")
    _backend.check_backend_name(backend)
    if name in delta_names(model):
        raise ValueError(f"model already has a delta named {name!r}: load under another name= or remove it first")
    tensors = load_file(str(weights_file))
    modules = dict(_candidates(model))
    plan = []
    for ln, info in meta["layers"].items():
        module = modules.get(ln)
        if module is None or not _is_linear(module):
            found = "not found" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"the saved delta has layer {ln!r}, which in this {type(model).__name__} is {found}")
        base = module.base_layer if isinstance(module, SparseLinear) else module
        shape = tuple(weight_nk(base).shape)
        if shape != tuple(info["shape"]):
            raise ValueError(f"layer {ln!r} is {shape} (out, in) here but the delta was saved for "
                             f"{tuple(info['shape'])}")
        plan.append((ln, module, base))
    record_flags(model)
    for ln, module, base in plan:
        dev = base.weight.device
        bias = tensors.get(f"{ln}.bias")
        add_delta(model, ln, module, name, tensors[f"{ln}.indices"], tensors[f"{ln}.values"].to(dev),
                  bias.to(dev) if bias is not None else None, trainable=trainable, backend=backend)
    if meta.get("config") is not None:
        model.__dict__.setdefault(_CONFIGS, {})[name] = meta["config"]
    return model

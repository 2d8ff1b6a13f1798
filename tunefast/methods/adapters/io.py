"""Save and load adapters: ``adapters.safetensors`` (per adapter: down/up weights and biases, nothing of
the base model) and ``adapter_config.json`` (format, the AdapterConfig, adapter names and shapes)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from ..protocol import read_checkpoint

from .config import AdapterConfig
from .model import adapter_layers, apply, config_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
FORMAT = "tunefast-adapters"
FORMAT_VERSION = 1
_PARAMS = ("down_weight", "down_bias", "up_weight", "up_bias")


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write every adapter of ``model`` into the folder ``path``; returns it."""
    from safetensors.torch import save_file

    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters to save (call adapters.apply first)")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{p}": getattr(layer, p).detach().cpu().contiguous() for n, layer in layers.items() for p in _PARAMS}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config_of(model).to_dict(),
            "model_class": type(model).__name__,
            "layers": {n: list(layer.up_weight.shape) for n, layer in layers.items()}}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load(model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Apply the saved config to ``model`` (a fresh base model) and load the saved adapter weights.

    ``backend``: None runs the saved config's; another replaces it (a backend is no part of the weights).

    Every saved adapter must land on a layer of the same shape, and every adapter apply creates must be
    in the file; otherwise nothing is changed and a ValueError says which. Returns ``model``."""
    from safetensors.torch import load_file

    meta, weights_file = read_checkpoint(path, CONFIG_NAME, WEIGHTS_NAME, FORMAT, FORMAT_VERSION,
                                         "tunefast.adapters.save")
    tensors = load_file(str(weights_file))
    config = AdapterConfig.from_dict(meta["config"])
    if backend is not None:
        config = dataclasses.replace(config, backend=backend)
    apply(model, config)
    layers = adapter_layers(model)
    problem = None
    if set(layers) != set(meta["layers"]):
        problem = (f"the saved adapters are on {sorted(meta['layers'])} but this {type(model).__name__} gets "
                   f"{sorted(layers)}")
    else:
        for n, layer in layers.items():
            if list(layer.up_weight.shape) != meta["layers"][n]:
                problem = f"{n}: saved for up_weight {meta['layers'][n]}, here {list(layer.up_weight.shape)}"
    if problem is not None:
        from .model import remove

        remove(model)
        raise ValueError(problem)
    for n, layer in layers.items():
        for p in _PARAMS:
            param = getattr(layer, p)
            param.data.copy_(tensors[f"{n}.{p}"].to(param.dtype))
    return model

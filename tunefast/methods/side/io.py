"""Save and load a side network on its own: ``side_model.safetensors`` (the side network's and head's
weights, nothing of the backbone) and ``side_config.json`` (the SideConfig plus what it was applied to).

    side.save(side_model, "out/")            # a few MB for a 7B backbone at reduction_factor 8
    side_model = side.load(backbone, "out/")  # the same backbone (or one of the same shape)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


from ..protocol import read_checkpoint
from .config import SideConfig
from .model import SideModel, apply, remove

CONFIG_NAME = "side_config.json"
WEIGHTS_NAME = "side_model.safetensors"
FORMAT_VERSION = 1


def save(model: SideModel, path: str | os.PathLike) -> Path:
    """Write the side weights and config into the folder ``path`` (created if needed); returns it."""
    from safetensors.torch import save_file

    if not isinstance(model, SideModel):
        raise TypeError(
            f"model must be what tunefast.methods.side.apply returned, got {type(model).__name__}"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    plan = model.plan
    config = model.side_config.to_dict()
    config["task"] = plan.task  # resolved: loading onto another class keeps the head that was trained
    if plan.task == "classification":
        config["num_labels"] = plan.num_labels
    meta = {
        "format": "tunefast-side",
        "version": FORMAT_VERSION,
        "config": config,
        "backbone": {
            "class": type(model.backbone).__name__,
            "model_type": getattr(model.backbone.config, "model_type", None),
            "hidden_size": plan.hidden_size,
            "num_hidden_layers": plan.num_hidden_layers,
        },
    }
    weights = {k: v.detach().contiguous() for k, v in model.side_state_dict().items()}
    save_file(weights, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load(model, path: str | os.PathLike, *, backend: str | None = None, **overrides) -> SideModel:
    """Apply the saved side network to ``model`` (a fresh backbone) and load its weights.

    ``backend``: None runs the saved config's; another replaces it (a backend is no part of the
    weights). ``overrides`` replace other config fields that do not change the weights (``fused=False``,
    ``loss_chunk_tokens``). A checkpoint that does not fit ``model`` is refused with ``model`` left as it
    was (flags and train / eval mode)."""

    meta, weights_file = read_checkpoint(path, CONFIG_NAME, WEIGHTS_NAME, "tunefast-side", FORMAT_VERSION,
                                         "tunefast.side.save")
    allowed = {"fused", "loss_chunk_tokens"}
    if set(overrides) - allowed:
        raise ValueError(f"only {sorted(allowed)} can be overridden on load, got {sorted(set(overrides) - allowed)}")
    config = SideConfig.from_dict({**meta["config"], **overrides})
    if backend is not None:
        config = dataclasses.replace(config, backend=backend)
    saved = meta["backbone"]
    side_model = apply(model, config)
    try:
        _load_weights(side_model, saved, weights_file, model)
    except Exception:
        remove(side_model)
        raise
    return side_model


def _load_weights(side_model: SideModel, saved: dict, weights_file: Path, model) -> None:
    from safetensors.torch import load_file

    plan = side_model.plan
    if (plan.hidden_size, plan.num_hidden_layers) != (saved["hidden_size"], saved["num_hidden_layers"]):
        raise ValueError(
            f"the side network was trained on a backbone with hidden_size={saved['hidden_size']}, "
            f"num_hidden_layers={saved['num_hidden_layers']} ({saved['class']}); this {type(model).__name__} has "
            f"{plan.hidden_size}, {plan.num_hidden_layers}"
        )
    device = next(side_model.backbone.parameters()).device
    weights = load_file(str(weights_file), device=str(device))
    expected = side_model.side_state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not fit this side network: missing {missing}, unexpected {unexpected}")
    for name, t in weights.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise ValueError(f"{name}: saved {tuple(t.shape)} {t.dtype}, expected {tuple(expected[name].shape)} "
                             f"{expected[name].dtype}")
    side_model.load_state_dict(weights, strict=False)

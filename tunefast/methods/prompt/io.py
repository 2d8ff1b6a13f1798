"""Save and load visual prompts: ``prompts.safetensors`` (every prompt tensor, plus the classifier head
when it was trained; nothing else of the backbone) and ``prompt_config.json`` (format, the PromptConfig,
the model class, every tensor's name and shape)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..protocol import read_checkpoint

from .config import PromptConfig
from .model import apply, config_of, head_parameters, plan, prompt_parameters

CONFIG_NAME = "prompt_config.json"
WEIGHTS_NAME = "prompts.safetensors"
FORMAT = "tunefast-prompt"
FORMAT_VERSION = 1
_HEAD = "head."  # key prefix of head tensors in the safetensors file


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the prompts (and, with train_head, the head) of ``model`` into the folder ``path``; returns it."""
    from safetensors.torch import save_file

    prompts, head = prompt_parameters(model), head_parameters(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in prompts.items()}
    tensors.update({_HEAD + n: p.detach().cpu().contiguous() for n, p in head.items()})
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": config_of(model).to_dict(),
            "model_class": type(model).__name__,
            "prompts": {n: list(p.shape) for n, p in prompts.items()},
            "head": {n: list(p.shape) for n, p in head.items()}}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load(model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Apply the saved config to ``model`` (a fresh base model) and load the saved prompts (and head).

    ``backend``: None runs the saved config's; another replaces it (a backend is no part of the weights).

    The saved tensors must be exactly those apply() creates on this model, with the same shapes; otherwise
    a ValueError says which and ``model`` is left unchanged. Returns ``model``."""
    from safetensors.torch import load_file

    meta, weights_file = read_checkpoint(path, CONFIG_NAME, WEIGHTS_NAME, FORMAT, FORMAT_VERSION,
                                         "tunefast.prompt.save")
    config = PromptConfig.from_dict(meta["config"])
    if backend is not None:
        config = dataclasses.replace(config, backend=backend)
    tensors = load_file(str(weights_file))
    want = plan(model, config)  # changes nothing; raises for a model the config does not fit
    for kind in ("prompts", "head"):
        saved = {n: list(s) for n, s in meta[kind].items()}
        here = {n: list(s) for n, s in want[kind].items()}
        if saved != here:
            missing, extra = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
            shapes = {n: (saved[n], here[n]) for n in set(saved) & set(here) if saved[n] != here[n]}
            raise ValueError(f"the saved {kind} do not fit this {type(model).__name__} (saved for "
                             f"{meta.get('model_class')}): missing {missing}, unexpected {extra}, "
                             f"shape (saved, here) {shapes}")
    keys = set(meta["prompts"]) | {_HEAD + n for n in meta["head"]}
    if set(tensors) != keys:
        raise ValueError(f"{weights_file} holds {sorted(set(tensors) ^ keys)} differently from {Path(path) / CONFIG_NAME}")
    apply(model, config)
    with torch.no_grad():
        for n, p in prompt_parameters(model).items():
            p.copy_(tensors[n].to(p.dtype))
        for n, p in head_parameters(model).items():
            p.copy_(tensors[_HEAD + n].to(p.dtype))
    return model

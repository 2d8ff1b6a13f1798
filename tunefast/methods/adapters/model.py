"""apply / remove / trainable_parameters / report: bottleneck and parallel adapters on a model, in place.

Blocks are found by module type; what differs between families is data (``BLOCKS``): for each
sublayer, the output projection whose output the adapter adds to, and for parallel adapters where
the sublayer's input arrives (a module and its argument). No model forward is copied: the projection
is wrapped (layer.py) and, for parallel adapters, a forward pre-hook hands the sublayer's input over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ... import backend as _backend
from ...patching.report import PatchedEntry, PatchReport
from ..protocol import check_apply_args, resolve_backend
from .config import AdapterConfig
from .layer import AdapterLayer

# in model.__dict__: {"config": dict, "layers": {name: AdapterLayer}, "frozen": {param: requires_grad}, "backend"}
_STATE = "_tunefast_adapters"


@dataclass(frozen=True)
class Site:
    """One sublayer of a block: ``output`` its output projection (path in the block); ``input`` the
    (module path, positional index, keyword) of the call that receives the sublayer's input."""

    output: str
    input: tuple[str, int, str]


# block class name -> {sublayer: Site}. Decoder blocks take the sublayer input as the attention/MLP
# module's first argument; BERT's Self/Output modules receive it as ``input_tensor`` (their residual).
_LLAMA = {"attention": Site("self_attn.o_proj", ("self_attn", 0, "hidden_states")),
          "ffn": Site("mlp.down_proj", ("mlp", 0, "x"))}
BLOCKS: dict[str, dict[str, Site]] = {
    "LlamaDecoderLayer": _LLAMA,
    "Qwen2DecoderLayer": _LLAMA,
    "MistralDecoderLayer": _LLAMA,
    "GPT2Block": {"attention": Site("attn.c_proj", ("attn", 0, "hidden_states")),
                  "ffn": Site("mlp.c_proj", ("mlp", 0, "hidden_states"))},
    "BertLayer": {"attention": Site("attention.output.dense", ("attention.output", 1, "input_tensor")),
                  "ffn": Site("output.dense", ("output", 1, "input_tensor"))},
    "ViTLayer": {"attention": Site("attention.o_proj", ("attention", 0, "hidden_states")),
                 "ffn": Site("mlp.fc2", ("mlp", 0, "hidden_states"))},
}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Qualified name (the wrapped projection's original name) -> AdapterLayer, in model order."""
    state = model.__dict__.get(_STATE)
    return dict(state["layers"]) if state else {}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' projections and biases: what the optimizer should get."""
    return [p for layer in adapter_layers(model).values() for p in
            (layer.down_weight, layer.down_bias, layer.up_weight, layer.up_bias) if p.requires_grad]


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight stored (in, out)
        return module.weight.shape[1]
    return None


def _input_hook(layer: AdapterLayer, index: int, keyword: str):
    def hook(module, args, kwargs):
        x = args[index] if len(args) > index else kwargs.get(keyword)
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"parallel adapter: {type(module).__name__} was called without its input "
                               f"(argument {index} / {keyword!r})")
        layer.take_input(x)

    return hook


def apply(model: nn.Module, config: AdapterConfig, *, backend: str | None = None) -> nn.Module:
    """Add an adapter to the chosen sublayers of every known transformer block of ``model``, in place.

    Every parameter of the model is frozen (flags restored by :func:`remove`); the adapters train.
    ``backend``: None runs ``config.backend``; a backend ("auto", "triton", "reference": see
    tunefast.backend) may replace a config's "auto" and must otherwise equal it. Returns ``model``.
    """
    check_apply_args(model, config, AdapterConfig)
    if _STATE in model.__dict__:
        raise ValueError("model already has adapters: call adapters.remove(model) first")
    backend = resolve_backend(config.backend, backend, what="AdapterConfig")
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in BLOCKS]
    if not blocks:
        raise ValueError(f"no transformer block of a known family in {type(model).__name__}; adapters are placed in "
                         f"blocks of type {sorted(BLOCKS)} (add a row to tunefast.methods.adapters.model.BLOCKS)")
    plan = []
    for block_name, block in blocks:
        sites = BLOCKS[type(block).__name__]
        for sub in config.sublayers:
            site = sites[sub]
            proj = block.get_submodule(site.output)
            hidden = _out_features(proj)
            if hidden is None:
                raise ValueError(f"{block_name}.{site.output} is a {type(proj).__name__}, expected nn.Linear or Conv1D")
            plan.append((block_name, block, sub, site, proj, hidden))
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for block_name, block, sub, site, proj, hidden in plan:
        w = proj.weight
        layer = AdapterLayer(proj, hidden, config, backend=backend, dtype=w.dtype, device=w.device)
        parent_path, _, attr = site.output.rpartition(".")
        setattr(block.get_submodule(parent_path) if parent_path else block, attr, layer)
        if layer.parallel:
            path, index, keyword = site.input
            layer._hook = block.get_submodule(path).register_forward_pre_hook(
                _input_hook(layer, index, keyword), with_kwargs=True)
        layers[f"{block_name}.{site.output}"] = layer
    model.__dict__[_STATE] = {"config": config.to_dict(), "layers": layers, "frozen": frozen, "backend": backend}
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: original projections back in place, hooks gone, requires_grad flags restored."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        raise ValueError("model has no adapters (apply was not called, or remove already was)")
    for name, layer in state["layers"].items():
        if layer._hook is not None:
            layer._hook.remove()
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, layer.base)
    for n, p in model.named_parameters():
        p.requires_grad_(state["frozen"].get(n, p.requires_grad))
    return model


def config_of(model: nn.Module) -> AdapterConfig:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError("model has no adapters")
    return AdapterConfig.from_dict(state["config"])


def report(model: nn.Module) -> PatchReport:
    """One PatchedEntry per adapter: the wrapped projection's name, kernel ``adapter[triton|reference]``."""
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError("model has no adapters")
    out = PatchReport(backend=state["backend"])
    for name, layer in state["layers"].items():
        impl = _backend.resolve(state["backend"], layer.down_weight.device)
        out.patched.append(PatchedEntry(name, f"adapter[{impl}]", layer.extra_repr()))
    return out

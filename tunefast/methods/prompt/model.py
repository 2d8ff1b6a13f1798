"""apply / remove / trainable_parameters / report: visual prompt tuning on a ViT-style model, in place.

Layers and embeddings are found by module type; what differs between families is data: ``LAYERS`` (where
a layer's pre-attention layernorm and attention module are; the attention module holds ``k_proj`` /
``v_proj`` and ``head_dim`` and calls transformers' attention interface) and ``EMBEDDINGS`` (how many
special tokens lead the sequence: CLS, DeiT's distillation token, DINOv2's registers). No forward is
copied: deep prompts enter through a pre-hook on each attention module and the attention interface
(layer.py); shallow prompts through forward hooks on the embeddings and the last layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ... import backend as _backend
from ...patching import prefix_interface
from ...patching.prefix import PREFIX_LAYER
from ...patching.report import PatchedEntry, PatchReport, SkippedEntry
from ..protocol import check_apply_args, resolve_backend
from . import layer as _layer
from .config import PromptConfig
from .layer import PromptTokens

# in model.__dict__ while applied (see apply)
_STATE = "_tunefast_prompt"
PROMPT_ATTR = "tunefast_prompt"  # the PromptTokens child added to each layer (deep) or to the embeddings (shallow)


@dataclass(frozen=True)
class LayerFacts:
    """Paths inside one transformer layer: ``norm`` the layernorm applied before attention, ``attention``
    the module that projects q/k/v (``key`` / ``value`` under it) and calls the attention interface."""

    norm: str
    attention: str
    key: str = "k_proj"
    value: str = "v_proj"


_VIT = LayerFacts(norm="layernorm_before", attention="attention")
_DINOV2 = LayerFacts(norm="norm1", attention="attention")
LAYERS: dict[str, LayerFacts] = {
    "ViTLayer": _VIT,
    "DeiTLayer": _VIT,
    "ViTMSNLayer": _VIT,
    "IJepaLayer": _VIT,
    "ASTLayer": _VIT,
    "Dinov2Layer": _DINOV2,
    "Dinov2WithRegistersLayer": _DINOV2,
}
# embeddings class -> (special tokens before the patches, config field adding more of them or None).
# Shallow prompts go right after them, so heads that read fixed positions (DeiT's distillation token at 1,
# DINOv2's registers) keep reading the same tokens.
EMBEDDINGS: dict[str, tuple[int, str | None]] = {
    "ViTEmbeddings": (1, None),
    "DeiTEmbeddings": (2, None),              # CLS, distillation token
    "ViTMSNEmbeddings": (1, None),
    "IJepaEmbeddings": (0, None),             # no CLS: I-JEPA's head averages all tokens
    "ASTEmbeddings": (2, None),               # CLS, distillation token
    "Dinov2Embeddings": (1, None),
    "Dinov2WithRegistersEmbeddings": (1, "num_register_tokens"),
}
# Vision families recognised but refused, and why.
UNSUPPORTED: dict[str, str] = {
    "SwinLayer": "Swin attends within (shifted) local windows of a patch grid and merges patches between stages: "
                 "there is no global token sequence for prompts to join, and VPT's per-window Swin variant is out "
                 "of scope",
    "Swinv2Layer": "Swin V2 attends within (shifted) local windows of a patch grid (see SwinLayer): out of scope",
    "BeitLayer": "BEiT adds a learned relative position bias over the patch grid that has no entries for prompt "
                 "tokens; prompts there need a bias rule this method does not define",
    "Data2VecVisionLayer": "Data2Vec-vision is BEiT's architecture (relative position bias over the patch grid): "
                           "see BeitLayer",
}


def _prompt_name(owner: str) -> str:
    return f"{owner}.{PROMPT_ATTR}.tokens" if owner else f"{PROMPT_ATTR}.tokens"


def _find(model: nn.Module):
    """(embeddings (name, module, leading), [(name, layer, facts)]) or a ValueError saying why not."""
    layers, refused = [], {}
    for n, m in model.named_modules():
        cls = type(m).__name__
        if cls in LAYERS:
            layers.append((n, m, LAYERS[cls]))
        elif cls in UNSUPPORTED:
            refused.setdefault(cls, UNSUPPORTED[cls])
    if refused:
        cls, why = next(iter(refused.items()))
        raise ValueError(f"{type(model).__name__} has {cls} layers, which visual prompts do not support: {why}")
    if not layers:
        raise ValueError(f"no ViT-style layer in {type(model).__name__}; visual prompts go into layers of type "
                         f"{sorted(LAYERS)} (add a row to tunefast.methods.prompt.model.LAYERS)")
    emb = [(n, m) for n, m in model.named_modules() if type(m).__name__ in EMBEDDINGS]
    if len(emb) != 1:
        raise ValueError(f"expected one embeddings module of a type in {sorted(EMBEDDINGS)} in "
                         f"{type(model).__name__}, found {[n for n, _ in emb]}")
    emb_name, emb_mod = emb[0]
    fixed, field_name = EMBEDDINGS[type(emb_mod).__name__]
    leading = fixed + (int(getattr(model.config, field_name)) if field_name else 0)
    return (emb_name, emb_mod, leading), layers


def _head_names(model: nn.Module, emb_name: str, layer_names: list[str]) -> list[str]:
    """Parameters outside the backbone (the top-level child holding the embeddings and every layer): the
    classifier head(s). A model that is itself the backbone (ViTModel) has none."""
    tops = {n.split(".")[0] for n in [emb_name, *layer_names]}
    if len(tops) != 1 or "." not in emb_name:
        return []
    top = tops.pop()
    return [n for n, _ in model.named_parameters() if n.split(".")[0] != top]


def _init_bound(model: nn.Module, hidden: int) -> float:
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if patch is None:
        raise ValueError(f"init='uniform' needs the patch size (model.config.patch_size), which "
                         f"{type(model).__name__} does not have: use PromptConfig(init='normal')")
    area = patch * patch if isinstance(patch, int) else math.prod(patch)
    return math.sqrt(6.0 / float(3 * area + hidden))  # VPT: Xavier uniform of a (3 * ph * pw -> hidden) projection


def plan(model: nn.Module, config: PromptConfig) -> dict:
    """What :func:`apply` would add, changing nothing: {"prompts": {qualified name of the tokens parameter:
    (N, hidden)}, "head": {parameter name: shape}} (head empty unless ``config.train_head``)."""
    (emb_name, emb_mod, leading), layers = _find(model)
    owners = [(n, m) for n, m, _ in layers] if config.deep else [(emb_name, emb_mod)]
    hidden = layers[0][1].get_submodule(layers[0][2].norm).weight.shape[-1]
    prompts = {_prompt_name(n): (config.num_tokens, hidden) for n, _ in owners}
    params = dict(model.named_parameters())
    head = ({n: tuple(params[n].shape) for n in _head_names(model, emb_name, [n for n, _, _ in layers])}
            if config.train_head else {})
    return {"prompts": prompts, "head": head, "leading": leading}


def apply(model: nn.Module, config: PromptConfig, *, backend: str | None = None) -> nn.Module:
    """Add visual prompts to ``model`` (a Hugging Face ViT-style model: ViT, DeiT, DINOv2, ...), in place.

    Every parameter is frozen except the prompts and, with ``config.train_head``, the classifier head.
    Deep: each layer's prompts (N, hidden) enter its attention as a prefix K/V shared by the batch (the
    prefix_attention op, through the attention interface: the model's attention implementation is switched,
    and restored by :func:`remove`). Shallow: N tokens inserted after the leading special tokens of the
    embedding output, removed after the last layer. ``backend``: None runs ``config.backend``; a backend
    ("auto", "triton", "reference": see tunefast.backend) may replace a config's "auto" and must otherwise
    equal it. Returns ``model``.
    """
    check_apply_args(model, config, PromptConfig)
    if _STATE in model.__dict__:
        raise ValueError("model already has visual prompts: call prompt.remove(model) first")
    backend = resolve_backend(config.backend, backend, what="PromptConfig")
    (emb_name, emb_mod, leading), layers = _find(model)
    planned = plan(model, config)
    hf_config = getattr(model, "config", None)
    interface = hold = None
    if config.deep:
        if hf_config is None or not getattr(model, "_can_set_attn_implementation", lambda: False)():
            raise ValueError(f"deep prompts run through transformers' attention interface, which "
                             f"{type(model).__name__} cannot switch (set_attn_implementation)")
        for n, layer, facts in layers:
            attn = layer.get_submodule(facts.attention)
            if not isinstance(getattr(attn, "head_dim", None), int):
                raise ValueError(f"{n}.{facts.attention} ({type(attn).__name__}) has no int head_dim")
    head_names = list(planned["head"])
    ref = layers[0][1].get_submodule(layers[0][2].norm).weight
    bound = _init_bound(model, ref.shape[-1]) if config.init == "uniform" else None
    # every check above, every change below: a refused model is left untouched

    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    head_orig = {n: params[n].detach().clone() for n in head_names}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in head_names:
        params[n].requires_grad_(True)

    hooks, owners = [], {}

    def new_prompt(owner: nn.Module) -> PromptTokens:
        p = PromptTokens(config.num_tokens, ref.shape[-1], dropout=config.dropout, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            if bound is not None:
                p.tokens.uniform_(-bound, bound)
            else:
                p.tokens.normal_(0.0, config.init_std)
        owner.add_module(PROMPT_ATTR, p)
        p.train(owner.training)
        return p

    if config.deep:
        hold = prefix_interface.Hold(backend)  # the global registration, removed with the last user
        interface = hold.name
        for n, layer, facts in layers:
            prompt = new_prompt(layer)
            attn = layer.get_submodule(facts.attention)
            attn.__dict__[PREFIX_LAYER] = 0  # the hook hands over a one-layer prefix (1, 2, H, N, D)
            hook = _layer.deep_attention_hook(prompt, layer.get_submodule(facts.norm), attn.get_submodule(facts.key),
                                              attn.get_submodule(facts.value), attn.head_dim, hf_config, interface)
            hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
            owners[n] = prompt
        first = layers[0][1]
        hooks.append(first.register_forward_pre_hook(_layer.checkpoint_input_hook(first), with_kwargs=True))
        attn_impl = hf_config._attn_implementation
        model.set_attn_implementation(interface)
    else:
        prompt = new_prompt(emb_mod)
        owners[emb_name] = prompt
        hooks.append(emb_mod.register_forward_hook(_layer.insert_hook(prompt, leading)))
        hooks.append(layers[-1][1].register_forward_hook(_layer.strip_hook(config.num_tokens, leading)))
        hooks.append(layers[0][1].register_forward_pre_hook(_layer.refuse_mask_hook(), with_kwargs=True))
        attn_impl = None
    model.__dict__[_STATE] = {
        "config": config.to_dict(), "backend": backend, "frozen": frozen, "head_orig": head_orig, "hooks": hooks,
        "prompts": owners, "attn_impl": attn_impl, "interface": interface, "hold": hold, "leading": leading,
        "layers": [(n, type(m).__name__, facts) for n, m, facts in layers], "embeddings": emb_name,
    }
    return model


def _state(model: nn.Module) -> dict:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError("model has no visual prompts (prompt.apply was not called, or remove already was)")
    return state


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: prompts and hooks gone, attention implementation, head weights (trained or not)
    and requires_grad flags restored. Returns ``model``."""
    state = _state(model)
    for h in state["hooks"]:
        h.remove()
    for n in state["prompts"]:
        owner = model.get_submodule(n)
        delattr(owner, PROMPT_ATTR)
    for n, _, facts in state["layers"]:
        model.get_submodule(n).get_submodule(facts.attention).__dict__.pop(PREFIX_LAYER, None)
    if state["attn_impl"] is not None:
        model.set_attn_implementation(state["attn_impl"])
        state["hold"].release()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, orig in state["head_orig"].items():
            params[n].copy_(orig)
    for n, p in params.items():
        p.requires_grad_(state["frozen"].get(n, p.requires_grad))
    del model.__dict__[_STATE]
    return model


def config_of(model: nn.Module) -> PromptConfig:
    return PromptConfig.from_dict(_state(model)["config"])


def prompt_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> the prompts' (N, hidden) parameter, in model order."""
    return {_prompt_name(n): p.tokens for n, p in _state(model)["prompts"].items()}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> classifier-head parameter trained with the prompts (empty unless train_head)."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in _state(model)["head_orig"]}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prompts, then the head's parameters (with train_head): what the optimizer should get."""
    return [*prompt_parameters(model).values(), *head_parameters(model).values()]


def report(model: nn.Module) -> PatchReport:
    """Deep: one PatchedEntry per layer, ``prefix_attention[triton|reference]``. Shallow: every layer
    skipped with the reason (the prompts are ordinary tokens there), the embeddings with what was inserted."""
    state = _state(model)
    cfg = PromptConfig.from_dict(state["config"])
    out = PatchReport(backend=state["backend"])
    n_tok = cfg.num_tokens
    if cfg.deep:
        for n, cls, facts in state["layers"]:
            tokens = state["prompts"][n].tokens
            impl = _backend.resolve(state["backend"], tokens.device)
            out.patched.append(PatchedEntry(
                f"{n}.{facts.attention}", f"prefix_attention[{impl}]",
                f"{n_tok} prompt tokens as a prefix K/V shared by the batch, from {facts.norm} + "
                f"{facts.key}/{facts.value}"))
    else:
        out.skipped.append(SkippedEntry(
            state["embeddings"], f"shallow prompts: {n_tok} tokens inserted after the first {state['leading']} "
            "token(s) of the embedding output (a concatenation; no kernel needed)"))
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        for n, cls, facts in state["layers"]:
            out.skipped.append(SkippedEntry(
                f"{n}.{facts.attention}", f"shallow prompts are ordinary tokens of the sequence: the layer's own "
                f"attention ({impl}) runs them (prefix attention applies to deep prompts)"))
    return out

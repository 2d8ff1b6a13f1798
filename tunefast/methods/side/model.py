"""``apply(model, config)``: wrap a Hugging Face model in a side network that trains on its own.

The backbone (the model's ``base_model``: LlamaModel, BertModel, ViTModel, ...) runs under
``torch.no_grad()`` in eval mode with ``output_hidden_states=True``: it keeps nothing for backward
and never gets a gradient. The side network reads the selected hidden states and a head (heads.py)
turns its output into the model's usual output type. Nothing is model-specific beyond Hugging Face's
own conventions: ``base_model``, ``hidden_states``, ``last_hidden_state``, ``get_output_embeddings()``
and the auto-class tables that say which classes are causal LMs or classifiers.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ... import backend as _backend
from ...ops import side as side_ops
from ...patching.report import PatchedEntry, PatchReport, SkippedEntry
from ..protocol import resolve_backend
from .config import SideConfig
from .heads import CausalLMHead, ClassificationHead, FeaturesHead
from .network import NETWORKS

# LM heads whose logits are not just lm_head(last_hidden_state): config attribute -> neutral values.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),  # Gemma 2/3: tanh soft-capping
    "logit_scale": (None, 1.0),  # Cohere
    "logits_scaling": (None, 1.0),  # Granite
}


@dataclass(frozen=True)
class Plan:
    """What apply() read off the model; saved with the side weights."""

    task: str
    hidden_size: int
    num_hidden_layers: int
    width: int
    layers: tuple[int, ...]
    num_labels: int | None
    problem_type: str | None
    image: bool
    call_kwargs: tuple[tuple[str, object], ...]


class SideModel(nn.Module):
    """A frozen backbone plus a trainable side network and head. Call it like the model itself
    (``input_ids=..., attention_mask=..., labels=...`` or ``pixel_values=..., labels=...``).

    ``side_config`` is the config as given (what ``save`` writes); ``backend`` the one the fused ops run
    (the config's, or apply's backend= in place of its "auto")."""

    def __init__(self, backbone: nn.Module, config: SideConfig, plan: Plan, backend: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.side_config = config
        self.plan = plan
        self.backend = resolve_backend(config.backend, backend, what="SideConfig")
        run = dataclasses.replace(config, backend=self.backend)
        self._dtype = _side_dtype(config.side_dtype, backbone)
        device = next(backbone.parameters()).device
        args = (plan.width, plan.hidden_size, run, self._dtype, device)
        self.side = NETWORKS[config.merge](len(plan.layers), plan.hidden_size, plan.width, run, self._dtype, device)
        if plan.task == "causal_lm":
            self.head = CausalLMHead(*args)
        elif plan.task == "classification":
            self.head = ClassificationHead(*args, plan.num_labels, plan.problem_type, plan.image)
        else:
            self.head = FeaturesHead(*args)
        self._frozen = list(backbone.named_parameters())
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # a frozen feature extractor: no dropout in the backbone, ever
        return self

    def side_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only (what ``save`` writes): ``side.*`` and ``head.*``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should get (``self.parameters()`` includes the frozen backbone's)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def forward(self, labels=None, num_items_in_batch=None, **inputs):
        for name, p in self._frozen:
            if p.requires_grad:
                raise RuntimeError(
                    f"backbone parameter {name!r} requires grad: side tuning never back-propagates through the "
                    "backbone, so it would silently get no gradient; freeze it (requires_grad_(False))"
                )
        states, last = self._backbone_states(inputs)
        fused = self.side_config.fused
        s = self.side([states[i] for i in self.plan.layers], fused)
        head_inputs = dict(s=s, last=last, labels=labels, num_items_in_batch=num_items_in_batch, fused=fused,
                           mask=inputs.get("attention_mask"))
        if self.plan.task == "causal_lm":
            head_inputs["lm_head"] = self.backbone.get_output_embeddings()
        return self.head(**head_inputs)

    def _backbone_states(self, inputs):
        with torch.no_grad():
            out = self.backbone.base_model(**inputs, **dict(self.plan.call_kwargs))
        states = getattr(out, "hidden_states", None)
        if states is None:
            raise RuntimeError(
                f"{type(self.backbone.base_model).__name__} returned no hidden_states with "
                "output_hidden_states=True: side tuning needs a model that can return them"
            )
        if len(states) != self.plan.num_hidden_layers + 1:
            raise RuntimeError(
                f"the backbone returned {len(states)} hidden states, expected num_hidden_layers + 1 = "
                f"{self.plan.num_hidden_layers + 1}: this model's hidden_states do not follow the HF convention"
            )
        for i in self.plan.layers:
            if states[i].shape[-1] != self.plan.hidden_size:
                raise RuntimeError(
                    f"hidden state {i} has width {states[i].shape[-1]}, expected hidden_size "
                    f"{self.plan.hidden_size}: models whose width changes between layers are not supported"
                )
        return states, out.last_hidden_state


# on the SideModel: what apply changed on the model it was given, for remove() to put back.
_ORIGINAL = "_tunefast_side_original"


def apply(model: nn.Module, config: SideConfig | None = None, *, backend: str | None = None) -> SideModel:
    """Wrap ``model`` (a Hugging Face PreTrainedModel) in a side network; see SideConfig for options.

    The model's parameters are frozen (requires_grad False) and it is put in eval mode (both undone by
    :func:`remove`). ``backend``: None runs ``config.backend``; a backend may replace a config's "auto"
    and must otherwise equal it. Returns a SideModel (use it from now on: the protocol's in-place rule)
    whose only trainable parameters are the side network's and the head's.
    """
    config = config if config is not None else SideConfig()
    if not isinstance(config, SideConfig):
        raise TypeError(f"config must be a SideConfig, got {type(config).__name__}")
    if isinstance(model, SideModel):
        raise TypeError("model is already a SideModel: call side.remove(side_model) first, or apply to "
                        "side_model.backbone's original model")
    resolve_backend(config.backend, backend, what="SideConfig")  # before anything changes
    plan = make_plan(model, config)
    original = ([(p, p.requires_grad) for p in model.parameters()], [(m, m.training) for m in model.modules()])
    model.requires_grad_(False)
    model.eval()
    side_model = SideModel(model, config, plan, backend)
    side_model.__dict__[_ORIGINAL] = original
    return side_model


def remove(model: SideModel) -> nn.Module:
    """Undo :func:`apply`: the model it was given, with its requires_grad flags and train / eval modes
    as they were. The side network is dropped (save it first)."""
    if not isinstance(model, SideModel):
        raise TypeError(f"model must be what tunefast.methods.side.apply returned, got {type(model).__name__}")
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is None:
        raise ValueError("this SideModel was already removed (or not made by side.apply)")
    flags, modes = original
    for p, flag in flags:
        p.requires_grad_(flag)
    for m, mode in modes:
        m.training = mode
    return model.backbone


def trainable_parameters(model: SideModel) -> list[nn.Parameter]:
    """The side network's and head's parameters: what the optimizer should get."""
    if not isinstance(model, SideModel):
        raise TypeError(f"model must be what tunefast.methods.side.apply returned, got {type(model).__name__}")
    return model.trainable_parameters()


def report(model: SideModel) -> PatchReport:
    """Every side-network module with the kernel that runs it: ``side.rungs.<i>`` ``ladder_merge[...]``
    (down-projection + gate + norm), ``head`` ``side_lm_loss[...]`` (causal LM, training with labels),
    or a SkippedEntry saying why plain PyTorch runs (``fused=False``, a classification / features head)."""
    if not isinstance(model, SideModel):
        raise TypeError(f"model must be what tunefast.methods.side.apply returned, got {type(model).__name__}")
    fused, backend, plan = model.side_config.fused, model.backend, model.plan
    device = next(model.side.parameters()).device
    out = PatchReport(backend=backend)
    unfused = "fused=False: nn.Linear + norm modules (the unfused baseline)"
    for i, (rung, layer) in enumerate(zip(model.side.rungs, plan.layers)):
        name = f"side.rungs.{i}"
        if fused:
            impl = side_ops._resolve(backend, device, plan.width)  # the op's own rule (width limit included)
            detail = f"hidden state {layer} -> width {plan.width}" + (", gated" if rung.gate is not None else "")
            out.patched.append(PatchedEntry(name, f"ladder_merge[{impl}]", detail))
        else:
            out.skipped.append(SkippedEntry(name, unfused))
    if plan.task == "causal_lm" and fused:
        out.patched.append(PatchedEntry("head", f"side_lm_loss[{_backend.resolve(backend, device)}]",
                                        "training with labels; logits through the frozen LM head otherwise"))
    elif plan.task == "causal_lm":
        out.skipped.append(SkippedEntry("head", "fused=False: logits through the frozen LM head, PyTorch's loss"))
    else:
        out.skipped.append(SkippedEntry("head", f"{plan.task} head: a Linear on pooled features, no fused kernel"))
    return out


def make_plan(model, config: SideConfig) -> Plan:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a Hugging Face PreTrainedModel that returns hidden states "
            f"(output_hidden_states=True), got {type(model).__name__}"
        )
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{type(model).__name__} is an encoder-decoder model: side tuning reads one stack's hidden states "
            "(decoder LLMs, BERT-style encoders, ViT)"
        )
    base = model.base_model
    params = inspect.signature(base.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "output_hidden_states" not in params and not takes_kwargs:
        raise TypeError(
            f"{type(base).__name__}.forward takes no output_hidden_states: this model cannot return hidden "
            "states, which side tuning reads"
        )
    hidden = _config_int(cfg, "hidden_size")
    depth = _config_int(cfg, "num_hidden_layers")
    if config.reduction_factor > hidden:
        raise ValueError(
            f"reduction_factor={config.reduction_factor} is larger than the model's hidden_size={hidden}: "
            f"the side width would be 0 (use 1..{hidden})"
        )
    layers = _normalize_layers(config.layers, depth)
    task = _task(model, config)
    num_labels = problem_type = None
    if task == "causal_lm":
        _check_lm_head(model, hidden)
    elif task == "classification":
        num_labels = config.num_labels if config.num_labels is not None else getattr(cfg, "num_labels", None)
        if not num_labels:
            raise ValueError("task='classification' needs num_labels (in SideConfig or the model config)")
        problem_type = getattr(cfg, "problem_type", None)
    call = {"output_hidden_states": True}
    if "return_dict" in params or takes_kwargs:
        call["return_dict"] = True
    if "use_cache" in params:
        call["use_cache"] = False  # no KV cache: nothing would read it
    image = "pixel_values" in params
    return Plan(task, hidden, depth, hidden // config.reduction_factor, layers, num_labels, problem_type, image,
                tuple(sorted(call.items())))


def _config_int(cfg, name):
    value = getattr(cfg, name, None)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"the model config has no usable {name} ({value!r}): side tuning needs it")
    return value


def _normalize_layers(layers, depth):
    if layers is None:
        return tuple(range(1, depth + 1))
    out = []
    for i in layers:
        j = i + depth + 1 if i < 0 else i
        if not 0 <= j <= depth:
            raise ValueError(
                f"layers: index {i} is out of range for a model with {depth} blocks (hidden_states has "
                f"{depth + 1} entries: 0 = embeddings, 1..{depth} = block outputs; negative from the end)"
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"layers {list(layers)} name one hidden state twice")
    return tuple(sorted(out))


def _task(model, config) -> str:
    if config.task != "auto":
        return config.task
    from transformers.models.auto import modeling_auto as auto

    def names(table):
        out = set()
        for v in getattr(auto, table, {}).values():
            out.update(v if isinstance(v, (tuple, list)) else (v,))
        return out

    cls = type(model).__name__
    if cls in names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "causal_lm"
    classifiers = names("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
    classifiers |= names("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")
    if cls in classifiers:
        return "classification"
    return "features"


def _check_lm_head(model, hidden):
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
        raise ValueError(
            f"task='causal_lm' needs get_output_embeddings() to be an nn.Linear over hidden_size={hidden}; "
            f"{type(model).__name__} has {type(head).__name__}"
        )
    for attr, neutral in _LOGIT_TRANSFORMS.items():
        if getattr(model.config, attr, None) not in neutral:
            raise NotImplementedError(
                f"{type(model).__name__} transforms its logits ({attr}={getattr(model.config, attr)!r}): the side "
                "LM head computes lm_head(hidden) only; use task='features' and your own head"
            )


def _side_dtype(name: str, backbone: nn.Module) -> torch.dtype:
    if name == "backbone":
        return next(backbone.parameters()).dtype
    return getattr(torch, name)

"""Causal-LM heads -> the fused LM-head loss (tunefast/ops/linear_cross_entropy.py).

One mechanism for every Hugging Face causal LM, whatever it wraps (PEFT LoRA, prefix / prompt tuning,
tunefast sparse deltas): the causal LM's class is swapped for one whose forward, in training mode with
``labels``, runs the model's *own* forward without labels while its output head (found through
``get_output_embeddings()``, never by attribute name) is briefly replaced by :class:`_HeadInput`, which
keeps its input and returns zero-width logits (B, T, 0). Whatever the forward does to the logits after
the head (Gemma-2's softcapping, slicing) then runs on nothing; the loss is formed from the kept
input by ``linear_cross_entropy`` with transformers' shift, ignore_index -100 and ``num_items_in_batch``
(ForCausalLMLoss), and ``outputs.logits`` is None, as Liger does. In eval mode or without labels the
original forward runs untouched (full logits for Trainer.evaluate and generate).

What a forward does to the logits after the head must be known: the facts come from the config
(``LOGIT_FACTS``), and a forward whose source assigns ``logits`` in any other way is skipped with the
line quoted, as is a model whose loss is not transformers' ForCausalLMLoss.

Opt-in for now: ``tunefast.patch`` fuses the head only when TUNEFAST_FUSED_LM_HEAD=1 is set (read at
patch time). Other tests still count report entries without the head entry, and the Hugging Face
Trainer path fails with it ("exactly one of input_ids or inputs_embeds", tests/test_trainer.py): the
default flips once both are settled.

Caution: with bf16/fp16 heads the fused loss accumulates the logits in fp32 (Triton) where the
unfused head rounds them to bf16 first: equal to PEFT's loss to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from .registry import swap_in
from .report import PatchedEntry, SkippedEntry

ENABLE_ENV = "TUNEFAST_FUSED_LM_HEAD"  # "1": patch() fuses causal-LM heads (see the module docstring)
_STATE = "_tunefast_lm_head"  # in the swapped causal LM's __dict__ while patched
IGNORE_INDEX = -100  # transformers' ForCausalLMLoss default

# Config field -> how the forward post-processes the logits (checked in every tested family's source):
#   final_logit_softcapping  z = c * tanh(z / c)   Gemma 2/3/3n/4, VaultGemma, nanochat
#   logit_scale              z = z * s             Cohere, Cohere2
#   logits_scaling           z = z / s             Granite, GraniteMoE
LOGIT_FACTS = {
    "final_logit_softcapping": "softcap",
    "logit_scale": "scale",
    "logits_scaling": "inverse_scale",
}
# Lines of a forward's source that assign ``logits`` and are accounted for by LOGIT_FACTS (or harmless).
_KNOWN_LOGITS_LINES = re.compile(r"softcap|tanh\(logits\)|logit_scale|logits_scaling|\.float\(\)$")


class _HeadInput(nn.Module):
    """Stands in for the output head during a fused training forward: keeps the head's input and
    returns zero-width logits, so no (B, T, V) tensor is formed."""

    def __init__(self):
        super().__init__()
        self.x = None

    def forward(self, x):
        self.x = x
        return x.new_empty((*x.shape[:-1], 0))


# ----------------------------------------------------------------------------------------------------
# Finding the causal LM and its head; deciding
# ----------------------------------------------------------------------------------------------------


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(v if isinstance(v, (list, tuple)) else [v])
    return names


def _find_causal_lm(model: nn.Module):
    names = _causal_lm_class_names()
    from .registry import original_class

    for m in model.modules():
        if original_class(m).__name__ in names and hasattr(m, "get_output_embeddings"):
            return m
    return None


def _owner(root: nn.Module, module: nn.Module):
    """(qualified name, parent module, attribute) of ``module`` inside ``root``."""
    for name, parent in root.named_modules():
        for attr, child in parent.named_children():
            if child is module:
                return (f"{name}.{attr}" if name else attr), parent, attr
    return None


def _forward_source(cls) -> str:
    try:
        return inspect.getsource(inspect.unwrap(cls.forward))
    except (OSError, TypeError):
        return ""


def _head_blocker(head) -> str | None:
    if head is None:
        return "get_output_embeddings() returned None"
    if type(head) is nn.Linear:
        return None
    if hasattr(head, "lora_A") and hasattr(head, "base_layer"):
        return ("the head carries LoRA (target_modules include it): the fused low-rank term is not "
                "implemented yet, so PEFT's unfused head and loss run")
    if hasattr(head, "modules_to_save"):
        return ("the head is trained through PEFT's modules_to_save copy: not fused yet, PEFT's head and "
                "loss run")
    return f"the head is a {type(head).__name__}, not a plain nn.Linear: its forward is not the fused op's math"


def _forward_blocker(lm, head_attr: str) -> str | None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return f"the model's loss is {getattr(lm.loss_function, '__name__', lm.loss_function)!r}, not ForCausalLMLoss"
    src = _forward_source(type(lm))
    if "self.loss_function(" not in src:
        return f"{type(lm).__name__}.forward computes its loss itself, not through self.loss_function"
    if "labels" not in inspect.signature(type(lm).forward).parameters:
        return f"{type(lm).__name__}.forward takes no labels argument"
    for line in src.splitlines():
        s = line.strip()
        assigns = re.match(r"logits\s*(\[.*\])?\s*(=|\*=|/=|\+=)(?!=)", s) and not re.fullmatch(r"logits\s*=\s*logits,?", s)
        if assigns and f"self.{head_attr}(" not in s and "get_output_embeddings" not in s:
            if not _KNOWN_LOGITS_LINES.search(s):
                return f"{type(lm).__name__}.forward post-processes the logits in a way the fact table does not cover: {s!r}"
    return None


def _logit_facts(lm) -> dict:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    facts = dict(softcap=None, logit_scale=1.0)
    src = _forward_source(type(lm))
    for field, kind in LOGIT_FACTS.items():
        value = getattr(cfg, field, None)
        if value is None or field not in src:  # a field of that name the forward never reads
            continue
        if kind == "softcap":
            facts["softcap"] = float(value)
        elif kind == "scale":
            facts["logit_scale"] *= float(value)
        else:
            facts["logit_scale"] /= float(value)
    return facts


def _device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply(model, backend: str):
    """Model handler: fuse the training loss of the causal LM inside ``model``; None if there is none
    (or TUNEFAST_FUSED_LM_HEAD is not "1")."""
    if os.environ.get(ENABLE_ENV, "0") != "1":
        return None
    lm = _find_causal_lm(model)
    if lm is None or _is_side_model(model):
        return None
    head = lm.get_output_embeddings()
    owner = _owner(lm, head) if head is not None else None
    lm_name = _owner(model, lm)[0] if lm is not model else ""
    name = ".".join(p for p in (lm_name, owner[0] if owner else "get_output_embeddings()") if p)
    reason = _head_blocker(head) or (None if owner else "the head is not a submodule of the causal LM")
    reason = reason or _forward_blocker(lm, owner[2])
    if reason is not None:
        return [SkippedEntry(name, reason)]
    facts = _logit_facts(lm)
    labels_pos = list(inspect.signature(type(lm).forward).parameters).index("labels") - 1  # after self
    swap_in(lm, lm_forward, backend)
    lm.__dict__[_STATE] = dict(facts=facts, labels_pos=labels_pos)
    detail = ["training loss fused, no logits kept; eval / no labels: full logits"]
    if facts["softcap"]:
        detail.append(f"final logit softcap {facts['softcap']:g}")
    if facts["logit_scale"] != 1.0:
        detail.append(f"logit scale {facts['logit_scale']:g}")
    inputs = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if inputs is not None and getattr(inputs, "weight", None) is head.weight:
        detail.append("weight tied to the input embeddings")
    kernel = f"linear_cross_entropy[{_backend.resolve(backend, _device(model))}]"
    return [PatchedEntry(name, kernel, "; ".join(detail))]


def _is_side_model(model) -> bool:
    """Side-tuning models call linear_cross_entropy from their own head (methods/side/heads.py)."""
    from ..methods.side.model import SideModel

    return isinstance(model, SideModel)


def undo(model) -> None:
    """Model handler: drop the state (unpatch undoes the class swap)."""
    for m in model.modules():
        m.__dict__.pop(_STATE, None)


def register_handlers() -> None:
    from . import registry

    registry.register_model(nn.Module, apply, undo)


# ----------------------------------------------------------------------------------------------------
# The patched causal-LM forward
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _head_replaced(lm, stand_in):
    head = lm.get_output_embeddings()
    owner = _owner(lm, head)
    _, parent, attr = owner
    parent._modules[attr] = stand_in
    try:
        yield head
    finally:
        parent._modules[attr] = head


def _low_precision_inputs(x, head):
    """x, weight, bias as nn.Linear would multiply them (under autocast: the autocast dtype)."""
    w, b = head.weight, head.bias
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), w.to(dt), (b.to(dt) if b is not None else None)
    return x.to(w.dtype) if x.dtype != w.dtype else x, w, b


def lm_forward(self, *args, **kwargs):
    """Forward of a patched causal LM (see the module docstring)."""
    state = self.__dict__.get(_STATE)
    original = self._tunefast_original_class.forward
    labels = kwargs.get("labels")
    if (state is None or labels is None or not self.training or len(args) > state["labels_pos"]
            or kwargs.get("return_dict") is False):
        return original(self, *args, **kwargs)
    kwargs = dict(kwargs, labels=None)
    stand_in = _HeadInput()
    with _head_replaced(self, stand_in) as head:
        out = original(self, *args, **kwargs)
    x = stand_in.x
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.to(x.device).reshape(-1)
    if targets.shape[0] != x.shape[:-1].numel():  # e.g. logits_to_keep with labels: HF's own loss fails too
        raise ValueError(f"labels give {targets.shape[0]} targets but the head saw {x.shape[:-1].numel()} positions "
                         f"(hidden {tuple(x.shape)}); pass logits_to_keep=0 when training with labels")
    xs, w, b = _low_precision_inputs(x.reshape(-1, x.shape[-1]), head)
    from ..ops.linear_cross_entropy import linear_cross_entropy

    facts = state["facts"]
    loss = linear_cross_entropy(xs, w, targets, bias=b, ignore_index=IGNORE_INDEX,
                                num_items_in_batch=kwargs.get("num_items_in_batch"), softcap=facts["softcap"],
                                logit_scale=facts["logit_scale"], backend=self._tunefast_backend)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    return type(out)(loss=loss, logits=None, **fields)

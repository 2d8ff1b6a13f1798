"""Causal-LM heads -> the fused LM-head loss (tunefast/ops/linear_cross_entropy.py).

One mechanism for every Hugging Face causal LM, whatever it wraps (PEFT LoRA and the other injected
methods, prefix / prompt / P-tuning, tunefast sparse deltas). In training mode with ``labels`` the causal
LM's *own* forward runs without labels while its output head (found through ``get_output_embeddings()``,
never by attribute name) keeps its input and returns zero-width logits (B, T, 0): whatever the forward
does to the logits after the head (Gemma-2's softcapping, slicing) then runs on nothing, and the loss
is formed from the kept input by ``linear_cross_entropy`` with transformers' shift, ignore_index -100
and ``num_items_in_batch`` (ForCausalLMLoss). ``outputs.logits`` is then None, as Liger does. In eval
mode, without labels, under torch.compile, or when the head's dtype is one the op lacks (float64), the
original forward runs untouched: PEFT's head and loss, full logits.

Which module's class is swapped (``_controller``): PEFT's tuner (LoraModel, ...) when one wraps the
causal LM, since ``merge_and_unload()`` / ``unload()`` return the tuner's ``.model``: the merged model
is then the plain transformers class with nothing of tunefast in it. Otherwise (prompt learning, whose
PeftModel calls the causal LM directly; a plain or sparse model) the causal LM itself; its swapped
forward carries the original's signature (``__wrapped__``), which Trainer reads to keep dataset columns
and generate() to validate its arguments. The head is never swapped or replaced: for the length of one
fused forward it gets an instance ``forward`` that captures its input for the calling thread only
(another thread running the same head meanwhile gets its ordinary logits).

What a forward does to the logits after the head must be known: the facts come from the config
(``LOGIT_FACTS``), and a forward whose source assigns ``logits`` in any other way is skipped with the
line quoted, as is a model whose loss is not transformers' ForCausalLMLoss.

On by default: ``tunefast.patch(model, lm_head=False)`` leaves heads alone; TUNEFAST_FUSED_LM_HEAD=0 in
the environment does the same whatever the argument (side-by-side comparisons without code changes).

Caution: with bf16/fp16 heads the fused loss accumulates the logits in fp32 (Triton) where the
unfused head rounds them to bf16 first: equal to PEFT's loss to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from ..ops._checks import SUPPORTED_DTYPES
from .registry import original_class, swap_in
from .report import PatchedEntry, SkippedEntry

ENABLE_ENV = "TUNEFAST_FUSED_LM_HEAD"  # "0": patch() leaves heads alone (see the module docstring)
_STATE = "_tunefast_lm_head"  # in the swapped module's __dict__ while patched
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


# ----------------------------------------------------------------------------------------------------
# Capturing the head's input for one forward, in one thread
# ----------------------------------------------------------------------------------------------------

_LOCAL = threading.local()  # .slots: {id(head): [captured inputs]} of this thread's fused forwards
_INSTALL_LOCK = threading.Lock()
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()  # head -> fused forwards in flight


def _captured_forward(head, x):
    """The head's forward during a fused forward: the calling thread's input is kept and (B, T, 0)
    logits returned; any other thread gets the head's ordinary output."""
    slot = getattr(_LOCAL, "slots", {}).get(id(head))
    if slot is None:
        return type(head).forward(head, x)
    slot.append(x)
    return x.new_empty((*x.shape[:-1], 0))


@contextlib.contextmanager
def _capturing(head: nn.Module):
    """Within the block, this thread's calls of ``head`` are captured (yields the list they go to)."""
    slots = _LOCAL.__dict__.setdefault("slots", {})
    if id(head) in slots:
        raise RuntimeError("a fused LM-head forward re-entered itself on the same head in one thread")
    slot = slots[id(head)] = []
    with _INSTALL_LOCK:
        if _ACTIVE.get(head, 0) == 0:
            head.forward = functools.partial(_captured_forward, head)  # an instance attribute, shadows the class's
        _ACTIVE[head] = _ACTIVE.get(head, 0) + 1
    try:
        yield slot
    finally:
        del slots[id(head)]
        with _INSTALL_LOCK:
            _ACTIVE[head] -= 1
            if _ACTIVE[head] == 0:
                del _ACTIVE[head]
                del head.forward


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
    for m in model.modules():
        if original_class(m).__name__ in names and hasattr(m, "get_output_embeddings"):
            return m
    return None


def _controller(model: nn.Module, lm: nn.Module) -> nn.Module:
    """The module whose forward is swapped: the PEFT tuner whose ``.model`` is ``lm`` (its forward passes
    its arguments through to ``lm``), else ``lm`` (see the module docstring)."""
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:  # pragma: no cover - peft is a dependency
        return lm
    for m in model.modules():
        if isinstance(m, BaseTuner) and m.__dict__.get("_modules", {}).get("model") is lm:
            return m
    return lm


def _tuner_blocker(controller: nn.Module, lm: nn.Module) -> str | None:
    """Why a PEFT tuner's forward must keep the head: it does more than pass its arguments to the model
    (AdaLoRA adds its orthogonality penalty to ``outputs.loss``; fused, the model's call would get
    labels=None, return no loss, and the penalty would silently go: 4.86 vs PEFT's 10.88 on a tiny Llama)."""
    if controller is lm:
        return None
    from peft.tuners.tuners_utils import BaseTuner

    cls = original_class(controller)
    if cls.forward is not BaseTuner.forward:
        return (f"{cls.__name__}.forward post-processes the model's outputs (e.g. AdaLoRA's orthogonality "
                "penalty on the loss): PEFT's head and loss run")
    return None


def _lm_of(controller: nn.Module) -> nn.Module:
    return controller.__dict__["_modules"]["model"] if controller.__dict__.get(_STATE, {}).get("tuner") else controller


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


def _size_blocker(head) -> str | None:
    """The fused loss keeps dhidden (N, H) for backward where PEFT keeps the (N, V) logits and their
    log-softmax: with V <= H (toy vocabularies, e.g. the demo's 64 x 128) fusing would keep as much or more."""
    vocab, hidden = head.weight.shape
    if vocab <= hidden:
        return (f"vocabulary {vocab} <= hidden size {hidden}: the fused loss would keep (tokens, {hidden}) for "
                f"backward where PEFT keeps (tokens, {vocab}) logits; PEFT's head and loss run")
    return None


def _forward_blocker(lm, head_attr: str) -> str | None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    cls = original_class(lm)
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return f"the model's loss is {getattr(lm.loss_function, '__name__', lm.loss_function)!r}, not ForCausalLMLoss"
    src = _forward_source(cls)
    if "self.loss_function(" not in src:
        return f"{cls.__name__}.forward computes its loss itself, not through self.loss_function"
    if "labels" not in inspect.signature(cls.forward).parameters:
        return f"{cls.__name__}.forward takes no labels argument"
    for line in src.splitlines():
        s = line.strip()
        assigns = re.match(r"logits\s*(\[.*\])?\s*(=|\*=|/=|\+=)(?!=)", s) and not re.fullmatch(r"logits\s*=\s*logits,?", s)
        if assigns and f"self.{head_attr}(" not in s and "get_output_embeddings" not in s:
            if not _KNOWN_LOGITS_LINES.search(s):
                return f"{cls.__name__}.forward post-processes the logits in a way the fact table does not cover: {s!r}"
    return None


def _logit_facts(lm) -> dict:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    facts = dict(softcap=None, logit_scale=1.0)
    src = _forward_source(original_class(lm))
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


def enabled(lm_head: bool = True) -> bool:
    """Whether patch() fuses heads: its ``lm_head`` argument, unless TUNEFAST_FUSED_LM_HEAD=0."""
    return bool(lm_head) and os.environ.get(ENABLE_ENV, "1") != "0"


def is_fused(model: nn.Module) -> bool:
    """Whether a patch of ``model`` fused its causal LM's head."""
    return any(_STATE in m.__dict__ for m in model.modules())


def apply(model, backend: str):
    """Model handler: fuse the training loss of the causal LM inside ``model``; None if there is none.
    patch() calls it only when :func:`enabled`."""
    lm = _find_causal_lm(model)
    if lm is None or _is_side_model(model):
        return None
    head = lm.get_output_embeddings()
    owner = _owner(lm, head) if head is not None else None
    lm_name = _owner(model, lm)[0] if lm is not model else ""
    name = ".".join(p for p in (lm_name, owner[0] if owner else "get_output_embeddings()") if p)
    reason = _head_blocker(head) or (None if owner else "the head is not a submodule of the causal LM")
    reason = reason or _forward_blocker(lm, owner[2]) or _size_blocker(head)
    if reason is not None:
        return [SkippedEntry(name, reason)]
    facts = _logit_facts(lm)
    cls = original_class(lm)
    labels_pos = list(inspect.signature(cls.forward).parameters).index("labels") - 1  # after self
    controller = _controller(model, lm)
    reason = _tuner_blocker(controller, lm)
    if reason is not None:
        return [SkippedEntry(name, reason)]
    swap_in(controller, fused_forward, backend)
    _sign(type(controller), original_class(controller))
    controller.__dict__[_STATE] = dict(facts=facts, labels_pos=labels_pos, tuner=controller is not lm)
    detail = ["training loss fused, no logits kept; eval / no labels: full logits"]
    if facts["softcap"]:
        detail.append(f"final logit softcap {facts['softcap']:g}")
    if facts["logit_scale"] != 1.0:
        detail.append(f"logit scale {facts['logit_scale']:g}")
    inputs = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if inputs is not None and getattr(inputs, "weight", None) is head.weight:
        detail.append("weight tied to the input embeddings")
    impl = _backend.resolve(backend, _device(model))
    kernel = f"linear_cross_entropy[{'reference' if impl == 'native' else impl}]"  # no native twin: reference math
    return [PatchedEntry(name, kernel, "; ".join(detail))]


def _sign(fast: type, original: type) -> None:
    """Give the swapped class a forward with ``original.forward``'s signature (inspect follows
    ``__wrapped__``): Trainer drops the dataset columns the base model's forward does not name (with a
    bare ``(*args, **kwargs)`` it dropped input_ids), and generate() checks its arguments against it."""
    if "__wrapped__" in getattr(fast.__dict__.get("forward"), "__dict__", {}):
        return

    def forward(self, *args, **kwargs):
        return fused_forward(self, *args, **kwargs)

    forward.__doc__ = fused_forward.__doc__
    forward.__wrapped__ = original.forward
    fast.forward = forward


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
# The patched forward (of the tuner wrapping the causal LM, or of the causal LM)
# ----------------------------------------------------------------------------------------------------


def _op_dtype(head):
    """The dtype nn.Linear would multiply the head in (under autocast: the autocast dtype, except for
    float64, which autocast leaves alone), or None when linear_cross_entropy lacks it."""
    w = head.weight
    dev = w.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and w.dtype != torch.float64 else w.dtype
    return dt if dt in SUPPORTED_DTYPES else None


def _fuses(self, lm, state, args, kwargs):
    """The head to fuse for this call, or None: PEFT's own forward runs."""
    if (state is None or kwargs.get("labels") is None or not lm.training or len(args) > state["labels_pos"]
            or kwargs.get("return_dict") is False or torch.compiler.is_compiling()):
        return None
    head = lm.get_output_embeddings()
    if _head_blocker(head) is not None or _op_dtype(head) is None:  # e.g. the model moved to float64
        return None
    return head


def fused_forward(self, *args, **kwargs):
    """Forward of the patched module (see the module docstring)."""
    state = self.__dict__.get(_STATE)
    original = original_class(self).forward
    lm = _lm_of(self) if state is not None else self
    head = _fuses(self, lm, state, args, kwargs)
    if head is None:
        return original(self, *args, **kwargs)
    labels = kwargs["labels"]
    kwargs = dict(kwargs, labels=None)
    with _capturing(head) as slot:
        out = original(self, *args, **kwargs)
    if len(slot) != 1:
        raise RuntimeError(f"{type(lm).__name__}.forward called its head {len(slot)} times; the fused LM-head loss "
                           "expects one call (patch with lm_head=False for this model)")
    x = slot[0]
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.to(x.device).reshape(-1)
    if targets.shape[0] != x.shape[:-1].numel():  # e.g. logits_to_keep with labels: HF's own loss fails too
        raise ValueError(f"labels give {targets.shape[0]} targets but the head saw {x.shape[:-1].numel()} positions "
                         f"(hidden {tuple(x.shape)}); pass logits_to_keep=0 when training with labels")
    xs, w, b = _op_inputs(x.reshape(-1, x.shape[-1]), head)
    from ..ops.linear_cross_entropy import linear_cross_entropy

    facts = state["facts"]
    loss = linear_cross_entropy(xs, w, targets, bias=b, ignore_index=IGNORE_INDEX,
                                num_items_in_batch=kwargs.get("num_items_in_batch"), softcap=facts["softcap"],
                                logit_scale=facts["logit_scale"], backend=self._tunefast_backend)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    return type(out)(loss=loss, logits=None, **fields)


def _op_inputs(x, head):
    """x, weight, bias as nn.Linear would multiply them (under autocast: the autocast dtype)."""
    w, b = head.weight, head.bias
    dt = _op_dtype(head)
    if dt != w.dtype:  # autocast
        return x.to(dt), w.to(dt), (b.to(dt) if b is not None else None)
    if x.dtype != w.dtype:  # nn.Linear refuses mixed dtypes outside autocast: raise the same error as PEFT
        F.linear(x[:1], w, b)
        x = x.to(w.dtype)
    return x, w, b

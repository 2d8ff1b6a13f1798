"""``patch`` / ``unpatch``: one walk over the model, handlers by module type (see registry.py).

Every module of this package that defines ``register_handlers()`` is imported and registered here, in
name order: a new handler is a new file, with nothing else to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from torch import nn

from .. import backend as _backend
from . import lm_head as _lm_head
from . import state as _state
from .registry import Patch, handler_for, is_patched, model_handlers, swap_in, swap_out
from .report import PatchedEntry, PatchReport, SkippedEntry


def _register_all_handlers() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register_handlers", None)
        if callable(register):
            register()


_register_all_handlers()

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module (a peft.PeftModel, or a transformers model with PEFT layers "
            f"injected), got {type(model).__name__}"
        )


def _model_device(model):
    for p in model.parameters():
        return p.device
    return None


def _current(model: nn.Module) -> _state.PatchState | None:
    """The model's patch state, or None when it has none or it went stale: a patch of an enclosing (or
    nested) model took its modules over, and that patch's unpatch removed them."""
    state = _state.root_state(model)
    if state is not None and state.n_swapped and not _state.owns_any_module(state, model):
        model.__dict__.pop(_state.ROOT_KEY, None)
        return None
    return state


def patch(model: nn.Module, backend: str = "auto", *, lm_head: bool = True) -> PatchReport:
    """Route every supported PEFT layer of ``model`` through tunefast's fused kernels, in place.

    Args:
        model: a ``peft.PeftModel`` or any ``nn.Module`` containing PEFT tuner layers.
        backend: "auto" (Triton on CUDA tensors, or on CPU under TRITON_INTERPRET=1; else the
            plain-PyTorch reference), "triton" or "reference".
        lm_head: fuse the output head and loss of the causal LM inside ``model`` (tunefast/patching/lm_head.py):
            in training mode with ``labels`` the loss is computed without the (tokens x vocab) logits and
            ``outputs.logits`` is None; in eval mode or without labels the model returns full logits. False
            leaves the head exactly as PEFT runs it. The environment variable TUNEFAST_FUSED_LM_HEAD=0 turns
            it off whatever this argument says.

    Returns:
        A :class:`PatchReport` listing each patched module with its kernel and each skipped one with
        the reason. Patching an already patched model with the same backend is a no-op that returns
        the same report; :func:`unpatch` restores the original modules exactly. Patching a model that
        contains (or is contained in) a separately patched model takes those modules over: one
        ``unpatch`` of either then leaves nothing patched, and the other's report is dropped.
    """
    _check_model(model)
    _backend.check_backend_name(backend)
    fuse_head = _lm_head.enabled(lm_head)
    previous = _current(model)
    if previous is not None:
        if previous.backend != backend:
            raise ValueError(
                f"model is already patched with backend={previous.backend!r}; call tunefast.unpatch(model) "
                f"before patching with backend={backend!r}"
            )
        if _lm_head.is_fused(model) and not fuse_head:
            raise ValueError("model is already patched with its LM head fused; call tunefast.unpatch(model) before "
                             "patching with lm_head=False")
        return previous.report
    device = _model_device(model)
    if backend == "triton" and device is not None:
        _backend.resolve("triton", device)  # raises BackendUnavailableError with the reason

    report = PatchReport(backend=backend)
    for model_handler in model_handlers(model):
        if model_handler.apply is _lm_head.apply:  # after the walk: the head's entry comes last in the report
            continue
        for entry in model_handler.apply(model, backend) or ():
            (report.patched if isinstance(entry, PatchedEntry) else report.skipped).append(entry)
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is None:
            continue
        decision = handler.decide(module, backend)
        if isinstance(decision, Patch):
            swap_in(module, handler.forward, backend)
            report.patched.append(PatchedEntry(name, decision.kernel, decision.detail))
        else:
            if decision.resumes and handler.forward is not None:
                swap_in(module, handler.forward, backend)
            report.skipped.append(SkippedEntry(name, decision.reason))
    for entry in (_lm_head.apply(model, backend) if fuse_head else None) or ():
        (report.patched if isinstance(entry, PatchedEntry) else report.skipped).append(entry)
    if not report.patched and not report.skipped:
        warnings.warn("tunefast.patch found no PEFT layers in this model; nothing was changed", stacklevel=2)
    state = _state.PatchState(backend, report)
    swapped = [m for m in model.modules() if is_patched(m)]
    state.n_swapped = len(swapped)
    for m in model.modules():  # nested roots patched on their own: their modules are this patch's now
        m.__dict__.pop(_state.ROOT_KEY, None)
    _state.attach(state, model, swapped)
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: every module gets its original class (and forward) back. Returns ``model``."""
    _check_model(model)
    for model_handler in model_handlers(model):
        model_handler.undo(model)
    for module in model.modules():
        if is_patched(module):
            swap_out(module)
    _state.unwrap_checkpointing(model)
    _state.detach_all(model)
    return model


def get_report(model: nn.Module) -> PatchReport | None:
    """The report of the patch currently applied to ``model``, or None."""
    state = _current(model)
    return state.report if state is not None else None

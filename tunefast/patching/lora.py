"""PEFT LoRA layers -> the fused LoRA op.

Every ``peft.tuners.lora.Linear`` in any architecture is found by type; the facts that differ between
models live in the ``BASE_LAYOUTS`` table (how a base layer stores its weight), not in code.
Anything this handler cannot run exactly as PEFT does stays on PEFT's forward, with a reason.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backend as _backend
from ..ops.lora import lora_linear
from ..ops._checks import SUPPORTED_DTYPES
from .registry import Patch, Skip, register

try:  # GPT-2 style Conv1D (weight stored (in_features, out_features))
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

# base layer type -> True when its weight is stored (in_features, out_features) and must be viewed
# transposed. Subclasses (e.g. quantisation-free nn.Linear subclasses) match by isinstance.
BASE_LAYOUTS: dict[type, bool] = {nn.Linear: False}
if Conv1D is not None:
    BASE_LAYOUTS[Conv1D] = True

# PEFT LoRA variants (peft.tuners.lora.variants class names) the fused op implements exactly.
FUSED_VARIANTS = {"DoraLinearVariant"}


def _transposed_storage(base: nn.Module) -> bool | None:
    for cls, transposed in BASE_LAYOUTS.items():
        if isinstance(base, cls):
            return transposed
    return None


def _dropout_p(module: nn.Module) -> float | None:
    """Drop probability of a PEFT lora_dropout entry, 0 in eval mode; None if it is not a dropout."""
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p if module.training else 0.0
    return None


def decide(module, backend: str):
    base = module.get_base_layer()
    if _transposed_storage(base) is None:
        return Skip(f"LoRA on a {type(base).__name__} base is not accelerated yet")
    variants = {a: type(v).__name__ for a, v in module.lora_variant.items() if a in module.lora_A}
    unsupported = {a: v for a, v in variants.items() if v not in FUSED_VARIANTS}
    if unsupported:
        names = ", ".join(f"{a}: {v}" for a, v in sorted(unsupported.items()))
        return Skip(f"LoRA variant not accelerated yet ({names}); PEFT's forward runs")
    if variants and (len(module.lora_A) > 1 or any(module.lora_bias.get(a) for a in variants)):
        return Skip("DoRA is fused for a single adapter without lora_bias; PEFT's forward runs")
    weight = base.weight
    if weight.is_meta:
        raise ValueError(
            "the model has meta-device weights (shape only, no data): load or materialise them before "
            "tunefast.patch (e.g. from_pretrained without device_map='meta', or model.to_empty())"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        return Skip(f"base weight dtype {weight.dtype} (fused kernels take float32, float16, bfloat16)")
    if weight.requires_grad:
        return Skip("base weight is trainable; the fused op never forms base-weight gradients")
    bad_dropout = [a for a in module.lora_A if _dropout_p(module.lora_dropout[a]) is None]
    if bad_dropout:
        return Skip(f"custom lora_dropout module for adapter(s) {bad_dropout}")
    impl = _backend.resolve(backend, weight.device)
    kernel = f"dora_linear[{impl}]" if variants else f"lora_linear[{impl}]"
    if module.merged:
        return Skip(f"adapters merged into the base weight; {kernel} resumes after unmerge", resumes=True)
    if module.disable_adapters:
        return Skip(f"adapters disabled; {kernel} resumes when enabled", resumes=True)
    active = [a for a in module.active_adapters if a in module.lora_A]
    detail = ", ".join(f"{a}: r={module.r[a]}" for a in active)
    if variants and any(_dropout_p(module.lora_dropout[a]) for a in active if module.lora_dropout[a].training):
        detail += "; PEFT's forward runs while training with lora_dropout > 0 (DoRA then needs a second base product)"
    return Patch(kernel, detail)


def _fast_path_args(self, x, args, kwargs):
    """The fused op's arguments, or None where PEFT's forward must run to keep its exact behaviour."""
    if args or kwargs or self.disable_adapters or self.merged or not isinstance(x, torch.Tensor):
        return None
    active = [a for a in self.active_adapters if a in self.lora_A]
    dora = [a for a in active if a in self.lora_variant]
    if not active or (dora and (len(active) > 1 or type(self.lora_variant[dora[0]]).__name__ not in FUSED_VARIANTS)):
        return None
    base = self.get_base_layer()
    transposed = _transposed_storage(base)
    weight, bias = base.weight, getattr(base, "bias", None)
    if transposed is None or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    if transposed:
        weight = weight.t()
    a_w = [self.lora_A[a].weight for a in active]
    b_w = [self.lora_B[a].weight for a in active]
    ps = [_dropout_p(self.lora_dropout[a]) for a in active]
    if None in ps or (dora and (ps[0] > 0.0 or self.lora_bias.get(dora[0]))):
        return None
    magnitude = self.lora_magnitude_vector[dora[0]].weight if dora else None
    scalings = [float(self.scaling[a]) for a in active]
    for a, s in zip(active, scalings):  # PEFT lora_bias: s * b_B joins the base bias (one epilogue add)
        b_bias = self.lora_B[a].bias
        if b_bias is not None:
            bias = b_bias * s if bias is None else bias + b_bias * s
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # Do what autocast does to PEFT's F.linear calls: compute in the autocast dtype.
        dt = torch.get_autocast_dtype(device)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
        a_w, b_w = [t.to(dt) for t in a_w], [t.to(dt) for t in b_w]
        magnitude = magnitude.to(dt) if magnitude is not None else None
    elif x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES:
        return None
    elif not getattr(self, "cast_input_dtype_enabled", True) and any(t.dtype != x.dtype for t in a_w):
        return None
    return x, weight, bias, a_w, b_w, scalings, ps, magnitude


def fused_forward(self, x, *args, **kwargs):
    """Forward of a patched ``peft.tuners.lora.Linear``: the fused op, or PEFT's forward (see report)."""
    fast = _fast_path_args(self, x, args, kwargs)
    if fast is None:
        return self._tunefast_original_class.forward(self, x, *args, **kwargs)
    x, weight, bias, a_w, b_w, scalings, ps, magnitude = fast
    with torch.autocast(x.device.type, enabled=False):
        return lora_linear(x, weight, bias, a_w, b_w, scalings, ps, magnitude=magnitude, backend=self._tunefast_backend)


def _skip_other_lora_layer(module, backend):
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    kind = f"{type(module).__name__} on a {type(base).__name__} base" if base is not None else type(module).__name__
    return Skip(f"LoRA layer type {kind} is not accelerated yet")


def register_handlers() -> None:
    try:
        from peft.tuners.lora import layer as peft_lora
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    register(peft_lora.LoraLayer, _skip_other_lora_layer)
    register(peft_lora.Linear, decide, fused_forward)

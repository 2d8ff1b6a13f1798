"""PEFT LoRA layers on bitsandbytes bases (QLoRA) -> the fused QLoRA op.

Handles ``peft.tuners.lora.bnb.Linear4bit`` (nf4 / fp4, with or without double quantisation) and
``peft.tuners.lora.bnb.Linear8bitLt``. The fast forward does what PEFT's forward and bitsandbytes'
do, in the same dtypes:

  Linear4bit     x is cast to the layer's ``compute_dtype`` C (set from the first input when unset,
                 as bitsandbytes does); the weight is dequantised to C; the base output is cast back
                 to x's dtype; LoRA runs in the adapters' dtype on x; the sum is in x's dtype.
  Linear8bitLt   bitsandbytes' weight-dequantising matmul (``MatMul8bitFp``): W = CB * SCB / 127 in
                 x's dtype. bitsandbytes runs it in training mode on CPU / XPU; elsewhere (eval mode,
                 CUDA) it runs LLM.int8(), which quantises the activations to int8 as well: those
                 calls keep PEFT's forward (see ``_int8_reason``).
  autocast       everything in the autocast dtype, as autocast does to bitsandbytes' and PEFT's
                 F.linear calls; the weight is dequantised to C first, then cast.

When C differs from x's dtype, the op runs in the wider of the two, on the weight dequantised to C
(so rounded as bitsandbytes rounds it). With C narrower, the common QLoRA recipe (fp32 hidden states
after ``prepare_model_for_kbit_training``, ``bnb_4bit_compute_dtype=bfloat16``), that keeps the LoRA
term and its gradients exactly as PEFT computes them (from the unrounded x and dy) and makes the base
product more accurate than bitsandbytes' bf16 one, but runs it as an fp32 GEMM. Running only the base
product in C needs the dense op to take the base product's input separately from the LoRA input.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import backend as _backend
from ..ops._checks import SUPPORTED_DTYPES
from ..ops.qlora import QuantWeight, qlora_linear
from .lora import _dropout_p, active_or_skip, dropout_skip, plan_in_two_stages
from .registry import Patch, Skip, register


# ----------------------------------------------------------------------------------------------------
# bitsandbytes base layers -> QuantWeight
# ----------------------------------------------------------------------------------------------------


def _is_4bit(base: nn.Module) -> bool:
    import bitsandbytes as bnb  # present: only PEFT's bitsandbytes layers reach this handler

    return isinstance(base, bnb.nn.Linear4bit)


def _quant_weight_4bit(base: nn.Module) -> QuantWeight | Skip:
    weight = base.weight
    qs = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if qs is None:
        return Skip("4-bit weight is not quantised yet (no quant_state: move the layer to a device first)")
    if getattr(qs, "packing_format_for_cpu", False):
        # bitsandbytes undoes this on save / .cuda(); until then PEFT's forward runs
        return Skip("bitsandbytes repacked the weight for its AVX512 CPU inference kernel (eval, no grad)",
                    resumes=True)
    if qs.quant_type not in ("nf4", "fp4"):
        return Skip(f"unsupported 4-bit quantisation type {qs.quant_type!r} (tunefast dequantises nf4 and fp4)")
    if len(qs.shape) != 2 or tuple(qs.shape) != (base.out_features, base.in_features):
        return Skip(f"quantised shape {tuple(qs.shape)} is not (out_features, in_features)")
    common = dict(quant_type=qs.quant_type, shape=tuple(qs.shape), blocksize=qs.blocksize, dtype=qs.dtype)
    if getattr(qs, "state2", None) is None:
        return QuantWeight(weight.data, qs.absmax, **common)
    s2 = qs.state2
    return QuantWeight(weight.data, qs.absmax, absmax_code=s2.code, absmax_scale=s2.absmax,
                       absmax_blocksize=s2.blocksize, offset=qs.offset, **common)


def _quant_weight_8bit(base: nn.Module) -> QuantWeight | Skip:
    state = getattr(base, "state", None)
    if state is None:
        return Skip(f"bitsandbytes base {type(base).__name__} is not accelerated")
    if state.has_fp16_weights:
        return Skip("Linear8bitLt with has_fp16_weights=True re-quantises a trainable fp16 weight every forward")
    cb = state.CB if state.CB is not None else getattr(base.weight, "CB", None)
    scb = state.SCB if state.SCB is not None else getattr(base.weight, "SCB", None)
    if cb is None or scb is None:
        return Skip("int8 weight is not quantised yet (no CB / SCB: move the layer to a device first)")
    return QuantWeight(cb, scb, "int8", (base.out_features, base.in_features))


def _quant_weight(base: nn.Module) -> QuantWeight | Skip:
    """The base layer's weight as a QuantWeight, or the Skip saying why it cannot be read as one."""
    return _quant_weight_4bit(base) if _is_4bit(base) else _quant_weight_8bit(base)


def _int8_reason(base: nn.Module, device: torch.device) -> str | None:
    """Why bitsandbytes would run LLM.int8() (int8-quantised activations) rather than the weight-
    dequantising matmul the fused op computes: the condition of ``bitsandbytes.matmul``."""
    if device.type not in ("cpu", "xpu"):
        return (f"Linear8bitLt on {device.type} runs LLM.int8() (int8-quantised activations, fp16 outlier "
                "columns), which the fused op (weight dequantisation) does not reproduce")
    if not base.training:
        return "Linear8bitLt in eval mode runs LLM.int8() (int8-quantised activations)"
    return None


# ----------------------------------------------------------------------------------------------------
# decide / fast forward
# ----------------------------------------------------------------------------------------------------


def plan(module, backend: str, x=None):
    """The one eligibility decision of this handler: ``Patch(kernel, detail)`` or ``Skip(reason)``.

    Without ``x`` (patch time, the report): what the layer's configuration allows. With ``x`` (every
    forward): the same checks, then the call-time ones; a Patch then carries the op's arguments in
    ``args`` and a Skip says why this call runs PEFT's forward.
    """
    return plan_in_two_stages(module, backend, x, _plan_static, _plan_call)


def _plan_static(module, backend: str, with_detail: bool = True):
    base = module.get_base_layer()
    variants = {a: type(v).__name__ for a, v in module.lora_variant.items() if a in module.lora_A}
    if variants:
        names = ", ".join(f"{a}: {v}" for a, v in sorted(variants.items()))
        return Skip(f"LoRA variant on a bitsandbytes base not accelerated yet ({names}); PEFT's forward runs")
    if base.weight.is_meta:
        raise ValueError(
            "the model has meta-device weights (shape only, no data): load or materialise them before "
            "tunefast.patch (e.g. from_pretrained without device_map='meta', or model.to_empty())"
        )
    if base.weight.requires_grad:
        return Skip("base weight is trainable; the fused op never forms base-weight gradients")
    qw = _quant_weight(base)
    if isinstance(qw, Skip):
        return qw
    skip = dropout_skip(module.lora_A, module.lora_dropout)
    if skip is not None:
        return skip
    device = qw.device
    kernel = f"qlora_linear[{_backend.resolve(backend, device)}]"
    if qw.quant_type == "int8" and device.type not in ("cpu", "xpu"):
        return Skip(_int8_reason(base, device))
    active = active_or_skip(module, kernel, module.lora_A)
    if isinstance(active, Skip):
        return active
    if not with_detail:
        return Patch(kernel)
    detail = qw.describe()
    if qw.quant_type != "int8" and base.compute_dtype is not None:
        detail += f", compute {str(base.compute_dtype).removeprefix('torch.')}"
    if qw.quant_type == "int8":
        detail += " (training mode; eval runs PEFT's LLM.int8())"
    detail += "; " + ", ".join(f"{a}: r={module.r[a]}" for a in active)
    return Patch(kernel, detail)


decide = plan  # the registry's name for it: report and forward share one decision


def _prepare_base(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """Do to the base layer what its own forward would (so that unpatched calls later behave the
    same), and return the dtype its product is computed in."""
    if _is_4bit(base):
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        dtype = base.compute_dtype or x.dtype
    else:
        base.state.is_training = base.training
        if base.weight.CB is not None:
            base.init_8bit_state()
        dtype = x.dtype
    if base.bias is not None and base.bias.dtype != dtype:
        base.bias.data = base.bias.data.to(dtype)  # bitsandbytes casts the stored bias, in place
    return dtype


def _plan_call(self, x, kernel: str):
    """Call-time half of :func:`plan`: Patch(kernel, args=(qlora_linear's arguments, out dtype)) or
    Skip(why PEFT's forward runs for this call)."""
    if x.dtype not in SUPPORTED_DTYPES or x.numel() == 0:
        return Skip(f"input dtype {x.dtype} or an empty input")
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return Skip("no active adapter on this layer")
    base = self.get_base_layer()
    if base.weight.requires_grad and torch.is_grad_enabled():
        return Skip("the base weight needs a gradient")
    qw = _quant_weight(base)
    if isinstance(qw, Skip):
        return qw
    if qw.device != x.device:
        return Skip(f"input on {x.device}, quantised weight on {qw.device}")
    if qw.quant_type == "int8" and _int8_reason(base, x.device) is not None:
        return Skip(_int8_reason(base, x.device))
    ps = [_dropout_p(self.lora_dropout[a]) for a in active]
    if None in ps:
        return Skip("a custom lora_dropout module")
    a_w = [self.lora_A[a].weight for a in active]
    b_w = [self.lora_B[a].weight for a in active]
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    if not autocast and not getattr(self, "cast_input_dtype_enabled", True) and any(t.dtype != x.dtype for t in a_w):
        return Skip("cast_input_dtype disabled and adapter dtype differs from the input's")
    compute = _prepare_base(base, x)
    out_dtype = x.dtype
    if autocast:
        # PEFT adds the autocast-dtype LoRA term to the base output cast back to x's dtype.
        op_dtype = torch.get_autocast_dtype(device)
        out_dtype = torch.promote_types(x.dtype, op_dtype)
        x = x.to(compute)  # bitsandbytes casts to C, then autocast to its dtype
        a_w, b_w = [t.to(op_dtype) for t in a_w], [t.to(op_dtype) for t in b_w]
    else:
        # The wider of x's dtype and C, so that nothing PEFT computes from the unrounded x (the LoRA
        # term, its gradients) is rounded to a narrower C here (see the module docstring).
        op_dtype = torch.promote_types(x.dtype, compute)
    round_dtype = compute if compute != op_dtype else None  # bitsandbytes dequantises to C
    x = x.to(op_dtype)
    bias = base.bias.to(op_dtype) if base.bias is not None else None
    scalings = [float(self.scaling[a]) for a in active]
    for a, s in zip(active, scalings):  # PEFT lora_bias: s * b_B joins the base bias (one epilogue add)
        b_bias = self.lora_B[a].bias
        if b_bias is not None:
            b_bias = (b_bias * s).to(op_dtype)
            bias = b_bias if bias is None else bias + b_bias
    return Patch(kernel, args=(x, qw, bias, a_w, b_w, scalings, ps, round_dtype, out_dtype))


def fused_forward(self, x, *args, **kwargs):
    """Forward of a patched PEFT bitsandbytes LoRA layer: the fused op, or PEFT's forward (the Skip
    reasons of :func:`plan`)."""
    decision = plan(self, self._tunefast_backend, x) if not (args or kwargs) else Skip("extra forward arguments")
    if isinstance(decision, Skip):
        return self._tunefast_original_class.forward(self, x, *args, **kwargs)
    x, qw, bias, a_w, b_w, scalings, ps, round_dtype, out_dtype = decision.args
    with torch.autocast(x.device.type, enabled=False):
        y = qlora_linear(x, qw, bias, a_w, b_w, scalings, ps, round_dtype=round_dtype, backend=self._tunefast_backend)
    return y.to(out_dtype)


def register_handlers() -> None:
    try:  # peft.tuners.lora.bnb imports bitsandbytes; without it no such layers can exist
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return
    for name in ("Linear4bit", "Linear8bitLt"):
        cls = getattr(peft_bnb, name, None)  # defined only when bitsandbytes supports it
        if cls is not None:
            register(cls, decide, fused_forward)

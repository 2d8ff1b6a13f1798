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
from ..ops.routed_lora import routed_lora_linear
from ..ops._checks import SUPPORTED_DTYPES
from .registry import Patch, Skip, register
from .state import layer_state

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


def dropout_skip(adapters, dropouts, what: str = "lora_dropout") -> Skip | None:
    """A Skip naming the adapters whose dropout module (``dropouts[name]``, called ``what``) is not an
    nn.Dropout / nn.Identity, else None."""
    bad = [a for a in adapters if _dropout_p(dropouts[a]) is None]
    return Skip(f"custom {what} module for adapter(s) {bad}") if bad else None


def active_or_skip(module, kernel: str, adapters) -> list | Skip:
    """The active adapters among ``adapters``, or a Skip that resumes when merged adapters are unmerged or
    disabled ones enabled (``kernel`` named as what resumes)."""
    if module.merged:
        return Skip(f"adapters merged into the base weight; {kernel} resumes after unmerge", resumes=True)
    if module.disable_adapters:
        return Skip(f"adapters disabled; {kernel} resumes when enabled", resumes=True)
    return [a for a in module.active_adapters if a in adapters]


def wrapper_chain(module: nn.Module) -> list[str]:
    """Type names of the wrappers between a PEFT layer and the layer holding the weight (e.g.
    ["SparseLinear"] when tunefast sparse deltas wrap the base): PEFT's ``get_base_layer()`` skips them,
    so a fused op reading its weight would silently drop what they add."""
    chain, inner = [], module.base_layer
    while hasattr(inner, "base_layer"):
        chain.append(type(inner).__name__)
        inner = inner.base_layer
    return chain


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def peft_forward_needed(self, x) -> bool:
    """Call-time reasons for a patched LoRA layer to run PEFT's own forward, unchanged: hooks on its
    adapter submodules (they fire only where those modules are called: activation capture, pruning and
    probing tools), or meta tensors (shape-only runs: the op's kernels need data; PEFT's forward
    propagates shapes)."""
    if getattr(x, "is_meta", False) or self.get_base_layer().weight.is_meta:
        return True
    for a in self.active_adapters:
        for part in (self.lora_A, self.lora_B, self.lora_dropout):
            if a in part and _hooked(part[a]):
                return True
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or nn.modules.module._global_backward_hooks)


def plan(module, backend: str, x=None):
    """The one eligibility decision of this handler: ``Patch(kernel, detail)`` or ``Skip(reason)``.

    Without ``x`` (patch time, the report): what the layer's configuration allows. With ``x`` (every
    forward): the same checks, then the call-time ones (hooks, meta tensors, dtypes, autocast, a base
    weight needing a gradient); a Patch then carries the op's arguments in ``args``, and a Skip's reason
    is why this call runs PEFT's forward. The forward derives every fallback from here.
    """
    return plan_in_two_stages(module, backend, x, _plan_static, _plan_call)


def plan_in_two_stages(module, backend: str, x, static_plan, call_plan):
    """The shape of every PEFT-layer handler's ``plan``: call-time reasons PEFT's forward must run
    (hooks, meta tensors), then ``static_plan(module, backend, with_detail)`` (the report's decision),
    then, for a call, ``call_plan(module, x, kernel)``."""
    if x is not None and (not isinstance(x, torch.Tensor) or peft_forward_needed(module, x)):
        return Skip("hooks on its adapter modules (or global module hooks), meta tensors, or a non-tensor input")
    static = static_plan(module, backend, with_detail=x is None)
    if x is None or isinstance(static, Skip):
        return static
    return call_plan(module, x, static.kernel)


def _plan_static(module, backend: str, with_detail: bool = True):
    base = module.get_base_layer()
    chain = wrapper_chain(module)
    if chain:
        return Skip(f"base is wrapped ({' -> '.join(chain)} -> {type(base).__name__}): LoRA runs PEFT's forward "
                    "over the wrapper's own (patched) forward")
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
    if hasattr(weight, "ds_id") or weight.numel() == 0:
        return Skip("base weight is partitioned (DeepSpeed ZeRO-3): PEFT's forward runs; use FSDP2 "
                    "(torch.distributed.fsdp.fully_shard) for the fused path")
    if weight.is_meta:
        raise ValueError(
            "the model has meta-device weights (shape only, no data): load or materialise them before "
            "tunefast.patch (e.g. from_pretrained without device_map='meta', or model.to_empty())"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        return Skip(f"base weight dtype {weight.dtype} (fused kernels take float32, float16, bfloat16)")
    if weight.requires_grad:
        return Skip("base weight is trainable; the fused op never forms base-weight gradients")
    skip = dropout_skip(module.lora_A, module.lora_dropout)
    if skip is not None:
        return skip
    impl = _backend.resolve(backend, weight.device)
    kernel = f"dora_linear[{impl}]" if variants else f"lora_linear[{impl}]"
    active = active_or_skip(module, kernel, module.lora_A)
    if isinstance(active, Skip):
        return active
    if not with_detail:
        return Patch(kernel)
    detail = ", ".join(f"{a}: r={module.r[a]}" for a in active)
    if variants and any(_dropout_p(module.lora_dropout[a]) for a in active if module.lora_dropout[a].training):
        detail += "; PEFT's forward runs while training with lora_dropout > 0 (DoRA then needs a second base product)"
    return Patch(kernel, detail)


decide = plan  # the registry's name for it: report and forward share one decision


def _base(self):
    """(weight (N, K) view, bias) of the frozen base layer, or None if PEFT's forward must run."""
    base = self.get_base_layer()
    transposed = _transposed_storage(base)
    weight = base.weight
    if transposed is None or (weight.requires_grad and torch.is_grad_enabled()) or base is not self.base_layer:
        return None
    return (weight.t() if transposed else weight), getattr(base, "bias", None)


def _adapters(self, names):
    """(A list, B list, scalings, dropout ps) of adapters ``names``, or None for custom dropouts."""
    ps = [_dropout_p(self.lora_dropout[a]) for a in names]
    if None in ps:
        return None
    return ([self.lora_A[a].weight for a in names], [self.lora_B[a].weight for a in names],
            [float(self.scaling[a]) for a in names], ps)


def _cast(x, weight, bias, tensors):
    """Autocast's dtype for everything when autocast is on (what it does to PEFT's F.linear calls);
    None when x's dtype does not match the base weight (PEFT's own forward then decides)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dt = torch.get_autocast_dtype(device)
        cast = lambda t: t.to(dt) if t is not None else None  # noqa: E731
        return cast(x), cast(weight), cast(bias), [cast(t) for t in tensors]
    if x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES:
        return None
    return x, weight, bias, tensors


def _plan_call(self, x, kernel: str):
    """Call-time half of :func:`plan`: Patch(kernel, args=(lora_linear's arguments)) or Skip(why PEFT's
    forward runs for this call)."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    dora = [a for a in active if a in self.lora_variant]
    if not active:
        return Skip("no active adapter on this layer")
    if dora and len(active) > 1:
        return Skip("DoRA with more than one active adapter")
    base, adapters = _base(self), _adapters(self, active)
    if base is None:
        return Skip("the base weight needs a gradient")
    if adapters is None:
        return Skip("a custom lora_dropout module")
    (weight, bias), (a_w, b_w, scalings, ps) = base, adapters
    if dora and (ps[0] > 0.0 or self.lora_bias.get(dora[0])):
        return Skip("DoRA with lora_dropout > 0 in training, or with lora_bias")
    magnitude = self.lora_magnitude_vector[dora[0]].weight if dora else None
    autocast = torch.is_autocast_enabled(x.device.type)
    for a, s in zip(active, scalings):  # PEFT lora_bias: s * b_B joins the base bias (one epilogue add)
        b_bias = self.lora_B[a].bias
        if b_bias is not None:
            if b_bias.dtype != weight.dtype and not autocast:
                # PEFT adds b_B to the adapter-dtype term and rounds once to the base dtype; folded into a
                # base-dtype bias it would be rounded twice (and an fp32 bias cannot join an fp16 GEMM)
                return Skip(f"lora_bias dtype {b_bias.dtype} differs from the base weight's {weight.dtype}")
            bias = b_bias * s if bias is None else bias + b_bias * s
    cast = _cast(x, weight, bias, [*a_w, *b_w, *([magnitude] if dora else [])])
    if cast is None:
        return Skip(f"input dtype {x.dtype} differs from the base weight's {weight.dtype} (PEFT casts)")
    x, weight, bias, rest = cast
    n = len(active)
    a_w, b_w, magnitude = rest[:n], rest[n : 2 * n], (rest[2 * n] if dora else None)
    if not getattr(self, "cast_input_dtype_enabled", True) and any(t.dtype != x.dtype for t in a_w):
        return Skip("cast_input_dtype disabled and adapter dtype differs from the input's")
    return Patch(kernel, args=(x, weight, bias, a_w, b_w, scalings, ps, magnitude))


def _fused_call(self, x, decision):
    """Output of the fused op for a call ``plan`` accepted."""
    x, weight, bias, a_w, b_w, scalings, ps, magnitude = decision.args
    with torch.autocast(x.device.type, enabled=False):
        return lora_linear(x, weight, bias, a_w, b_w, scalings, ps, magnitude=magnitude, backend=self._tunefast_backend)


def _routed_call(self, x, names, adapter_ids):
    """Output of the routed op: adapter ``names[adapter_ids[t]]`` on token t (-1 or a name this layer
    lacks: the base model), or None where PEFT's forward must run."""
    present = [n for n in dict.fromkeys(names) if n in self.lora_A]
    if not present or any(n in self.lora_variant or self.lora_bias.get(n) for n in present):
        return None
    base, adapters = _base(self), _adapters(self, present)
    if base is None or adapters is None:
        return None
    (weight, bias), (a_w, b_w, scalings, ps) = base, adapters
    cast = _cast(x, weight, bias, [*a_w, *b_w])
    if cast is None or len({t.dtype for t in a_w}) > 1:
        return None
    x, weight, bias, rest = cast
    remap = torch.tensor([present.index(n) if n in present else -1 for n in names], device=adapter_ids.device)
    ids = torch.where(adapter_ids >= 0, remap[adapter_ids.clamp(min=0)], -1)
    with torch.autocast(x.device.type, enabled=False):
        return routed_lora_linear(x, weight, bias, rest[: len(present)], rest[len(present) :], scalings, ids, ps,
                                  backend=self._tunefast_backend)


def routable(self, adapters) -> str | None:
    """None when this layer runs routed for ``adapters`` (tunefast.route), else the reason it cannot."""
    if not isinstance(self, _LINEAR) or type(self).forward is not fused_forward:
        return f"{type(self).__name__} layers do not run routed"
    present = [a for a in adapters if a in self.lora_A]
    if any(a in self.lora_variant for a in present):
        return "DoRA adapters do not run routed"
    if any(self.lora_bias.get(a) for a in present):
        return "adapters with lora_bias do not run routed"
    if wrapper_chain(self) or _transposed_storage(self.get_base_layer()) is None:
        return f"its base ({type(self.base_layer).__name__}) is not a plain linear layer"
    if any(_dropout_p(self.lora_dropout[a]) is None for a in present):
        return "a custom lora_dropout module"
    return None


def _route_rows(route, x) -> list[str] | None:
    """PEFT's ``adapter_names`` (one per sequence, "__base__" for -1) for a route with one id per
    sequence of ``x``, or None for per-token routes (PEFT has no per-token forward)."""
    names, ids = route
    if not isinstance(x, torch.Tensor) or ids.dim() != 1 or x.dim() < 2 or ids.shape[0] != x.shape[0]:
        return None
    return [names[i] if i >= 0 else "__base__" for i in ids.tolist()]


def fused_forward(self, x, *args, **kwargs):
    """Forward of a patched ``peft.tuners.lora.Linear``: the fused op, the routed op for mixed-adapter
    batches (PEFT's ``adapter_names=`` or :func:`tunefast.route`), or PEFT's forward (see report)."""
    out = None
    state = layer_state(self)
    route = state.current_route() if state is not None else None
    if isinstance(x, torch.Tensor) and not args and not (self.disable_adapters or self.merged):
        names = kwargs.get("adapter_names")
        if peft_forward_needed(self, x):
            pass
        elif names is not None and set(kwargs) == {"adapter_names"}:
            self._check_forward_args(x, adapter_names=names)  # PEFT's own errors for bad names
            table = list(dict.fromkeys(names))
            ids = torch.tensor([table.index(n) if n != "__base__" else -1 for n in names], device=x.device)
            out = _routed_call(self, x, table, ids)
        elif not kwargs and route is not None:
            out = _routed_call(self, x, *route)
        elif not kwargs:
            decision = plan(self, self._tunefast_backend, x)
            out = _fused_call(self, x, decision) if isinstance(decision, Patch) else None
    if out is None:
        if route is not None and not kwargs and not (self.disable_adapters or self.merged):
            rows = _route_rows(route, x)
            if rows is not None:  # one adapter per sequence: PEFT's own mixed-batch forward gives its numbers
                return self._tunefast_original_class.forward(self, x, *args, adapter_names=rows)
            raise RuntimeError(
                "tunefast.route with per-token ids is active but this LoRA layer cannot run routed on this call (input dtype "
                f"{getattr(x, 'dtype', type(x).__name__)} vs base weight {self.get_base_layer().weight.dtype}, a "
                "trainable base weight, hooks on its adapter modules, or meta tensors): PEFT's forward would apply "
                "the active adapter to every token"
            )
        return self._tunefast_original_class.forward(self, x, *args, **kwargs)
    return out


def _skip_other_lora_layer(module, backend):
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    kind = f"{type(module).__name__} on a {type(base).__name__} base" if base is not None else type(module).__name__
    return Skip(f"LoRA layer type {kind} is not accelerated yet")


def register_handlers() -> None:
    try:
        from peft.tuners.lora import layer as peft_lora
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    global _LINEAR
    _LINEAR = peft_lora.Linear
    register(peft_lora.LoraLayer, _skip_other_lora_layer)
    register(peft_lora.Linear, decide, fused_forward)


_LINEAR: type = type(None)  # peft.tuners.lora.Linear once registered

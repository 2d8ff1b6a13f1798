"""PEFT's other low-rank and diagonal layers -> tunefast's fused ops, found by module type.

AdaLoRA and VeRA are instances of ``tunefast.ops.lora.lora_linear`` (y = x W^T + b + sum_i s_i *
(drop_i(x) A_i^T) B_i^T, optional column scale g), reached by folding their extra vectors into A or B
with a cheap (r, K) / (N, r) autograd product; gradients of the folded vectors come from autograd:

  AdaLoRA SVDLinear   s/(ranknum+1e-5) * (x (A*E)^T) B^T    A' = A * (E * s/(ranknum+1e-5)), s' = 1
  VeRA Linear         b * ((x A_s^T) * d) B_s^T             A' = d * A_s, B' = b * B_s, s' = 1
                      (A_s, B_s: the model's shared frozen projections, sliced to this layer)
  (IA)3 Linear (k/v)  (x W^T + b) * l                       lora_linear's column scale g = l, bias b * l
  (IA)3 Linear (ff)   (x * l) W^T + b                       tunefast.ops.scaled_linear (keeps x only)
  LoRA Embedding      E[ids] + s * A^T[ids] B^T             tunefast.ops.lora_embedding (keeps ids only)

AdaLoRA's ``update_and_allocate`` masks E in place between steps: E is read at every call, so the
fused path follows the rank allocation. Anything not reproduced exactly (DoRA or TP embeddings, other
base layer types, custom dropouts, sparse embedding gradients) is a Skip with a reason and runs PEFT's
forward.

Caution: the k/v (IA)3 path takes l's gradient from the op's column-scale rule dL/dg = sum_t dy (y - b') / g
(ops/lora.py), which is NaN where an entry of l is exactly 0 (PEFT gives a finite gradient there); the
feed-forward path has no division.
"""

from __future__ import annotations

import torch

from .. import backend as _backend
from ..ops._checks import SUPPORTED_DTYPES
from ..ops.lora import lora_linear
from ..ops.lora_embedding import lora_embedding
from ..ops.scaled_linear import scaled_linear
from .lora import _base, _cast, _dropout_p, _hooked, _transposed_storage, active_or_skip, dropout_skip
from .registry import Patch, Skip, register

ADALORA_EPS = 1e-5  # PEFT's SVDLinear divides by (ranknum + 1e-5)


def _base_skip(module) -> Skip | None:
    """A Skip when the frozen base layer cannot go through the fused op, else None."""
    base = module.get_base_layer()
    if _transposed_storage(base) is None:
        return Skip(f"{type(module).__name__} on a {type(base).__name__} base is not accelerated yet")
    weight = base.weight
    if hasattr(weight, "ds_id") or weight.numel() == 0:
        return Skip("base weight is partitioned (DeepSpeed ZeRO-3): PEFT's forward runs")
    if weight.is_meta:
        raise ValueError("the model has meta-device weights (shape only, no data): load or materialise them "
                         "before tunefast.patch")
    if weight.dtype not in SUPPORTED_DTYPES:
        return Skip(f"base weight dtype {weight.dtype} (fused kernels take float32, float16, bfloat16)")
    if weight.requires_grad:
        return Skip("base weight is trainable; the fused op never forms base-weight gradients")
    return None


def _kernel(name: str, module, backend: str) -> str:
    return f"{name}[{_backend.resolve(backend, module.get_base_layer().weight.device)}]"


def _dispatch(self, x, args, kwargs, fused):
    """``fused(self, x)`` when the call is a plain one on live adapters, else PEFT's own forward
    (merged or disabled adapters, extra arguments, or ``fused`` returning None)."""
    out = None
    if isinstance(x, torch.Tensor) and not args and not kwargs and not (self.disable_adapters or self.merged):
        out = fused(self, x)
    if out is None:
        return self._tunefast_original_class.forward(self, x, *args, **kwargs)
    return out


def _run(self, x, a_w, b_w, scalings, ps, *, extra_bias=None):
    """lora_linear on the frozen base with adapters (A_i, B_i); None where PEFT's forward must run."""
    base = _base(self)
    if base is None or None in ps:
        return None
    weight, bias = base
    cast = _cast(x, weight, bias, [*a_w, *b_w])
    if cast is None:
        return None
    x, weight, bias, rest = cast
    n = len(a_w)
    if any(t.dtype != rest[0].dtype for t in rest):
        return None
    with torch.autocast(x.device.type, enabled=False):
        return lora_linear(x, weight, bias, rest[:n], rest[n:], scalings, ps, backend=self._tunefast_backend)


def _decide_folded(module, backend, method: str, adapters, dropouts, dropout_name: str, folded: str,
                   refuse: Skip | None = None):
    """The decision for a layer run as lora_linear with its extra vectors folded into A / B (AdaLoRA,
    VeRA): ``refuse`` (a method-specific Skip) comes right after the base layer's checks."""
    skip = _base_skip(module)
    if skip is None:
        skip = refuse
    if skip is None:
        skip = dropout_skip(adapters, dropouts, dropout_name)
    if skip is not None:
        return skip
    kernel = _kernel("lora_linear", module, backend)
    active = active_or_skip(module, kernel, adapters)
    if isinstance(active, Skip):
        return active
    detail = ", ".join(f"{a}: r={module.r[a]}" for a in active)
    return Patch(kernel, f"{method} ({detail}); {folded}")


def _fused_folded(self, x, adapters, dropouts, fold):
    """lora_linear on the active adapters among ``adapters``, ``fold(self, name, x)`` giving each one's
    (A' (r, K), B' (N, r)) with scaling 1; None when none is active or PEFT's forward must run."""
    active = [a for a in self.active_adapters if a in adapters]
    if not active:
        return None
    folded = [fold(self, a, x) for a in active]
    ps = [_dropout_p(dropouts[a]) for a in active]
    return _run(self, x, [a for a, _ in folded], [b for _, b in folded], [1.0] * len(active), ps)


# ---------------------------------------------------------------------------------------------------
# AdaLoRA SVDLinear
# ---------------------------------------------------------------------------------------------------


def decide_adalora(module, backend):
    return _decide_folded(module, backend, "AdaLoRA", module.lora_A, module.lora_dropout, "lora_dropout",
                          "E and s/ranknum folded into A")


def _adalora_fold(self, name, x):
    # one (r, 1) vector: E * scaling / (ranknum + 1e-5), then one (r, K) product with A
    per_rank = self.lora_E[name] * (self.scaling[name] / (self.ranknum[name] + ADALORA_EPS))
    return self.lora_A[name] * per_rank, self.lora_B[name]


def _adalora_fused(self, x):
    return _fused_folded(self, x, self.lora_A, self.lora_dropout, _adalora_fold)


def forward_adalora(self, x, *args, **kwargs):
    """Forward of a patched ``peft.tuners.adalora.SVDLinear`` (see the module docstring)."""
    return _dispatch(self, x, args, kwargs, _adalora_fused)


# ---------------------------------------------------------------------------------------------------
# VeRA Linear
# ---------------------------------------------------------------------------------------------------


def decide_vera(module, backend):
    quantised = getattr(module, "quantization_backend", None) is not None
    return _decide_folded(module, backend, "VeRA", module.vera_lambda_d, module.vera_dropout, "vera_dropout",
                          "d folded into shared A, b into shared B",
                          refuse=Skip("VeRA on a quantised base is not accelerated yet") if quantised else None)


def _vera_fold(self, name, x):
    d, b = self.vera_lambda_d[name], self.vera_lambda_b[name]
    shared_a = self.vera_A[name][:, : self.in_features].to(x.device)  # (r, K) slice of the shared A
    shared_b = self.vera_B[name][: self.out_features, :].to(x.device)  # (N, r) slice of the shared B
    return d.unsqueeze(-1) * shared_a, b.unsqueeze(-1) * shared_b


def _vera_fused(self, x):
    return _fused_folded(self, x, self.vera_lambda_d, self.vera_dropout, _vera_fold)


def forward_vera(self, x, *args, **kwargs):
    """Forward of a patched ``peft.tuners.vera.Linear``: shared A/B with per-layer d/b folded in."""
    return _dispatch(self, x, args, kwargs, _vera_fused)


# ---------------------------------------------------------------------------------------------------
# (IA)3 Linear
# ---------------------------------------------------------------------------------------------------


def decide_ia3(module, backend):
    skip = _base_skip(module)
    if skip is not None:
        return skip
    wdt = module.get_base_layer().weight.dtype
    dtypes = {p.dtype for p in module.ia3_l.values()}
    if module.is_feedforward:
        # PEFT casts x to l's dtype, scales, casts back: the op follows that rule for any float l
        if len(dtypes) > 1 or not dtypes <= set(SUPPORTED_DTYPES):
            return Skip(f"(IA)3 vector dtypes {sorted(map(str, dtypes))}: the fused op takes one float32 / "
                        "float16 / bfloat16 dtype for all adapters; PEFT's forward runs")
        kernel = _kernel("scaled_linear", module, backend)
    else:
        other = sorted({str(d) for d in dtypes if d != wdt})
        if other:
            return Skip(f"(IA)3 vector dtype {', '.join(other)} differs from the base weight's {wdt}: PEFT's "
                        "promotions run as PEFT writes them")
        kernel = _kernel("lora_linear", module, backend)
    active = active_or_skip(module, kernel, module.ia3_l)
    if isinstance(active, Skip):
        return active
    what = "input scale (feed-forward), x kept once" if module.is_feedforward else "output scale as the column scale"
    return Patch(kernel, f"(IA)3 {what} ({', '.join(active)})")


def _ia3_scale(self, active):
    """The product of the active adapters' l vectors, flattened: PEFT's ``ia3_scaling``."""
    scale = self.ia3_l[active[0]].flatten()
    for a in active[1:]:
        scale = scale * self.ia3_l[a].flatten()
    return scale


def _ia3_fused(self, x):
    active = [a for a in self.active_adapters if a in self.ia3_l]
    base = _base(self)
    if not active or base is None:
        return None
    weight, bias = base
    if x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES or torch.is_autocast_enabled(x.device.type):
        return None  # PEFT's promotions (and autocast's casts) run as PEFT writes them
    if self.is_feedforward:
        if len({self.ia3_l[a].dtype for a in active}) > 1 or (bias is not None and bias.dtype != x.dtype):
            return None
        # ((x * l) W^T + b): x * l in l's dtype, rounded to x's, as PEFT; backward keeps x once
        return scaled_linear(x, weight, bias, _ia3_scale(self, active), backend=self._tunefast_backend)
    scale = _ia3_scale(self, active)
    if scale.dtype != weight.dtype:
        return None
    # (x W^T + b) * l = l * (x W^T) + b * l: the op's column scale, with the bias pre-scaled.
    n, k = weight.shape
    empty_a, empty_b = x.new_zeros(0, k), x.new_zeros(n, 0)  # rank 0: no low-rank term
    scaled_bias = bias * scale if bias is not None else None
    y, _ = torch.ops.tunefast.lora_linear_fwd(x, weight, scaled_bias, [empty_a], [empty_b], [1.0], [0.0], None,
                                              scale, self._tunefast_backend)
    return y


def forward_ia3(self, x, *args, **kwargs):
    """Forward of a patched ``peft.tuners.ia3.Linear``: output scale (k/v) or input scale (feed-forward)."""
    return _dispatch(self, x, args, kwargs, _ia3_fused)


# ---------------------------------------------------------------------------------------------------
# LoRA on nn.Embedding
# ---------------------------------------------------------------------------------------------------


def decide_embedding(module, backend):
    base = module.get_base_layer()
    if not isinstance(base, torch.nn.Embedding):
        return Skip(f"LoRA Embedding on a {type(base).__name__} base is not accelerated yet")
    if base.max_norm is not None:
        return Skip("embedding with max_norm renormalises A^T rows in place inside PEFT's forward; PEFT's forward runs")
    if base.sparse:
        return Skip("sparse embedding: PEFT gives A a sparse gradient; the fused op's is dense. PEFT's forward runs")
    if module.lora_variant:
        return Skip(f"LoRA Embedding variant(s) {sorted(type(v).__name__ for v in module.lora_variant.values())} "
                    "not accelerated yet")
    if getattr(module, "tp_layer", None) is not None:
        return Skip("tensor-parallel LoRA Embedding is not accelerated yet")
    if base.weight.requires_grad:
        return Skip("base embedding is trainable; PEFT's forward runs")
    if base.weight.dtype not in SUPPORTED_DTYPES:
        return Skip(f"base embedding dtype {base.weight.dtype} (fused kernels take float32, float16, bfloat16)")
    if module._get_embed_scale() is not None:
        return Skip("scaled word embedding (embed_scale): not accelerated yet, PEFT's forward runs")
    kernel = _kernel("lora_embedding", module, backend)
    active = active_or_skip(module, kernel, module.lora_embedding_A)
    if isinstance(active, Skip):
        return active
    return Patch(kernel, ", ".join(f"{a}: r={module.r[a]}" for a in active) +
                 "; gather of A^T rows + one up-projection, ids kept for backward")


def _embedding_fused(self, x):
    active = [a for a in self.active_adapters if a in self.lora_embedding_A]
    base = self.get_base_layer()
    if not active or base is not self.base_layer or _hooked(base) or base.weight.requires_grad:
        return None  # wrappers or hooks on the base embedding: PEFT calls it, so PEFT's forward runs
    if x.dtype not in (torch.int64, torch.int32) or torch.is_autocast_enabled(base.weight.device.type):
        return None
    weight = base.weight
    if any(t.dtype != weight.dtype for a in active for t in (self.lora_embedding_A[a], self.lora_embedding_B[a])):
        return None  # PEFT's promotions between the adapter's and the table's dtypes run as PEFT writes them
    opts = dict(padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq,
                backend=self._tunefast_backend)
    first, *rest = active
    out = lora_embedding(x, weight, self.lora_embedding_A[first], self.lora_embedding_B[first],
                         float(self.scaling[first]), **opts)
    for a in rest:  # several active adapters (rare): the others as PEFT computes them, through autograd
        after_a = self._embed(x, self.lora_embedding_A[a].t())
        out = out + (after_a @ self.lora_embedding_B[a].t()) * self.scaling[a]
    return out


def forward_embedding(self, x, *args, **kwargs):
    """Forward of a patched ``peft.tuners.lora.Embedding``: a gather instead of the down-projection."""
    return _dispatch(self, x, args, kwargs, _embedding_fused)


def _skip_layer(name):
    def decide(module, backend):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        on = f" on a {type(base).__name__} base" if base is not None else ""
        return Skip(f"{name} layer type {type(module).__name__}{on} is not accelerated yet")

    return decide


def register_handlers() -> None:
    try:
        from peft.tuners.adalora import layer as adalora
        from peft.tuners.ia3 import layer as ia3
        from peft.tuners.lora import layer as lora
        from peft.tuners.vera import layer as vera
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    register(adalora.SVDLinear, decide_adalora, forward_adalora)
    register(vera.VeraLayer, _skip_layer("VeRA"))
    register(vera.Linear, decide_vera, forward_vera)
    register(ia3.IA3Layer, _skip_layer("(IA)3"))
    register(ia3.Linear, decide_ia3, forward_ia3)
    register(lora.Embedding, decide_embedding, forward_embedding)

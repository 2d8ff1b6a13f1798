"""The side-tuning ops, registered with torch.library (fake + autograd):

``tunefast::ladder_merge_fwd`` / ``tunefast::ladder_merge_bwd``: one rung of a ladder side network,
    y = norm(g * (h W^T + b) + (1 - g) * side), dispatching to Triton (kernels/side.py) or the reference.
    Kept for backward: h (the no-grad backbone hidden state dW needs, whose storage the backbone made
    anyway) and the (M, N) side state. Unfused PyTorch keeps p, z, side and the statistics besides.

``tunefast::side_lm_loss``: the causal-LM head of a side network and its loss,
    sum CE((h_last + up(s)) E^T, targets): the fused LM-head loss (ops/linear_cross_entropy.py, the op
    tunefast.patch uses for causal LMs) with its gradient chained into the up-projection in the same
    pass (the LM head is frozen). Kept for backward: ds (M, N) and the up-projection's gradients; never
    the (M, V) logits, their softmax or an (M, D) hidden state.

Public entries: :func:`ladder_merge` and :func:`side_lm_loss`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as _backend
from ..reference import side as ref
from ._checks import check_input_and_weight, check_same_device, check_tensor
from .linear_cross_entropy import loss_sum_and_dhidden
from ..reference.linear_cross_entropy import default_chunk_rows

NORMS = ("rmsnorm", "layernorm")


def _resolve(backend: str, device: torch.device, width: int) -> str:
    which = _backend.resolve(backend, device)
    if which == "triton":
        from ..kernels.side import MAX_SIDE_WIDTH

        if width > MAX_SIDE_WIDTH:
            if backend == "triton":
                raise ValueError(
                    f"side width {width} > {MAX_SIDE_WIDTH}: the Triton ladder merge holds one row in a tile; "
                    "use a larger reduction_factor or backend='reference'"
                )
            return "reference"
    return which


# ----------------------------------------------------------------------------------------------------
# Ladder merge
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("tunefast::ladder_merge_fwd", mutates_args=())
def _ladder_merge_fwd(
    h: Tensor, weight: Tensor, bias: Optional[Tensor],  # backbone state (*, D); down-projection (N, D), (N,)
    side: Optional[Tensor], gate: Optional[Tensor],  # side state (*, N) and the (1,) fp32 gate, None on rung 0
    norm_weight: Tensor, norm_bias: Optional[Tensor], eps: float, rms: bool,  # the norm over N
    backend: str,
) -> Tensor:
    n = weight.shape[0]
    h2d = h.reshape(-1, h.shape[-1])
    s2d = side.reshape(-1, n) if side is not None else None
    if _resolve(backend, h.device, n) == "triton":
        from ..kernels import side as ks

        y = ks.ladder_merge_forward(h2d, weight, bias, s2d, gate, norm_weight, norm_bias, eps, rms)
    else:
        y = ref.merge_forward(h2d, weight, bias, s2d, gate, norm_weight, norm_bias, eps, rms)
    return y.view(*h.shape[:-1], n)


@_ladder_merge_fwd.register_fake
def _(h, weight, bias, side, gate, norm_weight, norm_bias, eps, rms, backend):
    return h.new_empty((*h.shape[:-1], weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("tunefast::ladder_merge_bwd", mutates_args=())
def _ladder_merge_bwd(
    grad_y: Tensor,
    h: Tensor, weight: Tensor, bias: Optional[Tensor],  # as in the forward
    side: Optional[Tensor], gate: Optional[Tensor],
    norm_weight: Tensor, eps: float, rms: bool,  # norm_bias is not needed for the gradients
    needs: list[bool],  # (dweight, dside)
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dweight, dbias, dside, dgate, dnorm_weight, dnorm_bias); absent or unneeded ones are empty."""
    need_dweight, need_dside = needs
    n = weight.shape[0]
    dy2d = grad_y.reshape(-1, n)
    h2d = h.reshape(-1, h.shape[-1])
    s2d = side.reshape(-1, n) if side is not None else None
    if _resolve(backend, h.device, n) == "triton":
        from ..kernels import side as ks

        grads = ks.ladder_merge_backward(
            dy2d, h2d, weight, bias, s2d, gate, norm_weight, eps, rms, need_dside, need_dweight
        )
    else:
        grads = ref.merge_backward(dy2d, h2d, weight, bias, s2d, gate, norm_weight, eps, rms, need_dside, need_dweight)
    dweight, dbias, dside, dgate, dnw, dnb = grads
    empty = grad_y.new_empty(0)
    return (
        dweight if dweight is not None else empty,
        dbias if dbias is not None else empty.clone(),
        dside.view(side.shape) if dside is not None else empty.clone(),
        dgate if dgate is not None else empty.clone(),
        dnw,
        dnb,
    )


@_ladder_merge_bwd.register_fake
def _(grad_y, h, weight, bias, side, gate, norm_weight, eps, rms, needs, backend):
    need_dweight, need_dside = needs
    empty = lambda: grad_y.new_empty(0)  # noqa: E731
    return (
        torch.empty_like(weight) if need_dweight else empty(),
        torch.empty_like(bias) if bias is not None else empty(),
        torch.empty_like(side) if side is not None and need_dside else empty(),
        grad_y.new_empty((1,), dtype=torch.float32) if side is not None else empty(),
        torch.empty_like(norm_weight),
        torch.empty_like(norm_weight),
    )


def _merge_setup_context(ctx, inputs, output):
    h, weight, bias, side, gate, norm_weight, norm_bias, eps, rms, backend = inputs
    # h is kept by reference: its storage is the backbone's output; side (M, N) is the only other activation.
    ctx.save_for_backward(h, weight, bias, side, gate, norm_weight)
    ctx.static = (eps, rms, backend)


def _merge_backward(ctx, grad_y):
    h, weight, bias, side, gate, norm_weight = ctx.saved_tensors
    eps, rms, backend = ctx.static
    need = ctx.needs_input_grad  # (h, weight, bias, side, gate, norm_weight, norm_bias, ...)
    dweight, dbias, dside, dgate, dnw, dnb = _ladder_merge_bwd(
        grad_y, h, weight, bias, side, gate, norm_weight, eps, rms, [need[1], need[3]], backend
    )
    pick = lambda i, g: g if need[i] else None  # noqa: E731
    return (None, pick(1, dweight), pick(2, dbias), pick(3, dside), pick(4, dgate), pick(5, dnw), pick(6, dnb),
            None, None, None)


torch.library.register_autograd("tunefast::ladder_merge_fwd", _merge_backward, setup_context=_merge_setup_context)


def ladder_merge(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    side: Optional[Tensor],
    gate,
    norm_weight: Tensor,
    norm_bias: Optional[Tensor] = None,
    *,
    eps: float = 1e-6,
    norm: str = "rmsnorm",
    backend: str = "auto",
) -> Tensor:
    """One ladder side-network rung: ``norm(g * (h W^T + b) + (1 - g) * side) * norm_weight (+ norm_bias)``.

    Args:
        h: (*, D) backbone hidden state, float32 / float16 / bfloat16, not requiring grad (the
            backbone runs without autograd; nothing flows back into it).
        weight: (N, D) down-projection to the side width N; bias: (N,) or None.
        side: (*, N) side-network state, weight's dtype, or None for the first rung (then
            ``y = norm(h W^T + b)`` and ``gate`` is ignored).
        gate: g in [0, 1]: a float or a one-element tensor (e.g. sigmoid(alpha / T), which then
            receives its gradient).
        norm_weight: (N,) scale of the norm; norm_bias: (N,) shift (LayerNorm only) or None.
        eps: added to the variance (LayerNorm) or mean square (RMSNorm).
        norm: "rmsnorm" or "layernorm", over the N side features.
        backend: "auto", "triton", "native" or "reference" (see tunefast.backend).

    Returns:
        (*, N) tensor of weight's dtype. h may have another dtype (bf16 backbone, fp32 side network):
        the product is then formed in fp32.
    """
    _check_merge_args(h, weight, bias, side, gate, norm_weight, norm_bias, eps, norm, backend)
    if side is not None:
        gate = torch.as_tensor(gate, device=h.device).to(torch.float32).reshape(1)
    else:
        gate = None
    rms = norm == "rmsnorm"
    return _ladder_merge_fwd(h, weight, bias, side, gate, norm_weight, norm_bias, float(eps), rms, backend)


def _check_merge_args(h, weight, bias, side, gate, norm_weight, norm_bias, eps, norm, backend):
    _backend.check_backend_name(backend)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    n, d = check_input_and_weight(h, weight, "h")
    if h.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "h requires grad: the ladder merge never back-propagates into the backbone; run the backbone "
            "under torch.no_grad() (tunefast.methods.side does) or pass h.detach()"
        )
    named = [("bias", bias, (n,)), ("norm_weight", norm_weight, (n,)), ("norm_bias", norm_bias, (n,))]
    if side is not None:
        named.append(("side", side, (*h.shape[:-1], n)))
    for name, t, shape in named:
        if t is None:
            continue
        check_tensor(t, name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                             f"(h {tuple(h.shape)}, weight {tuple(weight.shape)})")
        if t.dtype != weight.dtype:
            raise TypeError(
                f"{name} dtype {t.dtype} differs from weight dtype {weight.dtype}: the side network has one dtype"
            )
    if norm == "rmsnorm" and norm_bias is not None:
        raise ValueError("norm_bias must be None with norm='rmsnorm' (RMSNorm has no shift)")
    if side is not None:
        if isinstance(gate, Tensor):
            if gate.numel() != 1:
                raise ValueError(f"gate must hold one value, got shape {tuple(gate.shape)}")
        elif not isinstance(gate, (int, float)):
            raise TypeError(f"gate must be a float or a one-element tensor, got {type(gate).__name__}")
    if not float(eps) > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    check_same_device([("h", h), ("weight", weight), ("bias", bias), ("side", side), ("norm_weight", norm_weight),
                       ("norm_bias", norm_bias), ("gate", gate if isinstance(gate, Tensor) else None)])


# ----------------------------------------------------------------------------------------------------
# LM-head loss: the fused LM-head loss op (ops/linear_cross_entropy.py) chained into the up-projection
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("tunefast::side_lm_loss", mutates_args=())
def _side_lm_loss(
    s: Tensor, up_weight: Tensor, up_bias: Optional[Tensor],  # side output (M, N); up-projection (D, N), (D,)
    h_last: Tensor, lm_weight: Tensor, lm_bias: Optional[Tensor], targets: Tensor,  # frozen: (M, D), (V, D), (V,), (M,)
    chunk_rows: int,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss_sum, ds, dup_weight, dup_bias): the gradients of loss_sum, empty where not needed."""
    need_ds, need_dup = needs
    x = (h_last + F.linear(s, up_weight, up_bias)).to(lm_weight.dtype)  # transient (M, D): not kept
    loss, dx = loss_sum_and_dhidden(x, lm_weight, lm_bias, targets, need_dhidden=need_ds or need_dup,
                                    chunk_rows=chunk_rows, backend=backend)
    del x
    empty = lambda: s.new_empty(0)  # noqa: E731
    ds = dw = db = None
    if dx is not None:
        dx = dx.to(up_weight.dtype)  # the gradient reaching up(s), in up's dtype as autograd gives it
        ds = (dx @ up_weight).to(s.dtype) if need_ds else None
        if need_dup:
            dw = (dx.float().t() @ s.float()).to(up_weight.dtype)
            db = dx.float().sum(0).to(up_bias.dtype) if up_bias is not None else None
    return loss, (ds if ds is not None else empty()), (dw if dw is not None else empty()), (
        db if db is not None else empty())


@_side_lm_loss.register_fake
def _(s, up_weight, up_bias, h_last, lm_weight, lm_bias, targets, chunk_rows, needs, backend):
    need_ds, need_dup = needs
    empty = lambda: s.new_empty(0)  # noqa: E731
    return (
        s.new_empty((), dtype=torch.float32),
        torch.empty_like(s) if need_ds else empty(),
        torch.empty_like(up_weight) if need_dup else empty(),
        torch.empty_like(up_bias) if need_dup and up_bias is not None else empty(),
    )


def _lm_setup_context(ctx, inputs, output):
    _, ds, dw, db = output
    ctx.save_for_backward(ds, dw, db)  # already the gradients: nothing else is kept


def _lm_backward(ctx, grad_loss, *_unused):
    ds, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad  # (s, up_weight, up_bias, ...)
    scale = lambda g: (g * grad_loss).to(g.dtype)  # noqa: E731
    return (
        scale(ds) if need[0] else None,
        scale(dw) if need[1] else None,
        scale(db) if need[2] else None,
        None, None, None, None, None, None, None,
    )


torch.library.register_autograd("tunefast::side_lm_loss", _lm_backward, setup_context=_lm_setup_context)


def side_lm_loss(
    s: Tensor,
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    h_last: Tensor,
    lm_weight: Tensor,
    lm_bias: Optional[Tensor],
    targets: Tensor,
    *,
    chunk_rows: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Summed cross-entropy of a side network's LM head, without keeping logits for backward.

    ``logits = (h_last + s up_weight^T + up_bias).to(E.dtype) E^T + e`` with the frozen LM head (E, e);
    returns ``sum_{t: targets[t] != -100} CE(logits[t], targets[t])`` (divide by the token count for
    the mean). Gradients flow to s, up_weight and up_bias only. The loss and its gradient w.r.t. the
    head's input come from the fused LM-head loss (tunefast.ops.linear_cross_entropy: the same code
    ``tunefast.patch`` uses for causal LMs); this op only chains that gradient into the up-projection
    in the forward's pass, so that backward keeps ds (M, N) and the up-projection's gradients, never
    the (M, V) logits or the (M, D) head input.

    Args:
        s: (M, N) side-network output. up_weight: (D, N); up_bias: (D,) or None (s's dtype).
        h_last: (M, D) the backbone's last hidden state (no grad; any float dtype).
        lm_weight: (V, D) frozen LM-head weight; lm_bias: (V,) or None.
        targets: (M,) int64 class per row, -100 to ignore (already shifted for a causal LM).
        chunk_rows: reference backend: rows of logits formed at once (default: ~16M logits per chunk).
        backend: "auto", "triton", "native" or "reference" for the fused loss (see tunefast.backend).

    Returns:
        0-d float32 tensor.

    Caution: the gradients are formed in the forward (as Liger's fused linear cross-entropy does):
    calling backward is cheap, but a forward without backward costs the backward's matmuls too.
    """
    _backend.check_backend_name(backend)
    for name, t, nd in (("s", s, 2), ("up_weight", up_weight, 2), ("h_last", h_last, 2), ("lm_weight", lm_weight, 2)):
        check_tensor(t, name, ndim=nd)
    m, n = s.shape
    d = up_weight.shape[0]
    if up_weight.shape[1] != n or h_last.shape != (m, d) or lm_weight.shape[1] != d:
        raise ValueError(
            f"shapes do not fit: s {tuple(s.shape)}, up_weight {tuple(up_weight.shape)}, h_last "
            f"{tuple(h_last.shape)}, lm_weight {tuple(lm_weight.shape)}; expected (M, N), (D, N), (M, D), (V, D)"
        )
    if up_bias is not None and tuple(up_bias.shape) != (d,):
        raise ValueError(f"up_bias has shape {tuple(up_bias.shape)}, expected ({d},)")
    if lm_bias is not None and tuple(lm_bias.shape) != (lm_weight.shape[0],):
        raise ValueError(f"lm_bias has shape {tuple(lm_bias.shape)}, expected ({lm_weight.shape[0]},)")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.shape != (m,):
        raise ValueError(f"targets must be an int64 tensor of shape ({m},), got {getattr(targets, 'shape', targets)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h_last, lm_weight, lm_bias)):
        raise ValueError("h_last, lm_weight and lm_bias must not require grad: the side network's LM head is frozen")
    check_same_device([("s", s), ("up_weight", up_weight), ("up_bias", up_bias), ("h_last", h_last),
                       ("lm_weight", lm_weight), ("lm_bias", lm_bias), ("targets", targets)])
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(m, lm_weight.shape[0])
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    grad = torch.is_grad_enabled()
    up_grad = up_weight.requires_grad or (up_bias is not None and up_bias.requires_grad)
    needs = [grad and s.requires_grad, grad and up_grad]
    loss, *_ = _side_lm_loss(s, up_weight, up_bias, h_last, lm_weight, lm_bias, targets, int(rows), needs, backend)
    return loss

"""Argument checks shared by the public op entry points: clear errors, never a trace from a kernel."""

from __future__ import annotations

import torch

from .. import backend as _backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, name: str, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(
            f"{name} is a meta tensor (shape only, no data): load or materialise the model's weights "
            "before running it (e.g. from_pretrained without device_map='meta', or model.to_empty())"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(pairs) -> None:
    """``pairs``: iterable of (name, tensor); all must live on the first one's device."""
    pairs = [(n, t) for n, t in pairs if t is not None]
    name0, t0 = pairs[0]
    for name, t in pairs[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}: move them to one device")


def check_input_and_weight(x, weight, x_name: str = "x") -> tuple[int, int]:
    """x (*, K) and a 2-D weight (N, K) with the same K (x named ``x_name`` in errors). Returns (N, K)."""
    check_tensor(x, x_name, min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"{x_name} has {x.shape[-1]} features but weight expects {n_in} "
                         f"(weight shape {tuple(weight.shape)})")
    return n_out, n_in


def check_linear_args(x, weight, bias, backend, trains: str) -> tuple[int, int]:
    """Checks shared by the ops on a frozen linear base: x (*, K), weight (N, K), bias (N,). ``trains``
    names what the op trains instead of the weight (for the frozen-weight error). Returns (N, K)."""
    _backend.check_backend_name(backend)
    n_out, n_in = check_input_and_weight(x, weight)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"weight requires grad: this op trains only {trains} and never forms the dense weight's "
            "gradient; freeze it (weight.requires_grad_(False))"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}: cast x to the base layer's dtype")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias has {bias.shape[0]} entries, expected out_features={n_out}")
    return n_out, n_in


def check_adapter_lists(**seqs) -> None:
    """Per-adapter arguments must be sequences (one entry per adapter): a bare tensor would be taken
    row by row as adapters, and a count error would name the wrong thing."""
    for name, seq in seqs.items():
        if isinstance(seq, (torch.Tensor, str)) or not hasattr(seq, "__len__"):
            raise TypeError(f"{name} must be a list with one entry per adapter, got {type(seq).__name__}"
                            + (f" of shape {tuple(seq.shape)}" if isinstance(seq, torch.Tensor) else "")
                            + (f" (wrap a single adapter as [{name}])" if isinstance(seq, torch.Tensor) else ""))


def check_lora_args(x, weight, bias, lora_a, lora_b, scalings, dropout_p, backend) -> None:
    check_adapter_lists(lora_a=lora_a, lora_b=lora_b, scalings=scalings, dropout_p=dropout_p)
    n_out, n_in = check_linear_args(x, weight, bias, backend, "the adapters")
    n = len(lora_a)
    if n == 0:
        raise ValueError("lora_a is empty: at least one adapter is needed")
    for name, seq in (("lora_b", lora_b), ("scalings", scalings), ("dropout_p", dropout_p)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but lora_a has {n}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        check_tensor(a, f"lora_a[{i}]", ndim=2)
        check_tensor(b, f"lora_b[{i}]", ndim=2)
        if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"adapter {i}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not fit a "
                f"({n_out}, {n_in}) weight: expected (r, {n_in}) and ({n_out}, r)"
            )
        if a.dtype != b.dtype:
            raise TypeError(f"adapter {i}: lora_a dtype {a.dtype} differs from lora_b dtype {b.dtype}")
    check_same_device(
        [("x", x), ("weight", weight), ("bias", bias)]
        + [(f"lora_a[{i}]", a) for i, a in enumerate(lora_a)]
        + [(f"lora_b[{i}]", b) for i, b in enumerate(lora_b)]
    )
    for i, p in enumerate(dropout_p):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"dropout_p[{i}] must be in [0, 1], got {p}")


def check_dora_args(weight, lora_a, magnitude, dropout_p, training) -> None:
    check_tensor(magnitude, "magnitude", ndim=1)
    if magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"magnitude has {magnitude.shape[0]} entries, expected out_features={weight.shape[0]}")
    if len(lora_a) != 1:
        raise ValueError(f"DoRA (magnitude=...) takes exactly one adapter, got {len(lora_a)}")
    if training and float(dropout_p[0]) > 0.0:
        raise ValueError(
            "DoRA with dropout > 0 in training is not fused: PEFT then runs a second base product on the "
            "dropped input; use dropout 0 (or eval mode), or PEFT's own layer"
        )

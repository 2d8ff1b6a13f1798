"""The one tolerance table, keyed by dtype.

fp32: absolute error relative to the reference's scale. Low precision follows flash-attention's rule:
the kernel's error against an fp64 oracle may be at most FACTOR x PyTorch's own error doing the same
computation in that dtype (plus a floor for outputs that PyTorch happens to get exact).
"""

import torch

FP32_RTOL = 1e-5  # relative to max |reference|: the fp32 parity promised with PEFT
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ~1 ulp at unit scale


def max_err(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return (out.double() - oracle.double()).abs().max().item() if out.numel() else 0.0


def assert_close_to_oracle(out, oracle, torch_same_dtype=None, name="output"):
    """``out`` vs the fp64 ``oracle``; ``torch_same_dtype`` is PyTorch's own result in out's dtype."""
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    scale = max(oracle.abs().max().item(), 1e-6)
    err = max_err(out, oracle)
    if out.dtype == torch.float32:
        assert err <= FP32_RTOL * scale, f"{name}: fp32 error {err:.3g} > {FP32_RTOL} x {scale:.3g}"
        return
    assert torch_same_dtype is not None, "low-precision checks need PyTorch's own result"
    torch_err = max_err(torch_same_dtype, oracle)
    bound = LOW_PRECISION_FACTOR * torch_err + LOW_PRECISION_FLOOR[out.dtype] * scale
    assert err <= bound, f"{name}: {out.dtype} error {err:.3g} > {LOW_PRECISION_FACTOR} x torch's {torch_err:.3g} (+floor)"

"""Backends: "reference" is plain PyTorch only (the oracle), "native" runs the C++ kernels where an op has
them, "auto" picks Triton, then native, then reference. Same numbers everywhere (the dropout mask is one
counter-based draw: tunefast/reference/dropout.py)."""

from __future__ import annotations

import pytest
import torch

import tunefast
from tunefast import _native
from tunefast import backend as B
from tunefast.ops.sparse import implementation

needs_native = pytest.mark.skipif(not _native.CPU_AVAILABLE, reason="tunefast._C is not built")


def test_names_and_resolution():
    assert B.BACKENDS == ("auto", "triton", "native", "reference")
    cpu = torch.device("cpu")
    assert B.resolve("reference", cpu) == "reference"
    assert B.resolve("auto", cpu) == "triton"  # the tests run with TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="backend must be one of"):
        B.resolve("cuda", cpu)
    with pytest.raises(B.BackendUnavailableError, match="backend='native' is unavailable for meta"):
        B.resolve("native", torch.device("meta"))
    if _native.CPU_AVAILABLE:
        assert B.resolve("native", cpu) == "native"


def _spy_native(monkeypatch):
    calls = []
    for name in ("dropout_apply", "keep_mask"):
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    return calls


def _lora_with_dropout(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 16, generator=g, requires_grad=True)
    w, a, b = torch.randn(12, 16, generator=g), torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    a.requires_grad_(True)
    torch.manual_seed(3)  # the op draws its dropout seed from torch's generator
    y = tunefast.lora_linear(x, w, None, [a], [b], [0.5], [0.3], backend=backend)
    y.square().sum().backward()
    return y.detach(), x.grad, a.grad


@needs_native
def test_reference_is_plain_pytorch_and_native_runs_the_extension_with_the_same_numbers(monkeypatch):
    calls = _spy_native(monkeypatch)
    want = _lora_with_dropout("reference")
    assert calls == [], "backend='reference' ran native code"
    got = _lora_with_dropout("native")
    assert calls, "backend='native' did not run the native dropout kernels"
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not B.native_enabled()  # the block ends with the op


@needs_native
def test_sparse_implementation_follows_the_backend():
    cpu = torch.device("cpu")
    assert implementation("reference", cpu) == "torch"
    assert implementation("native", cpu) == "native"
    assert implementation("triton", cpu) == "triton"


def test_native_kernels_block_is_scoped():
    assert not B.native_enabled()
    with B.native_kernels(True):
        assert B.native_enabled()
        with B.native_kernels(False):
            assert not B.native_enabled()
        assert B.native_enabled()
    assert not B.native_enabled()

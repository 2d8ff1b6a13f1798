"""Which implementation runs an op.

  "reference"  plain PyTorch only: the oracle every kernel is tested against; always available.
  "native"     the C++ / CUDA kernels of csrc/ (tunefast._C, tunefast._C_cuda) where an op has them
               (dropout masks, sparse SpMM / SDDMM), plain PyTorch for the rest; needs the extension
               built for the tensors' device.
  "triton"     the Triton kernels: on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
               before Python started (that is how the tests run the kernels without a GPU).
  "auto"       "triton" where it can run on the tensors' device, else "native" where built, else
               "reference".

Ops ask :func:`resolve` and run their reference math inside ``native_kernels(impl == "native")``; the
reference functions that have a native twin use it only inside that block (:func:`native_enabled`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("auto", "triton", "native", "reference")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and what to do."""


def check_backend_name(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.cache
def triton_import() -> tuple[bool, str | None]:
    """(importable, reason if not)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return False, f"triton is not importable ({type(e).__name__}: {e}); pip install 'triton~=3.8'"
    return True, None


def interpreter_on() -> bool:
    """Whether Triton kernels run on CPU tensors through the interpreter in this process."""
    if not triton_import()[0]:
        return False
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # Triton < 3.4 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> tuple[bool, str | None]:
    ok, why = triton_import()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, None
    if device.type == "cpu":
        if interpreter_on():
            return True, None
        return False, "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before starting Python"
    return False, f"no Triton kernels for device type {device.type!r}"


def native_usable(device: torch.device) -> tuple[bool, str | None]:
    """Whether tunefast's compiled extension runs on ``device`` (and why not)."""
    from . import _native

    if device.type == "cpu":
        return (True, None) if _native.CPU_AVAILABLE else (False, "tunefast._C is not built (pip install -e . builds it)")
    if device.type == "cuda":
        return _native.cuda_usable()
    return False, f"no native kernels for device type {device.type!r}"


def resolve(backend: str, device: torch.device) -> str:
    """Map "auto" / "triton" / "native" / "reference" to the implementation that runs on ``device``:
    "triton", "native" or "reference" (see the module docstring)."""
    check_backend_name(backend)
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "native":
        ok, why = native_usable(device)
        if not ok:
            raise BackendUnavailableError(f"backend='native' is unavailable for {device.type} tensors: {why}")
        return "native"
    ok, why = triton_usable(device)
    if ok:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(f"backend='triton' is unavailable for {device.type} tensors: {why}")
    return "native" if native_usable(device)[0] else "reference"


_NATIVE = contextvars.ContextVar("tunefast_native_kernels", default=False)


@contextlib.contextmanager
def native_kernels(enabled: bool):
    """Inside the block (this thread / task only) reference math may use the native twins of its steps."""
    token = _NATIVE.set(bool(enabled))
    try:
        yield
    finally:
        _NATIVE.reset(token)


def native_enabled() -> bool:
    """Whether the innermost :func:`native_kernels` block allows native kernels (False outside any)."""
    return _NATIVE.get()

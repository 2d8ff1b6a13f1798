"""Which implementation runs an op: the Triton kernel or the plain-PyTorch reference.

  "reference"  plain PyTorch (+ the native C++ dropout-mask kernel when built): always available.
  "triton"     the Triton kernels: on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
               before Python started (that is how the tests run the kernels without a GPU).
  "auto"       "triton" where it can run on the tensors' device, else "reference".
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")


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


def resolve(backend: str, device: torch.device) -> str:
    """Map "auto" / "triton" / "reference" to the implementation that runs on ``device``."""
    check_backend_name(backend)
    if backend == "reference":
        return "reference"
    ok, why = triton_usable(device)
    if ok:
        return "triton"
    if backend == "triton":
        raise BackendUnavailableError(f"backend='triton' is unavailable for {device.type} tensors: {why}")
    return "reference"

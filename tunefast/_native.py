"""Torch-level access to the native dropout kernels: ``tunefast._C`` (CPU) and ``tunefast._C_cuda``.

Both extension modules are optional. Importing this module never fails: an extension that is
missing or broken is recorded in ``CPU_ERROR`` / ``CUDA_ERROR`` and only the functions that need it
raise, with that reason. The kernels draw the counter-based mask of ``tunefast.reference.dropout``
bit for bit, and their outputs equal that reference's (``x * mask * scale`` in the input dtype)
exactly, for float32, float16 and bfloat16.

These wrappers are not differentiable and not torch.library ops; the ops layer adds both.
"""

from __future__ import annotations

import importlib
import operator
from types import ModuleType

# torch first: its wheel loads its own libgomp.so.1, and _C, loaded after it, binds to that same
# library by soname. One OpenMP runtime then serves both, so torch.set_num_threads() also sets
# the threads of the native kernels and no second thread pool spins against torch's.
import torch

from tunefast.reference.dropout import keep_scale, keep_threshold

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _load(name: str, not_built: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as err:
        if err.name == name:
            return None, f"native module {name} not built ({not_built})"
        return None, f"{name} failed to import: {type(err).__name__}: {err}"
    except (ImportError, OSError) as err:  # e.g. an undefined symbol, a missing libgomp
        return None, f"{name} failed to import: {type(err).__name__}: {err}"


_C, CPU_ERROR = _load("tunefast._C", "pip install --no-build-isolation -e . builds it")
_C_cuda, CUDA_ERROR = _load(
    "tunefast._C_cuda", "it is built only when nvcc is found at install time: put nvcc on PATH and reinstall"
)
CPU_AVAILABLE: bool = _C is not None
CUDA_BUILT: bool = _C_cuda is not None


def cuda_usable() -> tuple[bool, str | None]:
    """(True, None) when CUDA tensors can use the native kernels, else (False, why not)."""
    if _C_cuda is None:
        return False, CUDA_ERROR
    if not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no driver or no GPU"
        return False, f"torch.cuda.is_available() is False (torch {torch.__version__}: {why})"
    return True, None


def status() -> dict:
    """What was built and what can run here, for ``tunefast info``."""
    usable, reason = cuda_usable()
    info = {
        "cpu_built": CPU_AVAILABLE,
        "cpu_error": CPU_ERROR,
        "openmp": bool(_C.openmp) if _C is not None else False,
        "cpu_threads": _C.max_threads() if _C is not None else None,
        "cuda_built": CUDA_BUILT,
        "cuda_error": CUDA_ERROR,
        "cuda_archs": _C_cuda.archs.split(",") if _C_cuda is not None else [],
        "cuda_runtime": None,
        "cuda_devices": None,
        "cuda_device_error": None,
        "cuda_usable": usable,
        "cuda_reason": reason,
    }
    if _C_cuda is not None:
        version = _C_cuda.runtime_version
        info["cuda_runtime"] = f"{version // 1000}.{version % 1000 // 10}"
        try:
            info["cuda_devices"] = _C_cuda.device_count()
        except RuntimeError as err:  # no driver / no GPU: report it, this is a diagnostic
            info["cuda_devices"] = 0
            info["cuda_device_error"] = str(err)
    return info


def _require(device: torch.device, fn: str) -> None:
    if device.type == "cpu":
        if _C is None:
            raise RuntimeError(f"tunefast {fn} on CPU needs tunefast._C: {CPU_ERROR}")
    elif device.type == "cuda":
        usable, why = cuda_usable()
        if not usable:
            raise RuntimeError(f"tunefast {fn} on CUDA needs tunefast._C_cuda and a GPU: {why}")
    else:
        raise ValueError(f"{fn}: tensors must be on cpu or cuda, got {device}")


def _launch(fn: str, device: torch.device, *args, **kwargs) -> None:
    """Call ``fn`` of the module for ``device`` (checked by ``_require``), on CUDA on the current stream."""
    if device.type == "cpu":
        getattr(_C, fn)(*args, **kwargs)
        return
    with torch.cuda.device(device):  # the module's own (static) runtime uses the current device
        getattr(_C_cuda, fn)(*args, stream=torch.cuda.current_stream(device).cuda_stream, **kwargs)


def _check_row_start(fn: str, row_start: int) -> int:
    row_start = operator.index(row_start)
    if row_start < 0:
        raise ValueError(f"{fn}: row_start must be >= 0, got {row_start}")
    return row_start


def _check_seed(seed: int) -> int:
    seed = operator.index(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _check_matrix(fn: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (rows, cols), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def keep_mask(seed: int, rows: int, cols: int, p: float, row_start: int = 0, device="cpu") -> torch.Tensor:
    """Keep mask of rows ``row_start .. row_start + rows`` of an (M, cols) matrix: bool (rows, cols).

    Equals ``tunefast.reference.dropout.keep_mask(seed, rows, cols, p, device, row_start)``.
    """
    seed = _check_seed(seed)
    for name, value in (("rows", rows), ("cols", cols), ("row_start", row_start)):
        if operator.index(value) < 0:
            raise ValueError(f"keep_mask: {name} must be >= 0, got {value}")
    threshold = keep_threshold(p)
    device = torch.device(device)
    _require(device, "keep_mask")
    out = torch.empty((rows, cols), dtype=torch.uint8, device=device)
    _launch("keep_mask", out.device, out.data_ptr(), rows, cols, row_start, seed, threshold)
    return out.view(torch.bool)


def dropout_apply(x2d: torch.Tensor, seed: int, p: float, row_start: int = 0) -> torch.Tensor:
    """Dropout of ``x2d`` (M, K): a new (M, K) tensor of the same dtype and device.

    Equals ``tunefast.reference.dropout.dropout(x2d, seed, p, row_start)`` bit for bit (kept
    elements scaled by 1 / (1 - p)); x2d's first row is row ``row_start`` of the matrix the mask
    is drawn for. ``x2d`` may be non-contiguous (it is copied first).
    """
    _check_matrix("dropout_apply", "x2d", x2d)
    seed = _check_seed(seed)
    row_start = _check_row_start("dropout_apply", row_start)
    threshold, scale = keep_threshold(p), keep_scale(p)
    _require(x2d.device, "dropout_apply")
    x = x2d.contiguous()
    out = torch.empty_like(x)
    rows, cols = x.shape
    _launch("dropout_apply", x.device, x.data_ptr(), out.data_ptr(), rows, cols,
            _DTYPE_CODES[x.dtype], seed, threshold, scale, row_start=row_start)
    return out


def dropout_add_(dst2d: torch.Tensor, src2d: torch.Tensor, seed: int, p: float, row_start: int = 0) -> torch.Tensor:
    """``dst2d += dropout(src2d)`` in place; both (M, K), same dtype and device. Returns ``dst2d``.

    Equals ``dst2d + tunefast.reference.dropout.dropout(src2d, seed, p, row_start)`` bit for bit.
    ``dst2d`` must be contiguous; ``src2d`` may not be (it is copied first).
    """
    _check_matrix("dropout_add_", "dst2d", dst2d)
    _check_matrix("dropout_add_", "src2d", src2d)
    if dst2d.shape != src2d.shape:
        raise ValueError(f"dropout_add_: shapes differ: dst2d {tuple(dst2d.shape)}, src2d {tuple(src2d.shape)}")
    if dst2d.dtype != src2d.dtype:
        raise TypeError(f"dropout_add_: dtypes differ: dst2d {dst2d.dtype}, src2d {src2d.dtype}")
    if dst2d.device != src2d.device:
        raise ValueError(f"dropout_add_: devices differ: dst2d {dst2d.device}, src2d {src2d.device}")
    if not dst2d.is_contiguous():
        raise ValueError("dropout_add_: dst2d must be contiguous (it is written in place)")
    seed = _check_seed(seed)
    row_start = _check_row_start("dropout_add_", row_start)
    threshold, scale = keep_threshold(p), keep_scale(p)
    _require(dst2d.device, "dropout_add_")
    src = src2d.contiguous()
    rows, cols = dst2d.shape
    _launch("dropout_add", dst2d.device, dst2d.data_ptr(), src.data_ptr(), rows, cols,
            _DTYPE_CODES[dst2d.dtype], seed, threshold, scale, row_start=row_start)
    # The write bypassed autograd: bump the version counter so a stale saved tensor is caught.
    torch.autograd.graph.increment_version(dst2d)
    return dst2d

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


# ---- sparse weight deltas (csrc/sparse.h; the math is tunefast/reference/sparse.py) -----------------

SPARSE_CPU: bool = _C is not None and hasattr(_C, "sparse_sddmm")
SPARSE_CUDA_BUILT: bool = _C_cuda is not None and hasattr(_C_cuda, "sparse_sddmm")


def sparse_usable(device: torch.device) -> tuple[bool, str | None]:
    """(True, None) when the native sparse kernels run on ``device``'s tensors, else (False, why not)."""
    device = torch.device(device)
    if device.type == "cpu":
        if _C is None:
            return False, CPU_ERROR
        return (True, None) if SPARSE_CPU else (False, "tunefast._C predates the sparse kernels: reinstall")
    if device.type == "cuda":
        usable, why = cuda_usable()
        if not usable:
            return False, why
        return (True, None) if SPARSE_CUDA_BUILT else (False, "tunefast._C_cuda predates the sparse kernels: reinstall")
    return False, f"no native kernels for device type {device.type!r}"


def _check_index(fn: str, name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device, n: int | None = None):
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be a 1-D {dtype} tensor")
    if t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, the operands on {device}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{fn}: {name} has {t.numel()} entries, expected {n}")


def sparse_sddmm(dy2d: torch.Tensor, x2d: torch.Tensor, indices: torch.Tensor, row_ptr: torch.Tensor) -> torch.Tensor:
    """(dy2d^T x2d) at ``indices`` as a new fp32 (nnz,) tensor, never forming the (N, K) product.

    dy2d (M, N) and x2d (M, K): same dtype and device (copied if not contiguous); ``indices`` (nnz,)
    int64 strictly increasing flat positions r * K + c; ``row_ptr`` (N + 1,) int64 their CSR row
    pointers (CPU only reads it). Equals ``tunefast.reference.sparse.sddmm`` up to fp32 summation order.
    """
    fn = "sparse_sddmm"
    _check_matrix(fn, "dy2d", dy2d)
    _check_matrix(fn, "x2d", x2d)
    if dy2d.dtype != x2d.dtype or dy2d.device != x2d.device or dy2d.shape[0] != x2d.shape[0]:
        raise ValueError(f"{fn}: dy2d {tuple(dy2d.shape)} {dy2d.dtype} and x2d {tuple(x2d.shape)} {x2d.dtype} must "
                         "share dtype, device and token count")
    (m, n), k = dy2d.shape, x2d.shape[1]
    _check_index(fn, "indices", indices, torch.int64, dy2d.device)
    _check_index(fn, "row_ptr", row_ptr, torch.int64, dy2d.device, n + 1)
    nnz = indices.numel()
    ok, why = sparse_usable(dy2d.device)
    if not ok:
        raise RuntimeError(f"tunefast {fn} on {dy2d.device.type}: {why}")
    dy, x, idx = dy2d.contiguous(), x2d.contiguous(), indices.contiguous()
    code = _DTYPE_CODES[dy.dtype]
    if dy.device.type == "cpu":
        out = torch.empty(nnz, dtype=torch.float32)
        _C.sparse_sddmm(dy.data_ptr(), x.data_ptr(), idx.data_ptr(), row_ptr.contiguous().data_ptr(),
                        out.data_ptr(), m, n, k, nnz, code)
        return out
    # Split the tokens until ~32 warps per SM are busy (a 0.1 % delta of a 4096^2 layer has 524).
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count
    warps = max(1, -(-nnz // 32))
    splits = max(1, min(-(-32 * sms // warps), max(1, m // 256), 65535))
    per = max(1, -(-m // splits))
    splits = max(1, -(-m // per))
    out = torch.empty((splits, nnz), device=dy.device, dtype=torch.float32)
    _launch(fn, dy.device, dy.data_ptr(), x.data_ptr(), idx.data_ptr(), out.data_ptr(), m, n, k, nnz,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), per, splits, code)
    return out[0] if splits == 1 else out.sum(0)


def sparse_spmm_(out2d: torch.Tensor, inp2d: torch.Tensor, seg_ptr: torch.Tensor, gather: torch.Tensor,
                 values: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """CPU: ``out2d`` (M, S) += the delta's product with ``inp2d`` (M, G), in place; returns ``out2d``.

    perm None (y += x Delta^T): S = N segments = rows, ``seg_ptr`` = row_ptr (N + 1,), ``gather`` = the
    int64 flat indices (column = index - row * G). perm given (dx += dy Delta): S = K segments = columns,
    ``seg_ptr`` = col_ptr (K + 1,), ``gather`` = t_rows (nnz,) int32, ``perm`` = t_perm (nnz,) int32.
    Each element of out is rounded once: round(out + fp32 sum), as the reference.
    """
    fn = "sparse_spmm_"
    _check_matrix(fn, "out2d", out2d)
    _check_matrix(fn, "inp2d", inp2d)
    if out2d.dtype != inp2d.dtype or out2d.shape[0] != inp2d.shape[0] or out2d.device != inp2d.device:
        raise ValueError(f"{fn}: out2d and inp2d must share dtype, device and token count")
    if not out2d.is_contiguous():
        raise ValueError(f"{fn}: out2d must be contiguous (it is written in place)")
    if out2d.device.type != "cpu":
        raise ValueError(f"{fn}: the native SpMM runs on CPU tensors (GPUs use kernels/sparse.py)")
    if values.dtype not in _DTYPE_CODES or values.dim() != 1:
        raise TypeError(f"{fn}: values must be a 1-D float32, float16 or bfloat16 tensor")
    (m, s), g = out2d.shape, inp2d.shape[1]
    nnz = values.numel()
    transposed = perm is not None
    _check_index(fn, "seg_ptr", seg_ptr, torch.int64, out2d.device, s + 1)
    _check_index(fn, "gather", gather, torch.int32 if transposed else torch.int64, out2d.device, nnz)
    if transposed:
        _check_index(fn, "perm", perm, torch.int32, out2d.device, nnz)
    ok, why = sparse_usable(out2d.device)
    if not ok:
        raise RuntimeError(f"tunefast {fn}: {why}")
    inp, v, gth = inp2d.contiguous(), values.contiguous(), gather.contiguous()
    prm = perm.contiguous() if transposed else None
    _C.sparse_spmm(out2d.data_ptr(), inp.data_ptr(), seg_ptr.contiguous().data_ptr(), gth.data_ptr(), v.data_ptr(),
                   prm.data_ptr() if transposed else 0, m, s, g, nnz, transposed,
                   _DTYPE_CODES[out2d.dtype], _DTYPE_CODES[v.dtype])
    torch.autograd.graph.increment_version(out2d)
    return out2d


def sparse_scatter_add_(weight_nk: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weight_nk[r_k, c_k] = round(weight_nk[r_k, c_k] + values[k])`` in place (fp32 sum); returns the
    original entries (nnz,) in the weight's dtype. ``weight_nk`` is the (N, K) weight or a strided view of
    it (a Conv1D weight's ``.t()``). Equals ``tunefast.reference.sparse.scatter_add_`` bit for bit."""
    fn = "sparse_scatter_add_"
    _check_matrix(fn, "weight_nk", weight_nk)
    if values.dtype not in _DTYPE_CODES or values.dim() != 1:
        raise TypeError(f"{fn}: values must be a 1-D float32, float16 or bfloat16 tensor")
    _check_index(fn, "indices", indices, torch.int64, weight_nk.device, values.numel())
    if values.device != weight_nk.device:
        raise ValueError(f"{fn}: values is on {values.device}, weight_nk on {weight_nk.device}")
    ok, why = sparse_usable(weight_nk.device)
    if not ok:
        raise RuntimeError(f"tunefast {fn} on {weight_nk.device.type}: {why}")
    n, k = weight_nk.shape
    idx, v = indices.contiguous(), values.contiguous()
    saved = torch.empty(idx.numel(), device=weight_nk.device, dtype=weight_nk.dtype)
    _launch("sparse_scatter_add", weight_nk.device, weight_nk.data_ptr(), weight_nk.stride(0), weight_nk.stride(1),
            idx.data_ptr(), v.data_ptr(), saved.data_ptr(), n, k, idx.numel(),
            _DTYPE_CODES[weight_nk.dtype], _DTYPE_CODES[v.dtype])
    torch.autograd.graph.increment_version(weight_nk)
    return saved

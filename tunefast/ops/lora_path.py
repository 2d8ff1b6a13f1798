"""Which GPU path computes the LoRA op's dense product, chosen per shape class by measuring both.

    "triton"  one fused launch (kernels/lora.py ``lora_linear``): the base GEMM with the low-rank term,
              the column scale and the bias in its epilogue. Saves a pass over the (M, N) output, but its
              GEMM is Triton's, which on Hopper is not guaranteed to match cuBLAS.
    "cublas"  the base product by torch (``F.linear`` / ``torch.mm``: cuBLAS on a GPU, PEFT's own GEMM),
              then the low-rank term added in place: ``out.addmm_(xa, B^T, alpha=s)`` where dtypes match
              and no mask applies, else the same Triton kernel with no main product (``has_main=False,
              accumulate=True``: fp32 accumulation, the dropout mask regenerated, one rounding).

Both paths take the same inputs (``xa = drop(x) A^T`` comes from the same Triton launcher either way)
and keep the same tensors for backward; only the rounding order of the sum differs (one rounding in
the fused kernel, the base product rounded first on the cuBLAS path, as PEFT does).

Selection (``choose``), per :class:`ShapeClass` (op, M bucket, N, K, ranks, dtypes, dropout on/off,
column scale, device name):

  1. override: ``TUNEFAST_LORA_PATH=triton|cublas`` or :func:`set_lora_path` (the setter wins over the
     variable); "auto" (the default) goes on;
  2. a cached choice for the shape class: in-process, else the disk cache (``TUNEFAST_CACHE_DIR``, else
     ``$XDG_CACHE_HOME/tunefast``, else ``~/.cache/tunefast``; file ``lora_path.json``; entries of another
     torch / triton version are ignored; ``TUNEFAST_LORA_PATH_CACHE=0`` turns the file off);
  3. with autotuning on (kernels/launch.py: ``TUNEFAST_AUTOTUNE``) and a timer: both paths timed on the
     real inputs (CUDA events: ``WARMUP`` launches, which also absorb Triton's compile and autotuning,
     then ``REPS`` timed ones, median), the faster one cached with both times;
  4. otherwise the fixed rule (:data:`RULE`): "cublas" on a CUDA device, "triton" on CPU tensors
     (the interpreter, where nothing meaningful can be timed and the tests check the fused kernel).

Caution: the timing has never run on a GPU (no GPU was available where this was written); the CPU
tests drive the selection logic with an injected timer. Timing is skipped while a CUDA graph is being
captured (the rule answers, uncached). Ranks in a DDP job may time differently and pick different
paths: the numbers differ by rounding only; set ``TUNEFAST_LORA_PATH`` for bit-identical paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import threading
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

PATHS = ("triton", "cublas")
MODES = ("auto",) + PATHS
ENV = "TUNEFAST_LORA_PATH"
CACHE_ENV = "TUNEFAST_LORA_PATH_CACHE"
WARMUP, REPS = 3, 10
RULE = ("without a measurement: 'cublas' on a CUDA device (PEFT's own base GEMM plus one in-place low-rank "
        "pass, so never slower than PEFT's base product by construction), 'triton' on CPU tensors (the "
        "interpreter: the fused kernel the tests check)")

# timer(path, fn) -> milliseconds per call of fn (fn runs one path once and returns its output)
Timer = Callable[[str, Callable[[], object]], float]


@dataclasses.dataclass(frozen=True)
class ShapeClass:
    """What a choice is cached by. ``op`` "fwd": y (M, N) = x (M, K) W^T + low-rank; "dx": dx (M, N=in)
    = dy (M, K=out) W + low-rank. M is bucketed to the next power of two; the rest is exact."""

    op: str
    m_bucket: int
    n: int
    k: int
    ranks: tuple
    dtype: str
    adapter_dtype: str
    dropout: bool
    col_scale: bool
    device: str

    def text(self) -> str:
        return (f"{self.op} M<={self.m_bucket} N={self.n} K={self.k} r={','.join(map(str, self.ranks))} "
                f"{self.dtype}/{self.adapter_dtype}{' dropout' if self.dropout else ''}"
                f"{' colscale' if self.col_scale else ''} on {self.device}")


@dataclasses.dataclass(frozen=True)
class Choice:
    path: str
    how: str  # "measured", "disk" (measured by an earlier process) or "rule"
    times_ms: Optional[dict] = None  # path -> median ms, when measured

    def describe(self) -> str:
        if not self.times_ms:
            return f"{self.path} ({self.how})"
        times = ", ".join(f"{p} {t:.4g} ms" for p, t in sorted(self.times_ms.items()))
        return f"{self.path} ({self.how}: {times})"


_LOCK = threading.Lock()
_CHOICES: dict[str, tuple[ShapeClass, Choice]] = {}  # ShapeClass.text() -> (class, choice), this process
_FAST: dict[tuple, str] = {}  # pick()'s raw key (+ timer / autotune state) -> path, for decided launches
_override: Optional[str] = None
_timer: Optional[Timer] = None
_disk_loaded: Optional[dict] = None  # text -> Choice from the file, read once


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def shape_class(op: str, m: int, n: int, k: int, ranks, dtype: torch.dtype, adapter_dtype: torch.dtype,
                dropout: bool, col_scale: bool, device: torch.device) -> ShapeClass:
    """The cache key of one launch (see :class:`ShapeClass`)."""
    return ShapeClass(op, 1 << max(int(m) - 1, 0).bit_length(), int(n), int(k), tuple(int(r) for r in ranks),
                      _dtype_name(dtype), _dtype_name(adapter_dtype), bool(dropout), bool(col_scale),
                      device_name(device))


# ----------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------


def _check_mode(value, what: str) -> str:
    if value not in MODES:
        raise ValueError(f"{what} must be one of {MODES}, got {value!r}")
    return value


def mode() -> str:
    """The effective mode: :func:`set_lora_path`'s value, else ``TUNEFAST_LORA_PATH``, else "auto"."""
    if _override is not None:
        return _override
    return _check_mode(os.environ.get(ENV, "auto").strip().lower() or "auto", f"the environment variable {ENV}")


def set_lora_path(path: Optional[str]) -> Optional[str]:
    """Force "triton" or "cublas" for every LoRA launch in this process ("auto": measure; None: back to
    ``TUNEFAST_LORA_PATH``). Returns the previous setting. Applies where the op runs its Triton backend."""
    global _override
    previous = _override
    _override = None if path is None else _check_mode(path, "set_lora_path(path)")
    return previous


@contextlib.contextmanager
def use_lora_path(path: Optional[str]):
    """:func:`set_lora_path` inside the block only."""
    previous = set_lora_path(path)
    try:
        yield
    finally:
        set_lora_path(previous)


def set_timer(timer: Optional[Timer]) -> Optional[Timer]:
    """Inject the timer used for measuring (tests: a fake clock; also makes CPU tensors measurable).
    None restores CUDA events on CUDA devices and the rule elsewhere. Returns the previous timer."""
    global _timer
    previous, _timer = _timer, timer
    _FAST.clear()  # decisions the rule made without a timer may now be measured
    return previous


def clear(memory_only: bool = True) -> None:
    """Forget every cached choice of this process (and, with ``memory_only=False``, the disk file's)."""
    global _disk_loaded
    with _LOCK:
        _CHOICES.clear()
        _FAST.clear()
        _disk_loaded = None
    if not memory_only:
        with contextlib.suppress(FileNotFoundError):
            cache_file().unlink()


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def cuda_event_timer(path: str, fn: Callable[[], object], warmup: int = WARMUP, reps: int = REPS) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream: ``warmup`` untimed calls (Triton's
    compile and autotuning land there), then ``reps`` calls each between two events. Never run on a GPU."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


@functools.cache
def _launch():
    from ..kernels import launch  # imports triton: only where a Triton path runs

    return launch


def _autotune_on() -> bool:
    return _launch().autotune_enabled()


def pick(op: str, m: int, n: int, k: int, ranks: tuple, dtype: torch.dtype, adapter_dtype: torch.dtype,
         dropout: bool, col_scale: bool, device: torch.device, runners: Mapping[str, Callable[[], object]]) -> str:
    """:func:`choose` for one launch, from its raw sizes. A decided launch costs a dict lookup on a
    plain tuple (building the :class:`ShapeClass` and its text cost ~30 us a call on the CPU box:
    twice per layer per step)."""
    chosen = mode()
    if chosen != "auto":
        return chosen
    fast = (op, max(m - 1, 0).bit_length(), n, k, ranks, dtype, adapter_dtype, dropout, col_scale, device,
            _timer is not None, _autotune_on())
    path = _FAST.get(fast)
    if path is None:
        sc = shape_class(op, m, n, k, ranks, dtype, adapter_dtype, dropout, col_scale, device)
        path = choose(sc, runners, device)
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            _FAST[fast] = path
    return path


def choose(sc: ShapeClass, runners: Mapping[str, Callable[[], object]], device: torch.device) -> str:
    """The path to run for ``sc`` (see the module docstring for the order). ``runners`` maps each of
    :data:`PATHS` to a call that runs that path once on the real inputs (used only for timing)."""
    chosen = mode()
    if chosen != "auto":
        return chosen
    key = sc.text()
    hit = _CHOICES.get(key)
    if hit is not None and hit[1].how != "rule":
        return hit[1].path
    timer = _timer if _timer is not None else (cuda_event_timer if device.type == "cuda" else None)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if timer is None or capturing or not _autotune_on():
        path = "cublas" if device.type == "cuda" else "triton"
        if not capturing:
            _record(sc, Choice(path, "rule"))
        return path
    if _timer is None:  # real measurements only: an injected (fake) timer never reads or writes the file
        stored = _disk().get(key)
        if stored is not None:
            _record(sc, stored)
            return stored.path
    times, failed = {}, {}
    for p in PATHS:
        try:
            times[p] = float(timer(p, runners[p]))
        except Exception as e:  # e.g. a Triton config out of resources on this device: the other path runs
            failed[p] = e
    if not times:
        raise failed[PATHS[0]]
    for p, e in failed.items():
        warnings.warn(f"tunefast: the LoRA {p!r} path failed on {sc.text()} ({type(e).__name__}: {e}); "
                      f"running the other path for this shape class", stacklevel=3)
    choice = Choice(min(times, key=times.get), "measured", times)
    _record(sc, choice)
    if _timer is None:
        _save_disk(key, choice)
    return choice.path


def _record(sc: ShapeClass, choice: Choice) -> None:
    with _LOCK:
        _CHOICES[sc.text()] = (sc, choice)


def choices() -> list[tuple[str, Choice]]:
    """This process's choices, (shape class text, choice), in the order they were first made."""
    with _LOCK:
        return [(k, c) for k, (_, c) in _CHOICES.items()]


def entries() -> list[tuple[ShapeClass, Choice]]:
    """This process's choices with their shape classes (for filtering, e.g. by the benchmarks)."""
    with _LOCK:
        return list(_CHOICES.values())


# ----------------------------------------------------------------------------------------------------
# Disk cache
# ----------------------------------------------------------------------------------------------------


def cache_file() -> Path:
    root = os.environ.get("TUNEFAST_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunefast"
    return Path(root) / "lora_path.json"


def _disk_on() -> bool:
    return os.environ.get(CACHE_ENV, "1") != "0"


def _versions() -> dict:
    try:
        import triton

        tri = triton.__version__
    except Exception:  # no triton: nothing measured can be valid anyway
        tri = None
    return {"torch": torch.__version__, "triton": tri}


def read_disk() -> dict[str, Choice]:
    """The file's entries valid for this torch and triton (an unreadable file counts as empty)."""
    if not _disk_on():
        return {}
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError, RuntimeError):  # RuntimeError: no home directory
        return {}
    if data.get("versions") != _versions():
        return {}
    out = {}
    for key, entry in (data.get("entries") or {}).items():
        if isinstance(entry, dict) and entry.get("path") in PATHS:
            out[key] = Choice(entry["path"], "disk", entry.get("times_ms"))
    return out


def _disk() -> dict[str, Choice]:
    global _disk_loaded
    if _disk_loaded is None:
        _disk_loaded = read_disk()
    return _disk_loaded


def _save_disk(key: str, choice: Choice) -> None:
    """Merge one measured entry into the file (read, update, write to a temporary file, rename: two
    processes measuring at once lose at most an entry, never the file)."""
    if not _disk_on():
        return
    try:
        path = cache_file()
    except RuntimeError:  # no home directory: the choice stays in memory
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("versions") != _versions():
            data = {"versions": _versions(), "entries": {}}
        data["entries"][key] = {"path": choice.path, "times_ms": choice.times_ms}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"tunefast: could not write the LoRA path cache {path} ({e}); choices stay in memory",
                      stacklevel=3)


def describe() -> list[str]:
    """Lines for ``tunefast info``: the mode, the rule, and every cached choice (this process, then the file)."""
    try:
        current = mode()
    except ValueError as e:
        current = f"invalid ({e})"
    lines = [f"mode: {current} ({ENV}; tunefast.ops.lora_path.set_lora_path)", f"rule: {RULE}"]
    seen = choices()
    try:
        where = str(cache_file())
    except RuntimeError as e:  # no home directory to put ~/.cache in
        where = f"unavailable ({e})"
    disk = {k: c for k, c in read_disk().items() if k not in dict(seen)}
    state = "off" if not _disk_on() else f"{where}, {len(disk)} entr{'y' if len(disk) == 1 else 'ies'}"
    lines.append(f"disk cache: {state}")
    for key, choice in [*seen, *disk.items()]:
        lines.append(f"  {key}: {choice.describe()}")
    if not seen and not disk:
        lines.append("  (no shape class chosen yet: choices are made on first use on a GPU)")
    return lines

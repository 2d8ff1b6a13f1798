"""The one launcher of tunefast's Triton kernels: configs per GPU architecture and dtype, the autotune
switch, precision / upcast rules, and the declaration the AOT check (benchmarks/aot.py) reads.

Using it from a kernel file (kernels/lora.py is the fullest example)::

    from . import launch

    @triton.jit
    def _my_kernel(x_ptr, y_ptr, M, N, stride_xm, size_key, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr): ...

    def _configs(arch, named):                 # every config this kernel may run on ``arch``
        elem = launch.elem_bytes(named["x_ptr"], named["UPCAST"])
        return [triton.Config(dict(BLOCK_M=m), num_warps=w, num_stages=s) for m, w, s in ...]

    _MY = launch.Kernel(
        _my_kernel,
        configs=_configs,                      # (arch, named) -> [triton.Config], before the smem rule
        smem=lambda c, named: ...,             # shared-memory estimate of one config, bytes
        regs=None,                             # optional: registers per thread its tiles hold (tile_regs)
        fixed=lambda arch, named, fits: fits[0],   # TUNEFAST_AUTOTUNE=0 (optional; default fits[0])
        interpret=dict(BLOCK_M=32),            # the one small config under TRITON_INTERPRET=1
        prune=None,                            # optional size-based prune at autotune time (M, N)
        restore=(), key=("size_key",),         # autotune: outputs accumulated into; key argument(s)
        options=None,                          # compile options, e.g. dict(enable_fp_fusion=False)
    )

    def my_op(x):                              # the launcher ops call
        args = (x, y, M, N, x.stride(0), launch.size_key(M, N))
        meta = dict(UPCAST=launch.upcast(x, x))
        _MY.launch(lambda c: (triton.cdiv(M, c["BLOCK_M"]),), args, meta, like=x)

    @launch.aot_examples
    def _examples():                           # calls the public launchers over dtypes x shape classes
        for act, adapter in launch.DTYPES: ...  # (CPU tensors; under launch.capture nothing runs)

Rules, in one place:
  * Device: a CUDA tensor launches compiled code on its device's architecture (``Arch``: capability,
    opt-in shared memory per block, SM count, read from torch); anything else runs the interpreter with
    ``interpret`` (the tests' TRITON_INTERPRET=1 path).
  * Configs: ``configs(arch, named)`` lists a kernel's candidates for that arch and this launch's dtypes
    and constexprs (``named``: every argument and meta-parameter by name). ``Kernel.choosable`` keeps
    those whose ``smem`` estimate fits ``arch.smem`` (the same rule for the autotune list and the fixed
    config); if none fits, the smallest-smem one is kept and the AOT check reports it. A kernel that
    declares ``regs`` (the 32-bit registers per thread its fp32 tiles hold, ``tile_regs``) also loses
    the candidates over ``TILE_REGS``: they spill whatever autotuning would time (see ``TILE_REGS``).
  * Autotune: on unless TUNEFAST_AUTOTUNE=0 (or ``set_autotune(False)``); with it off, or when only one
    config is choosable, ``fixed`` runs with no timing. Autotuners are cached per (kernel, config list).
  * Precision: fp32 dots use "tf32" exactly when torch would (``torch.get_float32_matmul_precision() !=
    "highest"``) and on a GPU, so fp32 parity with PEFT holds; "ieee" otherwise.
  * Upcast: operands of different dtypes (bf16 x with fp32 adapters, PEFT's ``autocast_adapter_dtype``)
    are multiplied in fp32, as PEFT does; the interpreter cannot ``tl.dot`` bf16/fp16 (it holds bf16 as
    raw bits), so it upcasts every low-precision dot.
  * AOT: ``capture(arch)`` makes every ``Kernel.launch`` record a ``Captured`` (kernel, args, meta,
    choosable configs, fixed config) instead of running, as if the CPU tensors were on ``arch``.
    benchmarks/aot.py imports every module of kernels/, calls each function registered with
    ``aot_examples`` under capture for sm_80 / sm_89 / sm_90, compiles every (launch, config) and
    fails on any ``@triton.jit`` function that neither ran nor is called by one that ran.
"""

import contextlib
import dataclasses
import functools
import inspect
import os
from typing import Callable, Iterable

import torch
import triton


@dataclasses.dataclass(frozen=True)
class Arch:
    capability: int  # major * 10 + minor: 80 A100, 89 RTX 4090 / L40, 90 H100 / H200
    smem: int  # opt-in shared memory per block, bytes
    sms: int  # streaming multiprocessors
    name: str = ""


# The architectures the AOT check compiles for (device limits from the CUDA programming guide's table:
# 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_89, each opt-in per block).
ARCHES = {
    80: Arch(80, 166_912, 108, "A100"),
    89: Arch(89, 101_376, 128, "RTX 4090"),
    90: Arch(90, 232_448, 132, "H100/H200"),
}

# Shape classes every kernel's AOT examples cover (the ops accept these): LoRA family ranks, attention
# head dims (80 and 96 pad to a 128 tile), and (activation dtype, adapter/weight dtype) pairs, the
# last being PEFT's default autocast_adapter_dtype with a bf16 model.
RANKS = (1, 8, 16, 32, 64, 128, 256, 512)
HEAD_DIMS = (32, 64, 80, 96, 128, 256)
DTYPES = (
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
)

_capture: list | None = None  # the Captured list while capture() is active
_capture_arch: Arch | None = None
_autotune_override: bool | None = None


# ----------------------------------------------------------------------------------------------------
# Device, precision and upcast rules
# ----------------------------------------------------------------------------------------------------


def on_gpu(t: torch.Tensor) -> bool:
    """True when ``t``'s kernels compile for a GPU: a CUDA tensor, or any tensor under ``capture``."""
    return _capture_arch is not None or t.is_cuda


@functools.cache
def _cuda_arch(index: int) -> Arch:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 48 * 1024
    return Arch(p.major * 10 + p.minor, int(smem), p.multi_processor_count, p.name)


def device_arch(t: torch.Tensor) -> Arch:
    """The architecture ``t``'s kernels run on (the capture target under ``capture``)."""
    if _capture_arch is not None:
        return _capture_arch
    if not t.is_cuda:
        raise ValueError(f"device_arch needs a CUDA tensor, got one on {t.device}")
    return _cuda_arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


def precision(t: torch.Tensor) -> str:
    """``input_precision`` of fp32 dots (Triton ignores it for fp16/bf16): torch's matmul setting on a GPU."""
    return "tf32" if on_gpu(t) and torch.get_float32_matmul_precision() != "highest" else "ieee"


def upcast(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a dot of ``a``- and ``b``-typed tiles must run in fp32 (see the module docstring)."""
    return a.dtype != b.dtype or (not on_gpu(a) and a.dtype != torch.float32)


def elem_bytes(t: torch.Tensor, upcast_: bool = False) -> int:
    """Bytes per element of ``t``'s tiles as staged for a dot (4 when upcast to fp32)."""
    return 4 if upcast_ else t.element_size()


def size_key(*sizes) -> int:
    """Autotune key: log2 buckets of the sizes packed in one int (kernels take it and ignore it), so a
    new token count does not trigger a fresh tuning run but a 16x larger one does."""
    return sum(int(s).bit_length() << (6 * i) for i, s in enumerate(sizes))


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s device (split-K / split-T heuristics)."""
    return device_arch(t).sms


def autotune_enabled() -> bool:
    """TUNEFAST_AUTOTUNE=0 (how benchmarks/gpu_check.sh runs the GPU tests) means one fixed config per
    kernel: correctness runs over many shapes and dtypes then spend no time compiling config lists."""
    if _autotune_override is not None:
        return _autotune_override
    return os.environ.get("TUNEFAST_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def set_autotune(enabled: bool | None):
    """Force autotuning on or off inside the block (None: back to TUNEFAST_AUTOTUNE)."""
    global _autotune_override
    saved, _autotune_override = _autotune_override, enabled
    try:
        yield
    finally:
        _autotune_override = saved


def pipeline_smem(config: triton.Config, *tiles: tuple[int, int], elem: int) -> int:
    """Shared memory of a software-pipelined loop staging ``tiles`` (rows, cols): num_stages - 1 buffers
    (what Triton 3.8 allocates; e.g. the side ladder merge at N = 1024, 16 x 32 tiles, 2 stages, fp16:
    66,560 B compiled, 66,560 B here). An estimate: the AOT check compares the compiled kernel's real
    figure with the device limit."""
    return max(config.num_stages - 1, 1) * sum(r * c for r, c in tiles) * elem


# Register rule of the autotune lists: a thread has 255 registers; candidates whose fp32 tiles alone
# (accumulators, dropout offsets and Philox words, fp32-staged operands) would take more than half of
# them are dropped before autotuning compiles them. Spilling candidates cost first-call tuning time (a
# compile each, 5-15 s on this project's CPU box) and never win. The estimates are per kernel (``regs=``),
# fitted to AOT results; kernels/lora.py gives the numbers.
TILE_REGS = 128


def tile_regs(config: triton.Config, rows: int, cols: int, count: float = 1.0, elem: int = 4) -> float:
    """32-bit registers per thread that ``count`` (rows x cols) tiles of ``elem``-byte values take when
    spread over the config's warps (an estimate: the compiler may keep fewer live)."""
    return count * rows * cols * elem / (4 * 32 * config.num_warps)


def matmul_configs(tiles, group_m: int = 8) -> list:
    """Configs of a GEMM-tiled kernel from (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) rows."""
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=group_m), num_stages=s, num_warps=w)
            for m, n, k, s, w in tiles]


def grouped_grid(rows: int, cols: int, *more: int) -> Callable[[dict], tuple]:
    """Grid of a kernel whose axis 0 walks the (rows / BLOCK_M) x (cols / BLOCK_N) tiles in grouped order
    (kernels/tiles.py ``grouped_tile_ids``); ``more``: further grid axes (split-K partials)."""
    return lambda c: (triton.cdiv(rows, c["BLOCK_M"]) * triton.cdiv(cols, c["BLOCK_N"]), *more)


def prune_to_sizes(**tiles: str) -> Callable[[list, dict], list]:
    """A ``Kernel.prune`` keeping the configs whose tiles are at most twice the size they tile (rounded up to
    a power of two, at least 16): tiles far larger than the matrix only waste work.
    ``prune_to_sizes(BLOCK_M="M", BLOCK_N="N")`` names each tile's size argument."""
    def prune(configs, named):
        bound = {t: 2 * max(16, triton.next_power_of_2(int(named[size]))) for t, size in tiles.items()}
        return [c for c in configs if all(c.kwargs[t] <= b for t, b in bound.items())]
    return prune


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

KERNELS: list["Kernel"] = []  # every Kernel ever declared, in import order
EXAMPLES: list[Callable[[], None]] = []  # every aot_examples function


@dataclasses.dataclass
class Captured:
    kernel: "Kernel"
    args: tuple
    meta: dict
    arch: Arch
    choosable: list  # [triton.Config]: the autotune list on this arch after the smem rule
    fixed: triton.Config  # what runs with autotuning off
    grid: Callable[[dict], tuple] | None = None  # the launch's grid (the AOT check's GPU twin launches it)


def _config_id(c: triton.Config) -> tuple:
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


def config_name(c: triton.Config) -> str:
    """Short text of a config: BLOCK_M=64 BLOCK_N=64 w4 s3."""
    return " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"


class Kernel:
    """One ``@triton.jit`` kernel with its launch policy (see the module docstring for each argument)."""

    def __init__(self, fn, *, configs, smem, interpret: dict, fixed=None, prune=None, restore=(),
                 key=("size_key",), options=None, regs=None):
        self.fn = fn
        self.name = fn.__name__
        self.arg_names = list(fn.arg_names)
        self.configs = configs
        self.smem = smem
        self.regs = regs
        self.interpret = interpret  # mutable on purpose: tests vary the interpreter's tile
        self.fixed = fixed
        self.prune = prune
        self.restore = list(restore)
        self.key = list(key)
        self.options = dict(options or {})
        KERNELS.append(self)

    def named(self, args, meta) -> dict:
        if len(args) + len(meta) > len(self.arg_names):
            raise TypeError(f"{self.name}: {len(args)} arguments + {sorted(meta)} for {self.arg_names}")
        return {**dict(zip(self.arg_names, args)), **meta}

    def _smem_fits(self, arch: Arch, named: dict) -> list:
        candidates = self.configs(arch, named)
        fits = [c for c in candidates if self.smem(c, named) <= arch.smem]
        return fits or [min(candidates, key=lambda c: self.smem(c, named))]

    def choosable(self, arch: Arch, named: dict, fits: list | None = None) -> list:
        """The configs that may run on ``arch`` for this launch: the candidates whose shared memory fits
        and, for a kernel with a ``regs`` estimate, whose tiles fit ``TILE_REGS``. If none fits the
        registers: the fixed config alone (the one the AOT check holds to zero spills), or without a
        ``fixed`` rule the candidate holding the fewest. ``fits``: ``_smem_fits`` if already known."""
        fits = fits if fits is not None else self._smem_fits(arch, named)
        if self.regs is None:
            return fits
        lean = [c for c in fits if self.regs(c, named) <= TILE_REGS]
        if lean:
            return lean
        return [self.fixed_config(arch, named, fits)] if self.fixed is not None else [min(fits, key=lambda c: self.regs(c, named))]

    def fixed_config(self, arch: Arch, named: dict, fits: list | None = None) -> triton.Config:
        """What runs with autotuning off: the kernel's ``fixed`` rule over the configs whose shared memory
        fits (not the register rule: fixed configs are chosen per arch and dtype and checked by the AOT
        check to spill nothing), else the first of them."""
        fits = fits if fits is not None else self._smem_fits(arch, named)
        return self.fixed(arch, named, fits) if self.fixed is not None else fits[0]

    def launch(self, grid: Callable[[dict], tuple], args: tuple, meta: dict, *, like: torch.Tensor):
        """Run the kernel on ``like``'s device; ``grid`` maps a config's kwargs to the launch grid."""
        if not on_gpu(like):
            self.fn[grid(self.interpret)](*args, **meta, **self.interpret)
            return
        arch = device_arch(like)
        named = self.named(args, meta)
        smem_fits = self._smem_fits(arch, named)
        fits = self.choosable(arch, named, smem_fits)
        fixed = self.fixed_config(arch, named, smem_fits)
        if _capture is not None:
            _capture.append(Captured(self, args, dict(meta), arch, fits, fixed, grid))
            return
        if autotune_enabled() and len(fits) > 1:
            self._tuned(tuple(_config_id(c) for c in fits), fits)[grid](*args, **meta, **self.options)
        else:
            self.fn[grid(fixed.kwargs)](*args, **meta, **fixed.kwargs, num_warps=fixed.num_warps,
                                        num_stages=fixed.num_stages, **self.options)

    def _tuned(self, ids, fits):
        return _autotuner(self, ids, fits)


# A cache keyed by (kernel, config ids); the config objects ride along uncompared.
_AUTOTUNERS: dict = {}


def _autotuner(kernel: Kernel, ids: tuple, fits: list):
    cache_key = (id(kernel), ids)
    if cache_key not in _AUTOTUNERS:
        prune = None
        if kernel.prune is not None:
            user = kernel.prune

            def prune(configs, named_args, **kwargs):
                return user(configs, {**named_args, **kwargs}) or configs[-1:]

        _AUTOTUNERS[cache_key] = triton.autotune(
            configs=list(fits), key=kernel.key, restore_value=kernel.restore,
            prune_configs_by={"early_config_prune": prune} if prune else None,
        )(kernel.fn)
    return _AUTOTUNERS[cache_key]


# ----------------------------------------------------------------------------------------------------
# AOT declaration
# ----------------------------------------------------------------------------------------------------


def aot_examples(fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn``: it calls its module's public launchers with small CPU tensors over every dtype
    (``DTYPES``) and shape class (``RANKS``, ``HEAD_DIMS``, widths) the ops accept. Under ``capture``
    nothing runs; the AOT check compiles what the launches would have chosen."""
    EXAMPLES.append(fn)
    return fn


@contextlib.contextmanager
def capture(arch: Arch):
    """Record every ``Kernel.launch`` inside the block as if on ``arch`` (yields the Captured list)."""
    global _capture, _capture_arch
    if _capture is not None:
        raise RuntimeError("capture() does not nest")
    _capture, _capture_arch = [], arch
    try:
        yield _capture
    finally:
        _capture, _capture_arch = None, None


def capture_examples(arch: Arch, examples: Iterable[Callable[[], None]] | None = None) -> list:
    """Every launch of every registered (or given) example function on ``arch``."""
    with capture(arch) as launches, torch.no_grad():
        for fn in EXAMPLES if examples is None else examples:
            fn()
    return launches


def jit_functions(module) -> dict:
    """The ``@triton.jit`` functions defined in ``module``, by name (helpers included)."""
    return {
        name: obj for name, obj in vars(module).items()
        if hasattr(obj, "fn") and hasattr(obj, "arg_names") and inspect.isfunction(getattr(obj, "fn", None))
        and obj.fn.__module__ == module.__name__
    }

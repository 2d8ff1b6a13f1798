"""The one benchmark harness of tunefast: every ``benchmarks/bench_<method>.py`` measures through it.

A benchmark supplies only setup code. A :class:`Case` names the variants to compare (the baseline a
user would otherwise run, e.g. PEFT, and tunefast), the inputs they share, and an explicit FLOP count;
each variant's setup function returns a :class:`Step`, the callable for one timed step (forward +
backward, or a whole training step). The harness does the rest, for all variants of a case side by
side in one process on the same inputs:

  time            median and 20/80 % quantiles of one step: CUDA events on a GPU, perf_counter on CPU;
                  warm-up first, variants interleaved (A B B A ...) so that load from other processes
                  falls on all of them alike. On CPU also cpu_ms, the process CPU time of a step: with
                  one torch thread it barely moves when other processes share the cores.
  act_bytes       bytes kept for backward: the unique storages (by untyped_storage().data_ptr()) that
                  autograd saves during one step, seen through torch.autograd.graph.saved_tensors_hooks,
                  with the storages of parameters and buffers (Step.state) excluded. Device-independent.
  peak_bytes      CUDA only: torch.cuda.max_memory_allocated() during one step minus what was
                  allocated before it (activations, gradients, temporaries), after a peak reset
  tflops          Case.flops / median time, and frac_peak: that over the device's dense datasheet peak
                  for Case.dtype (DEVICE_PEAKS; None for unknown devices and CPUs)
  max_rel_err     each variant's Step.check() tensors against the baseline's: max ||a - b|| / ||b||
  *_ratio         each metric over the baseline variant's, measured in the same run

Rows (one per variant, with device, versions, commit and date) are appended to ``results.jsonl`` and
``results.csv`` and summarised in ``summary.md`` by :class:`Recorder`. Under pytest,
``benchmarks/conftest.py`` wires this up (see benchmarks/README.md); this module never imports pytest
at import time, so a script can call :func:`measure_case` directly.

Re-render a summary from committed results: ``python -m benchmarks.harness summarize FILE.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from tunefast.profiling import SavedTensors, storage_ptrs  # noqa: F401  (storage_ptrs: harness API)

ROOT = Path(__file__).resolve().parents[1]
DEVICE_ENV = "TUNEFAST_BENCH_DEVICE"  # "cpu" or "cuda"; default: cuda when available

# Dense (no sparsity) datasheet TFLOP/s by device name, first regex match wins. fp32 is the plain
# (non-TF32) rate: torch's default for fp32 matmul on CUDA. Leads, not ceilings: measure those.
DEVICE_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM: the H100 SXM's rates
    (r"H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
]
# Measured ceilings: an 8192^3 bf16 torch matmul on random data ran at 769-798 TFLOP/s on this
# workplace's H200s (2026-10-28 and 2026-11-04, .library/device/KINDS.md; ENVIRONMENT.md: ~790).
DEVICE_MEASURED: list[tuple[str, dict[str, float]]] = [
    (r"H200(?! NVL)", {"bf16": 790.0}),
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------------
# What a benchmark supplies
# ----------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One variant, set up and ready to time.

    Args:
        run: one step (the timed region), e.g. forward + backward. Called many times; it must leave
            the variant able to run again (set gradients to None inside it).
        state: tensors that are model state rather than activations (parameters, buffers, frozen
            weights held outside a module): their storages are excluded from ``act_bytes``.
        check: optional; returns named tensors (outputs, gradients) compared against the baseline
            variant's as ``max_rel_err``. Runs once, before any timed step, on the untouched setup
            (e.g. in eval mode so dropout masks, which differ by design, do not enter).
        info: free-form facts recorded with the row (e.g. which backend tunefast resolved to).
    """

    run: Callable[[], Any]
    state: Iterable[torch.Tensor] = ()
    check: Callable[[], Mapping[str, torch.Tensor]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_module(cls, module: torch.nn.Module, run, check=None, info=None, extra_state=()) -> "Step":
        """A Step whose ``state`` is the module's parameters and buffers (plus ``extra_state``)."""
        state = [*module.parameters(), *module.buffers(), *extra_state]
        return cls(run=run, state=state, check=check, info=dict(info or {}))


def backward_step(module: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  gy: torch.Tensor, grads: Callable[[], Mapping[str, torch.Tensor]], info=None,
                  eval_module: torch.nn.Module | None = None, extra_state=()) -> Step:
    """The Step of most layer cases: ``forward(x).backward(gy)`` with gradients reset inside ``run``.
    ``check`` runs the same once with ``eval_module`` (default ``module``) in eval mode (no dropout) and
    returns the output ``y``, ``dx`` when ``x`` is floating point (token ids are not) and ``grads()``."""
    eval_module = module if eval_module is None else eval_module

    def run():
        if x.is_floating_point():
            x.grad = None
        module.zero_grad(set_to_none=True)
        forward(x).backward(gy)

    def check():
        eval_module.eval()
        if x.is_floating_point():
            x.grad = None
        module.zero_grad(set_to_none=True)
        y = forward(x)
        y.backward(gy)
        eval_module.train()
        out = {"y": y.detach(), **grads()}
        if x.is_floating_point():
            out["dx"] = x.grad.clone()
        return out

    return Step.for_module(module, run, check, info, extra_state)


def peft_and_tunefast(make_step: Callable[[torch.nn.Module, Any, dict], Step]) -> dict[str, Callable[[Any], Step]]:
    """The two variants of a PEFT-model case: PEFT's model as built, and a copy patched by ``tunefast.patch``
    (its kernels recorded in the row). ``make_step(model, inputs, info)``; ``inputs[0]`` is the model."""
    import copy

    import tunefast

    def peft_setup(inp):
        return make_step(copy.deepcopy(inp[0]), inp, {})

    def tunefast_setup(inp):
        model = copy.deepcopy(inp[0])
        report = tunefast.patch(model)
        return make_step(model, inp, {"kernels": ", ".join(f"{k} x{n}" for k, n in report.kernels().items())})

    return {"peft": peft_setup, "tunefast": tunefast_setup}


@dataclass
class Case:
    """Variants to compare on shared inputs.

    Args:
        suite: the benchmark file's method, e.g. "lora" (rows are grouped by it).
        name: the case within the suite, e.g. "layer" or "llama_step".
        params: sizes and settings, recorded with each row and part of :attr:`id`.
        variants: variant name -> setup(inputs) returning a :class:`Step` (or a bare callable).
            Order matters only for interleaving; the baseline is ``baseline``.
        inputs: optional; builds what all variants share (tensors, a template model). Called once,
            after ``torch.manual_seed(seed)``; its result is passed to every setup.
        baseline: the variant ratios are taken against (default: the first).
        flops: floating-point operations of one step, from an explicit formula (None: no TFLOP/s).
        dtype: the compute dtype for the device-peak lookup (e.g. torch.bfloat16).
        tolerance: if set, the benchmark test fails when a variant's max_rel_err exceeds it.
        seed: torch.manual_seed before inputs() and before each setup.
    """

    suite: str
    name: str
    params: dict[str, Any]
    variants: dict[str, Callable[[Any], Step | Callable[[], Any]]]
    inputs: Callable[[], Any] | None = None
    baseline: str | None = None
    flops: float | None = None
    dtype: torch.dtype | None = None
    tolerance: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.variants:
            raise ValueError(f"case {self.name!r} has no variants")
        if self.baseline is None:
            self.baseline = next(iter(self.variants))
        if self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not one of the variants {list(self.variants)}")

    @property
    def id(self) -> str:
        """``name-<key><value>-...`` (a dtype by itself), e.g. ``layer-K1024-N1024-M2048-r16-p0.1-fp32``:
        made of characters that pytest's ``-k`` accepts, so ``-k "layer and p0.1"`` selects cases."""
        parts = [self.name] + [_fmt_param(v) if isinstance(v, torch.dtype) else f"{k}{_fmt_param(v)}"
                               for k, v in self.params.items()]
        return re.sub(r"[^\w.+-]", "_", "-".join(parts))

    def __repr__(self) -> str:  # pytest shows it in failures
        return f"Case({self.suite}/{self.id})"


def _fmt_param(v) -> str:
    if isinstance(v, torch.dtype):
        return _DTYPE_KEYS.get(v, str(v).replace("torch.", ""))
    return str(v)


@dataclass
class Settings:
    """How hard to measure. ``timing=False`` is a smoke run: one step per variant, no timing."""

    device: torch.device
    timing: bool = True
    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 1000
    target_s: float = 4.0  # timed seconds per case, all variants together
    max_s: float = 30.0  # stop early past this (with at least 3 reps), for very slow variants
    min_sample_s: float = 0.5e-3  # steps shorter than this are looped inside one sample

    @classmethod
    def for_device(cls, device, timing=True, target_s=None) -> "Settings":
        device = torch.device(device)
        if device.type == "cuda":
            s = cls(device, timing, warmup=5, min_reps=10, target_s=2.0, max_s=20.0, min_sample_s=0.1e-3)
        else:
            s = cls(device, timing, warmup=1)  # measure_case already ran two untimed steps
        if target_s is not None:
            s.target_s = float(target_s)
            s.max_s = max(s.max_s, 4 * s.target_s)
        return s


def bench_device() -> torch.device:
    """The device benchmarks build their cases for: $TUNEFAST_BENCH_DEVICE, else cuda if available."""
    name = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={name} but torch.cuda.is_available() is False")
    return device


def parametrize(cases: Iterable[Case]):
    """``@harness.parametrize(CASES)`` on ``def test_x(case, variant, measure)``: one test per variant."""
    import pytest

    params = [pytest.param(c, v, id=f"{c.id}-{v}") for c in cases for v in c.variants]
    return pytest.mark.parametrize("case,variant", params)


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_activation_bytes(fn: Callable[[], Any], exclude: set[int]) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs, minus ``exclude``
    (storage data_ptrs): tunefast.profiling's count, the one definition the tests use too."""
    with SavedTensors(exclude) as rec:
        fn()
    return rec.bytes


def peak_step_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """CUDA: max_memory_allocated during ``fn`` minus memory_allocated before it; None elsewhere."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (the norm-wise relative error); inf on NaN or shape mismatch."""
    if got.shape != want.shape:
        return math.inf
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).norm().item()
    if math.isnan(err):
        return math.inf
    return err / max(want.norm().item(), 1e-30)


def _one_sample(fn, device, loops: int) -> tuple[float, float | None]:
    """(wall seconds, CPU seconds or None on CUDA) per step, for one sample of ``loops`` steps."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(loops):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / loops, None
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops, (time.process_time() - c0) / loops


def time_interleaved(fns: Mapping[str, Callable[[], Any]], settings: Settings
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step seconds, several samples per variant, variants interleaved A B ... B A ... per round:
    ({variant: wall seconds}, {variant: process CPU seconds}, the latter empty on CUDA).

    Warm-up steps first (compilation, autotuning, allocator growth). The number of rounds aims at
    ``settings.target_s`` seconds in all, within [min_reps, max_reps], and stops past ``max_s``.
    On CUDA each sample is bracketed by events and synchronized, so the host never runs ahead of
    the timed work; a sample loops over several steps only when one step is shorter than
    ``min_sample_s``.
    """
    device = settings.device
    names = list(fns)
    est = {}
    for name in names:
        for _ in range(max(settings.warmup - 1, 0)):
            fns[name]()
        _sync(device)
        est[name] = max(_one_sample(fns[name], device, 1)[0], 1e-7)
    loops = {n: max(1, math.ceil(settings.min_sample_s / est[n])) for n in names}
    per_round = sum(est[n] * loops[n] for n in names)
    reps = int(min(max(settings.target_s / per_round, settings.min_reps), settings.max_reps))
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    t_start = time.perf_counter()
    try:
        for i in range(reps):
            for name in names if i % 2 == 0 else names[::-1]:
                wall, cpu_s = _one_sample(fns[name], device, loops[name])
                samples[name].append(wall)
                if cpu_s is not None:
                    cpu[name].append(cpu_s)
            if i >= 2 and time.perf_counter() - t_start > settings.max_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, {n: c for n, c in cpu.items() if c}


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(q20, median, q80)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def device_peak_tflops(device_name: str, dtype: torch.dtype | None, table=None) -> float | None:
    """Datasheet dense TFLOP/s for ``device_name`` in ``dtype`` (``table`` default DEVICE_PEAKS)."""
    key = _DTYPE_KEYS.get(dtype)
    if key is None:
        return None
    for pattern, peaks in DEVICE_PEAKS if table is None else table:
        if re.search(pattern, device_name):
            return peaks.get(key)
    return None


@dataclass
class CaseResult:
    case: Case
    rows: dict[str, dict[str, Any]]  # variant -> row
    samples: dict[str, list[float]]  # variant -> per-step seconds (empty without timing)
    cpu_samples: dict[str, list[float]] = field(default_factory=dict)  # CPU devices: process CPU seconds


def _as_step(obj) -> Step:
    if isinstance(obj, Step):
        return obj
    if callable(obj):
        return Step(run=obj)
    raise TypeError(f"a variant's setup must return a harness.Step or a callable, got {type(obj).__name__}")


def measure_case(case: Case, settings: Settings) -> CaseResult:
    """Set up every variant of ``case`` and measure them side by side (see the module docstring)."""
    device = settings.device
    torch.manual_seed(case.seed)
    inputs = case.inputs() if case.inputs is not None else None
    steps: dict[str, Step] = {}
    for name, setup in case.variants.items():
        torch.manual_seed(case.seed)
        steps[name] = _as_step(setup(inputs))

    # Checks first, while every variant still holds the same untouched weights.
    checked = {n: {k: v.detach().clone() for k, v in s.check().items()} for n, s in steps.items() if s.check}
    errs: dict[str, float | None] = {}
    base_check = checked.get(case.baseline)
    for name in steps:
        if name not in checked or base_check is None:
            errs[name] = None
            continue
        common = [k for k in checked[name] if k in base_check]
        errs[name] = max((rel_err(checked[name][k], base_check[k]) for k in common), default=None)
    del checked, base_check

    act, peak = {}, {}
    for name, step in steps.items():
        step.run()  # the first step: lazy initialisation (optimizer state, autotuning) stays out
        _sync(device)
        act[name] = saved_activation_bytes(step.run, storage_ptrs(step.state))
        peak[name] = peak_step_bytes(step.run, device)

    samples, cpu_samples = ({}, {})
    if settings.timing:
        samples, cpu_samples = time_interleaved({n: s.run for n, s in steps.items()}, settings)

    env = environment(device)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine
    peak_tf = device_peak_tflops(env["device"], case.dtype)
    measured_tf = device_peak_tflops(env["device"], case.dtype, DEVICE_MEASURED)
    rows: dict[str, dict[str, Any]] = {}
    for name, step in steps.items():
        q20 = med = q80 = None
        if samples.get(name):
            q20, med, q80 = quantiles(samples[name])
        tflops = case.flops / med / 1e12 if case.flops and med else None
        rows[name] = {
            **env,
            "suite": case.suite,
            "case": case.id,
            "params": {k: _fmt_param(v) for k, v in case.params.items()},
            "variant": name,
            "baseline": case.baseline,
            "info": step.info,
            "time_ms": _ms(med),
            "time_q20_ms": _ms(q20),
            "time_q80_ms": _ms(q80),
            "reps": len(samples.get(name, ())),
            "cpu_ms": _ms(statistics.median(cpu_samples[name])) if cpu_samples.get(name) else None,
            "act_bytes": act[name],
            "peak_bytes": peak[name],
            "flops": case.flops,
            "tflops": tflops,
            "frac_peak": tflops / peak_tf if tflops and peak_tf else None,
            "frac_measured": tflops / measured_tf if tflops and measured_tf else None,
            "max_rel_err": errs[name],
            "load1": load1,
        }
    base = rows[case.baseline]
    for row in rows.values():
        for metric, ratio in (("time_ms", "time_ratio"), ("cpu_ms", "cpu_ratio"), ("act_bytes", "act_ratio"),
                              ("peak_bytes", "peak_ratio")):
            row[ratio] = row[metric] / base[metric] if row[metric] is not None and base[metric] else None
    return CaseResult(case, rows, samples, cpu_samples)


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


# ----------------------------------------------------------------------------------------------------
# Environment of a row
# ----------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: record that it is absent
        return None


def git_commit() -> str:
    """Short commit of the checkout (+"-dirty" with uncommitted tracked changes); $TUNEFAST_COMMIT
    when there is no git repository (e.g. a copied working tree on a GPU machine); else "unknown"."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TUNEFAST_COMMIT", "unknown")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _environment(device_type: str, index: int | None) -> dict[str, Any]:
    if device_type == "cuda":
        name = torch.cuda.get_device_name(index)
    else:
        threads = torch.get_num_threads()
        name = f"{_cpu_name()} ({threads} torch thread{'s' if threads > 1 else ''})"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": name,
        "device_type": device_type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda": torch.version.cuda if device_type == "cuda" else None,
    }


def environment(device: torch.device) -> dict[str, Any]:
    """Facts recorded with every row: date (of the first row of the process), commit, device, versions."""
    return dict(_environment(device.type, device.index))


# ----------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "date", "commit", "device", "device_type", "python", "torch", "triton", "transformers", "peft", "cuda",
    "suite", "case", "variant", "baseline", "time_ms", "time_q20_ms", "time_q80_ms", "reps", "time_ratio",
    "cpu_ms", "cpu_ratio",
    "act_bytes", "act_ratio", "peak_bytes", "peak_ratio", "flops", "tflops", "frac_peak", "frac_measured",
    "max_rel_err", "load1", "params", "info",
]


class Recorder:
    """Appends rows to ``out/results.jsonl`` and ``out/results.csv``; rewrites ``out/summary.md``
    (this process's rows) after every case, so an interrupted run keeps what it measured."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        self.rows.extend(rows)
        with open(self.out / "results.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        csv_path = self.out / "results.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
                                 for k, v in row.items()})
        (self.out / "summary.md").write_text(summary_markdown(self.rows))


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown report: per run (date, device, commit) one table per case, ratios to the baseline."""
    if not rows:
        return "# tunefast benchmarks\n\nNo results.\n"
    runs: dict[tuple, dict[tuple[str, str], list[dict]]] = {}
    for row in rows:
        run = runs.setdefault((row["date"], row["device"], row["commit"]), {})
        run.setdefault((row["suite"], row["case"]), []).append(row)
    lines = [
        "# tunefast benchmarks",
        "",
        "time: median wall time of one step [20%, 80% quantiles]; CPU ms (CPU runs): median process CPU "
        "time of one step, which other work on the machine barely moves when torch runs one thread "
        "(--bench-threads 1); act: bytes kept for backward (unique saved storages, parameters and buffers "
        "excluded); peak: CUDA memory a step allocates above what was allocated before it; x base: ratio "
        "to the baseline variant of the same run (lower is better); % peak: achieved TFLOP/s over the "
        "device's dense datasheet peak (over the measured ceiling in parentheses); rel err: max "
        "||out - baseline|| / ||baseline|| over the checked outputs and gradients (dropout off).",
    ]
    for (date, device, commit), cases in runs.items():
        first = next(iter(cases.values()))[0]
        lines += [
            "",
            f"## {device}, {date}",
            "",
            f"commit {commit}; torch {first['torch']}, triton {first['triton']}, transformers "
            f"{first['transformers']}, peft {first['peft']}, python {first['python']}"
            + (f", CUDA {first['cuda']}" if first.get("cuda") else ""),
        ]
        for (suite, case), case_rows in cases.items():
            lines += ["", f"### {suite}: {case}", ""]
            if case_rows[0].get("load1") is not None:
                lines += [f"load average (1 min) after timing: {case_rows[0]['load1']:.2f}", ""]
            cpu = any(r.get("cpu_ms") is not None for r in case_rows)
            head = ["variant", "time ms [q20, q80]", "x base"] + (["CPU ms", "x base"] if cpu else [])
            head += ["act MiB", "x base", "peak MiB", "x base", "TFLOP/s", "% peak", "rel err", "info"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += [_summary_line(r, cpu) for r in case_rows]
    return "\n".join(lines) + "\n"


def _summary_line(r: dict[str, Any], cpu: bool) -> str:
    name = r["variant"] + (" (baseline)" if r["variant"] == r["baseline"] else "")
    t = "-" if r["time_ms"] is None else f"{r['time_ms']:.3f} [{r['time_q20_ms']:.3f}, {r['time_q80_ms']:.3f}]"
    pct = _f(r["frac_peak"] and 100 * r["frac_peak"], ".1f")
    if r.get("frac_measured"):
        pct += f" ({100 * r['frac_measured']:.1f})"
    cells = [name, t, _f(r["time_ratio"], ".3f")]
    if cpu:
        cells += [_f(r.get("cpu_ms"), ".3f"), _f(r.get("cpu_ratio"), ".3f")]
    cells += [_f(_mib(r["act_bytes"]), ".2f"), _f(r["act_ratio"], ".3f"), _f(_mib(r["peak_bytes"]), ".1f"),
              _f(r["peak_ratio"], ".3f"), _f(r["tflops"], ".3g"), pct, _f(r["max_rel_err"], ".1e"),
              ", ".join(f"{k}={v}" for k, v in (r.get("info") or {}).items())]
    return "| " + " | ".join(cells) + " |"


def _mib(b):
    return None if b is None else b / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("summarize", help="print the markdown summary of a results.jsonl file")
    p.add_argument("jsonl", type=Path)
    p.add_argument("--out", type=Path, help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    text = summary_markdown(rows)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

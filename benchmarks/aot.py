"""Ahead-of-time GPU check with no GPU: compile every Triton kernel of kernels/ with every config its
launcher can choose, and csrc/*.cu with nvcc, for sm_80 (A100), sm_89 (RTX 4090) and sm_90 (H100/H200).

    python -m benchmarks.aot                       # the full matrix (`make gpu-aot`)
    python -m benchmarks.aot --fixed-only --arch 90,80,89 --ledger L  # CI's subset (`make gpu-aot-ci`)
    python -m benchmarks.aot --device             # on a GPU: launch every fixed config once (gpu_check.sh)

How it finds the work (nothing is listed here): it imports every module of kernels/, runs every
function registered with ``launch.aot_examples`` under ``launch.capture(arch)`` (the public launchers
called with small CPU tensors over every dtype and shape class; nothing runs) and takes, per captured
launch, the fixed config (TUNEFAST_AUTOTUNE=0) and the autotune list after the launcher's shared-memory
rule. Each distinct (kernel, specialisation, config, arch) is compiled once by ``triton.compile`` on an
``ASTSource`` for ``GPUTarget("cuda", arch, 32)``, built the way ``JITFunction.run`` builds it, in a
pool of worker processes with a cache under TMPDIR. ptxas's ``-v`` log gives registers and spills,
``metadata.shared`` the shared memory.

Fails (exit 1) when: a choosable config needs more shared memory than the arch has; a fixed config
spills; a compile errors or times out; a ``@triton.jit`` function in kernels/ was neither compiled nor
called by one that was (a kernel launched without kernels/launch.py, or with no AOT example); a CUDA
kernel spills. Autotune-only configs that spill are reported, not failed (autotuning times them).
Writes the table as JSON under benchmarks/results/aot/.

The ledger (CI): compiling CI's subset from a cold cache takes ~20 min on 2 cores, too long beside the
tests. ``--ledger benchmarks/results/aot/ledger-*.json`` takes the result of every job whose compile
inputs (triton version, hence its ptxas; the kernel's source and its callees'; specialisation; config;
options; arch) equal those of a recorded compile from that file, and compiles every other job: a change
to a kernel, a config table or the triton version is compiled in CI and fails it on a spill. Rows taken
from the ledger say ``source: ledger``; ``make gpu-aot-ledger`` recompiles the scope and rewrites it
(``--no-reuse`` ignores it and every cache).
"""

import os

os.environ["TRITON_INTERPRET"] = "0"  # must precede any @triton.jit decorator: compile, do not interpret

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import pkgutil  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "aot"
_DTYPE_NAMES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "i8": "i8", "u8": "u8"}


# ----------------------------------------------------------------------------------------------------
# Discovery: modules, captured launches, jobs
# ----------------------------------------------------------------------------------------------------


def kernels_package():
    """tunefast.kernels. Where the tunefast package itself does not import (a venv holding only torch and
    triton, kept to run this check with another triton version: tunefast's top level imports
    transformers), kernels/ alone under the same name: kernel files import nothing but torch, triton and
    each other."""
    try:
        import tunefast.kernels as pkg

        return pkg
    except ImportError as e:
        print(f"tunefast does not import here ({e}); loading kernels/ alone as tunefast.kernels", file=sys.stderr)
    import types

    top, pkg = types.ModuleType("tunefast"), types.ModuleType("tunefast.kernels")
    top.__path__, pkg.__path__ = [], [str(ROOT / "kernels")]
    top.kernels = pkg
    sys.modules["tunefast"], sys.modules["tunefast.kernels"] = top, pkg
    return pkg


def discover():
    """(modules by name, import errors by name) of every module of tunefast.kernels."""
    pkg = kernels_package()

    modules, errors = {}, {}
    for info in pkgutil.iter_modules(pkg.__path__):
        name = f"{pkg.__name__}.{info.name}"
        try:
            modules[name] = importlib.import_module(name)
        except Exception as e:  # a kernel file that does not import is a finding, not a crash
            errors[name] = f"{type(e).__name__}: {e}"
    return modules, errors


def _bind(fn, backend, args, kwargs):
    """(options, signature, constexprs, attrs) of one launch, as JITFunction.run computes them."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _case(meta, signature, arg_names, config_keys):
    """Short labels of a launch: pointer dtypes in argument order, and its non-tile constexprs."""
    dtypes = []
    for name in arg_names:
        ty = signature.get(name, "")
        if ty.startswith("*") and ty[1:] not in dtypes:
            dtypes.append(ty[1:])
    shape = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items() if k not in config_keys)
    return "/".join(dtypes), shape


def build_jobs(arches, fixed_only, kernel_filter):
    """Every distinct compile for the given archs, plus what was captured (kernel names) for coverage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from tunefast.kernels import launch

    jobs, index, captured = [], {}, set()
    for cap in arches:
        arch = launch.ARCHES[cap]
        backend = make_backend(GPUTarget("cuda", cap, 32))
        for c in launch.capture_examples(arch):
            if kernel_filter and not any(k in c.kernel.name for k in kernel_filter.split(",")):
                continue
            captured.add(c.kernel.name)
            roles = [("fixed", c.fixed)] + ([] if fixed_only else [("auto", cfg) for cfg in c.choosable])
            for role, cfg in roles:
                kwargs = {**c.meta, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                          **c.kernel.options}
                options, signature, constexprs, attrs = _bind(c.kernel.fn, backend, c.args, kwargs)
                key = (c.kernel.name, cap, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                       repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
                if key in index:
                    jobs[index[key]]["roles"].add(role)
                    continue
                dtypes, shape = _case(c.meta, signature, c.kernel.arg_names, set(cfg.kwargs))
                index[key] = len(jobs)
                jobs.append(dict(
                    module=c.kernel.fn.fn.__module__, kernel=c.kernel.name, source=c.kernel.fn.cache_key,
                    arch=cap, arch_smem=arch.smem,
                    dtypes=dtypes, case=shape, config=launch.config_name(cfg), roles={role},
                    signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__),
                ))
    del triton
    return jobs, captured


def coverage(modules, captured):
    """Names of @triton.jit functions neither captured nor called (transitively) from a captured one."""
    from tunefast.kernels import launch

    functions = {}
    for mod in modules.values():
        functions.update(launch.jit_functions(mod))
    reached = {n for n in functions if n in captured}
    frontier = list(reached)
    while frontier:
        src = functions[frontier.pop()].src
        for name in functions:
            if name not in reached and re.search(rf"\b{re.escape(name)}\s*\(", src):
                reached.add(name)
                frontier.append(name)
    return sorted(set(functions) - reached)


# ----------------------------------------------------------------------------------------------------
# Compiling (worker processes)
# ----------------------------------------------------------------------------------------------------

_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker_init(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    kernels_package()
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # printed to stdout, parsed below
    knobs.compilation.always_compile = True  # the log exists only when ptxas runs


class _Stopped(Exception):
    """Raised by the stage after which a job's compile stops (``until``), carrying its metadata."""


@contextlib.contextmanager
def _stop_after(stage):
    """Make ``triton.compile`` stop after ``stage`` (e.g. "llir": shared memory is allocated there, and
    ``metadata["shared"]`` is final; ptx and ptxas are the rest, 45-70% of a compile here)."""
    if not stage:
        yield
        return
    from triton.backends.nvidia.compiler import CUDABackend

    original = CUDABackend.add_stages

    def add_stages(self, stages, options, *args, **kwargs):
        original(self, stages, options, *args, **kwargs)
        run = stages[stage]

        def last(src, metadata):
            run(src, metadata)
            raise _Stopped(metadata)

        stages[stage] = last
        for later in list(stages)[list(stages).index(stage) + 1:]:
            del stages[later]

    CUDABackend.add_stages = add_stages
    try:
        yield
    finally:
        CUDABackend.add_stages = original


def compile_job(job):
    """registers, spill bytes (stores + loads), shared memory, error of one job (a job with ``until``
    stops after that stage: shared memory only, registers and spills None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), _stop_after(job.get("until")):
            kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
    except _Stopped as stop:
        return dict(regs=None, spill=None, smem=int(stop.args[0]["shared"]), until=job["until"],
                    seconds=round(time.perf_counter() - t0, 2), error=None)
    except Exception as e:
        first = str(e).strip().splitlines()
        return dict(error=f"{type(e).__name__}: {first[0] if first else ''}"[:300], seconds=time.perf_counter() - t0)
    text = log.getvalue()
    regs = [int(m) for m in _PTXAS.findall(text)]
    spills = [int(a) + int(b) for a, b in _SPILL.findall(text)]
    return dict(regs=max(regs) if regs else None, spill=sum(spills), smem=int(kernel.metadata.shared),
                seconds=round(time.perf_counter() - t0, 2), error=None if regs else "no ptxas log")


def _serve(conn, cache_dir):
    _worker_init(cache_dir)
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(compile_job(job))


def ledger_key(job):
    """The hash of everything a compile depends on (triton version, the kernel's source and its callees'
    (JITFunction.cache_key, which counts source lines too), the specialisation, the options, the arch),
    with the machine-specific part (the venv path of libdevice in ``extern_libs``) reduced to the file
    name, so that a ledger written here is found by CI's clean checkout elsewhere."""
    import triton

    items = {k: v for k, v in job.items() if k != "roles"}
    options = dict(items["options"])
    options["extern_libs"] = tuple((name, Path(path).name) for name, path in options.get("extern_libs") or ())
    items["options"] = options
    text = repr((triton.__version__, sorted((k, repr(v)) for k, v in items.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _result_path(job, results_dir):
    """Where a job's result is kept between runs on this machine: named by :func:`ledger_key`, so a rerun
    after a fix recompiles only what changed, whichever venv of the same triton version runs it."""
    return Path(results_dir) / (ledger_key(job) + ".json")


def load_ledger(path):
    """{key: result} of a ledger file written by ``--write-ledger`` (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    return {k: v["result"] for k, v in json.loads(path.read_text())["entries"].items()}


def write_ledger(path, jobs, results, scope):
    """Keep this run's compile results (errors and timeouts left out, so they are retried) as the ledger:
    a later run with the same compile inputs (same triton, kernel source, specialisation, config, arch)
    takes the result from here instead of compiling again. ptxas is triton's own, so the triton version
    in the key stands for it."""
    import triton

    entries = {ledger_key(job): dict(kernel=job["kernel"], arch=job["arch"], config=job["config"], result=res)
               for job, res in zip(jobs, results) if res and not res.get("error")}
    Path(path).write_text(json.dumps(dict(triton=triton.__version__, scope=scope, entries=dict(sorted(entries.items()))),
                                      indent=0) + "\n")
    return len(entries)


def run_jobs(jobs, workers, timeout, cache_dir, results_dir=None, progress=True, ledger=None):
    """Compile every job in ``workers`` processes; a job past ``timeout`` seconds kills its worker.
    Results in ``ledger`` ({ledger_key: result}, checked in) or already in ``results_dir`` (same compile
    inputs) are reused; new ones are stored in ``results_dir``."""
    ctx = mp.get_context("spawn")
    results = [None] * len(jobs)
    from_ledger = 0
    for j, job in enumerate(jobs):
        if ledger and ledger_key(job) in ledger:
            results[j] = dict(ledger[ledger_key(job)], source="ledger")
            from_ledger += 1
    if results_dir is not None:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        for j, job in enumerate(jobs):
            path = _result_path(job, results_dir)
            if results[j] is None and path.exists():
                results[j] = json.loads(path.read_text())
    pending = [j for j in range(len(jobs)) if results[j] is None][::-1]
    if progress:
        print(f"  {from_ledger} results from the ledger, {len(jobs) - len(pending) - from_ledger} from this "
              f"machine's cache, {len(pending)} to compile", file=sys.stderr)
    if not pending:
        return results
    slots = []  # [process, parent conn, job index, start]

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_serve, args=(child, cache_dir), daemon=True)
        p.start()
        return [p, parent, None, 0.0]

    slots = [start() for _ in range(max(1, min(workers, len(pending))))]
    done, total, t_begin = 0, len(pending), time.perf_counter()
    while done < total:
        for i, slot in enumerate(slots):
            p, conn, j, t0 = slot
            if j is None:
                if pending:
                    slot[2], slot[3] = pending.pop(), time.perf_counter()
                    conn.send(jobs[slot[2]])
                continue
            if conn.poll(0.05):
                try:
                    results[j] = conn.recv()
                    slot[2] = None
                    if results_dir is not None and not (results[j]["error"] or "").startswith("timeout"):
                        _result_path(jobs[j], results_dir).write_text(json.dumps(results[j]))
                except EOFError:
                    results[j] = dict(error="compile process died")
                    slots[i] = start()
            elif not p.is_alive() or time.perf_counter() - t0 > timeout:
                results[j] = dict(error="compile process died" if not p.is_alive() else f"timeout after {timeout:.0f} s")
                p.kill()
                slots[i] = start()
            else:
                continue
            done += 1
            if progress and done % 50 == 0:
                print(f"  {done}/{total} compiled, {time.perf_counter() - t_begin:.0f} s", file=sys.stderr)
    for p, conn, _, _ in slots:
        conn.send(None)
        p.join(5)
    return results


# ----------------------------------------------------------------------------------------------------
# CUDA sources
# ----------------------------------------------------------------------------------------------------

_NV_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_NV_USED = re.compile(r"Used (\d+) registers")
_NV_SMEM = re.compile(r"(\d+) bytes smem")


def check_csrc(arches):
    """Rows (kernel, arch, registers, spill bytes, static smem) of every CUDA kernel in csrc/*.cu."""
    rows = []
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        for cap in arches:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = ["nvcc", f"-arch=sm_{cap}", "-std=c++17", "-O3", "-Xptxas", "-v", "-c", str(cu),
                       "-I", str(ROOT / "csrc"), "-o", str(Path(tmp) / "k.o")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(dict(kernel=cu.name, arch=cap, error=proc.stderr.strip()[-300:]))
                continue
            entry = None
            for line in proc.stderr.splitlines():
                if m := _NV_ENTRY.search(line):
                    entry = dict(kernel=_demangle(m.group(1)), file=cu.name, arch=cap, spill=0)
                elif entry and (m := _SPILL.search(line)):
                    entry["spill"] = int(m.group(1)) + int(m.group(2))
                elif entry and (m := _NV_USED.search(line)):
                    smem = _NV_SMEM.search(line)  # absent when the kernel uses no static shared memory
                    entry.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0, error=None)
                    rows.append(entry)
                    entry = None
            if not any(r.get("file") == cu.name and r["arch"] == cap for r in rows):
                rows.append(dict(kernel=cu.name, file=cu.name, arch=cap, error="no kernel found in nvcc's ptxas log"))
    return rows


def _demangle(name):
    """tunefast::scatter_kernel<__half, float> from a mangled CUDA entry name (c++filt; raw if absent)."""
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    except OSError:
        return name
    out = out.replace("(anonymous namespace)::", "")
    out = out[5:] if out.startswith("void ") else out
    return out.split("(")[0]


# ----------------------------------------------------------------------------------------------------
# Verdicts, table, JSON
# ----------------------------------------------------------------------------------------------------


def verdict(row):
    if row.get("error"):
        return "ERROR"
    if row["smem"] > row["arch_smem"]:
        return "SMEM"
    if row.get("until"):
        return f"ok(smem; to {row['until']})"
    if row["spill"] and "fixed" in row["roles"]:
        return "SPILL"
    if row["spill"]:
        return "spill(autotune)"
    return "ok"


def print_table(rows, cuda_rows, out=sys.stdout):
    head = f"{'kernel':28} {'dtypes':16} {'case':44} {'config':44} {'role':10} {'arch':5} {'regs':>4} " \
           f"{'spill':>6} {'smem':>7} verdict"
    print(head, file=out)
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtypes"], r["case"], r["arch"], r["config"])):
        print(f"{r['kernel'][:28]:28} {r['dtypes'][:16]:16} {r['case'][:44]:44} {r['config'][:44]:44} "
              f"{'+'.join(sorted(r['roles'])):10} sm{r['arch']:<3} {r.get('regs') or '-':>4} {'-' if r.get('spill') is None else r['spill']:>6} "
              f"{r.get('smem', '-'):>7} {r['verdict']}" + (f"  {r['error']}" if r.get("error") else ""), file=out)
    for r in cuda_rows:
        v = "ERROR" if r.get("error") else ("SPILL" if r["spill"] else "ok")
        print(f"{r['kernel'][:28]:28} {'(cuda)':16} {r.get('file', ''):44} {'':44} {'fixed':10} sm{r['arch']:<3} "
              f"{r.get('regs', '-'):>4} {r.get('spill', '-'):>6} {r.get('smem', '-'):>7} {v}", file=out)


def per_kernel(rows):
    """{kernel: compiles, fixed/autotune spills, largest autotune spill, shared memory over / largest
    fraction of the arch's limit} over the rows: the before/after figures of a config change."""
    out = {}
    for r in rows:
        k = out.setdefault(r["kernel"], dict(compiles=0, fixed_spills=0, autotune_spills=0, max_autotune_spill=0,
                                             smem_over=0, max_smem_fraction=0.0, errors=0))
        k["compiles"] += 1
        if r.get("error"):
            k["errors"] += 1
            continue
        if r.get("spill"):
            k["fixed_spills" if "fixed" in r["roles"] else "autotune_spills"] += 1
            if "fixed" not in r["roles"]:
                k["max_autotune_spill"] = max(k["max_autotune_spill"], r["spill"])
        k["smem_over"] += r["smem"] > r["arch_smem"]
        k["max_smem_fraction"] = round(max(k["max_smem_fraction"], r["smem"] / r["arch_smem"]), 3)
    return dict(sorted(out.items()))


def summarize(rows, cuda_rows, uncovered, import_errors):
    counts = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    cuda_bad = [r for r in cuda_rows if r.get("error") or r.get("spill")]
    failed = any(r["verdict"] in ("ERROR", "SMEM", "SPILL") for r in rows) or bool(uncovered) or bool(
        import_errors) or bool(cuda_bad)
    return dict(verdicts=counts, per_kernel=per_kernel(rows), unchecked_jit_functions=uncovered,
                import_errors=import_errors, cuda_failures=len(cuda_bad), failed=failed)


def device_twin():
    """The check's GPU twin (benchmarks/gpu_check.sh): on a real device, launch every fixed config its
    launchers choose for this device's architecture once, on zero-filled inputs (in-bounds indices),
    and report what failed to compile or run. Returns an exit status."""
    import torch

    from tunefast.kernels import launch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU twin needs one (the AOT check itself does not)", file=sys.stderr)
        return 2
    arch = launch.device_arch(torch.zeros(1, device="cuda"))
    _, import_errors = discover()
    seen, failures, t0 = set(), 0, time.perf_counter()
    for c in launch.capture_examples(arch):
        cfg = c.fixed
        key = (c.kernel.name, repr(sorted(c.meta.items())), launch.config_name(cfg),
               tuple((a.dtype, a.stride()) if isinstance(a, torch.Tensor) else type(a) for a in c.args))
        if key in seen:
            continue
        seen.add(key)
        args = tuple(torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device="cuda").zero_()
                     if isinstance(a, torch.Tensor) else a for a in c.args)
        t = time.perf_counter()
        try:
            c.kernel.fn[c.grid(cfg.kwargs)](*args, **c.meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages, **c.kernel.options)
            torch.cuda.synchronize()
            status = "ok"
        except Exception as e:
            failures += 1
            status = f"FAILED {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        shape = " ".join(f"{k}={v}" for k, v in c.meta.items())
        print(f"{c.kernel.name[:28]:28} {shape[:60]:60} {launch.config_name(cfg)[:44]:44} "
              f"{time.perf_counter() - t:6.2f}s {status}")
    for name, err in import_errors.items():
        print(f"IMPORT ERROR: {name}: {err}", file=sys.stderr)
    print(f"{len(seen)} fixed-config launches on {arch.name} (sm_{arch.capability}), {failures} failed, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if failures or import_errors else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,89,90", help="compute capabilities, comma-separated")
    ap.add_argument("--fixed-only", action="store_true", help="only the configs used with TUNEFAST_AUTOTUNE=0")
    ap.add_argument("--no-csrc", action="store_true", help="skip nvcc on csrc/*.cu")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (2: this project's CPU boxes)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per compile before it counts as failed")
    ap.add_argument("--kernel", default="", help="only kernels whose name contains one of these comma-separated strings (skips the coverage check)")
    ap.add_argument("--no-reuse", action="store_true", help="recompile results kept from earlier runs")
    ap.add_argument("--smem-only-autotune", action="store_true",
                    help="compile autotune-only configs to LLVM IR only: their shared memory (what fails them) is "
                         "measured, their registers and spills are not (2-3x faster; for a second triton version)")
    ap.add_argument("--ledger", default="",
                    help="a checked-in JSON of earlier results: jobs with the same compile inputs are taken from it")
    ap.add_argument("--write-ledger", action="store_true", help="write this run's results as the --ledger file")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name (e.g. before, after)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the JSON result")
    ap.add_argument("--device", action="store_true",
                    help="the GPU twin: launch every fixed config once on this machine's GPU")
    args = ap.parse_args(argv)
    if args.device:
        return device_twin()
    if args.write_ledger and (not args.ledger or args.kernel):
        ap.error("--write-ledger needs --ledger PATH and no --kernel filter (a ledger covers a whole scope)")
    arches = [int(a) for a in args.arch.split(",") if a]

    import triton

    t0 = time.perf_counter()
    modules, import_errors = discover()
    jobs, captured = build_jobs(arches, args.fixed_only, args.kernel)
    if args.smem_only_autotune:
        for job in jobs:
            if job["roles"] == {"auto"}:
                job["until"] = "llir"  # part of the job, so of its cache key too: a full compile is not mistaken for it
    uncovered = [] if args.kernel else coverage(modules, captured)
    print(f"triton {triton.__version__}: {len(jobs)} compiles for sm_{', sm_'.join(map(str, arches))} "
          f"({len(captured)} kernels captured in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    tmp = Path(os.environ.get("TMPDIR", tempfile.gettempdir()))
    cache = tmp / f"tunefast-aot-triton{triton.__version__}"
    ledger = load_ledger(args.ledger) if args.ledger and not args.no_reuse and not args.write_ledger else {}
    results = run_jobs(jobs, args.jobs, args.timeout, str(cache / "triton"),
                       None if args.no_reuse else cache / "results", ledger=ledger)
    if args.write_ledger:
        n = write_ledger(args.ledger, jobs, results, scope=dict(arches=arches, fixed_only=args.fixed_only))
        print(f"wrote {n} results to the ledger {args.ledger}", file=sys.stderr)
    rows = []
    for job, res in zip(jobs, results):
        row = {k: job[k] for k in ("kernel", "dtypes", "case", "config", "arch", "arch_smem")}
        row.update(roles=sorted(job["roles"]), **res)
        row["verdict"] = verdict(row)
        rows.append(row)
    cuda_rows = [] if args.no_csrc else check_csrc(arches)
    print_table(rows, cuda_rows)
    summary = summarize(rows, cuda_rows, uncovered, import_errors)
    summary.update(from_ledger=sum(1 for r in results if r and r.get("source") == "ledger"))
    summary.update(seconds=round(time.perf_counter() - t0), triton=triton.__version__, arches=arches,
                   fixed_only=args.fixed_only, smem_only_autotune=args.smem_only_autotune,
                   python=platform.python_version())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scope = "fixed" if args.fixed_only else "full"
    path = out / f"aot-triton{triton.__version__}-{scope}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(dict(summary=summary, rows=rows, cuda=cuda_rows), indent=1, default=str) + "\n")
    print(f"{'kernel':28} {'compiles':>8} {'fixed spills':>12} {'autotune spills':>15} {'max (B)':>8} "
          f"{'smem over':>9} {'max smem/limit':>14}", file=sys.stderr)
    for name, k in summary["per_kernel"].items():
        print(f"{name[:28]:28} {k['compiles']:>8} {k['fixed_spills']:>12} {k['autotune_spills']:>15} "
              f"{k['max_autotune_spill']:>8} {k['smem_over']:>9} {k['max_smem_fraction']:>14}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_kernel"}, indent=1), file=sys.stderr)
    for name in uncovered:
        print(f"NOT CHECKED: @triton.jit {name} was neither compiled nor called by a compiled kernel "
              "(launch it through kernels/launch.py and register an AOT example)", file=sys.stderr)
    for name, err in import_errors.items():
        print(f"IMPORT ERROR: {name}: {err}", file=sys.stderr)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

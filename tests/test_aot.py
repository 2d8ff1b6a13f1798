"""benchmarks/aot.py: the ahead-of-time GPU check. It must run with TRITON_INTERPRET=0 (real
compiles), which this test process cannot switch to (tests/conftest.py set 1 before any kernel was
decorated), so each check runs in a subprocess."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_UNIT = r"""
import importlib.util, json, sys
import benchmarks.aot as aot

# coverage: a launched kernel covers the helpers it calls (transitively); an unlaunched kernel is reported
spec = importlib.util.spec_from_file_location("aot_toy", sys.argv[1])
toy = importlib.util.module_from_spec(spec)
sys.modules["aot_toy"] = toy
spec.loader.exec_module(toy)
out = {
    "none_launched": aot.coverage({"aot_toy": toy}, set()),
    "main_launched": aot.coverage({"aot_toy": toy}, {"_main_kernel"}),
}

def row(**kw):
    base = dict(kernel="_k", error=None, smem=1000, arch_smem=101376, spill=0, roles=["fixed"])
    base.update(kw)
    return base

out["verdicts"] = [
    aot.verdict(row()),
    aot.verdict(row(smem=101377)),
    aot.verdict(row(smem=101377, roles=["auto"])),
    aot.verdict(row(spill=8)),
    aot.verdict(row(spill=8, roles=["auto"])),
    aot.verdict(row(error="PassManager::run failed")),
]
ok = [dict(row(), verdict="ok")]
out["failed"] = [
    aot.summarize(ok, [], [], {})["failed"],
    aot.summarize(ok, [], ["_orphan_kernel"], {})["failed"],
    aot.summarize(ok, [], [], {"tunefast.kernels.x": "ImportError"})["failed"],
    aot.summarize(ok, [dict(kernel="k", arch=90, spill=4, regs=255, smem=0)], [], {})["failed"],
    aot.summarize([dict(row(spill=8, roles=["auto"]), verdict="spill(autotune)")], [], [], {})["failed"],
]
out["per_kernel"] = aot.per_kernel([row(), row(spill=8, roles=["auto"]), row(smem=202752, roles=["auto"]),
                                    row(error="x")])
print(json.dumps(out))
"""

_TOY = """
import triton
import triton.language as tl


@triton.jit
def _helper(x):
    return x * 2


@triton.jit
def _main_kernel(x_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, _helper(tl.load(x_ptr + offs)))


@triton.jit
def _orphan_kernel(x_ptr):
    tl.store(x_ptr, 1.0)
"""


def _run(args, tmp_path, timeout=900):
    env = dict(os.environ, TRITON_INTERPRET="0", TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_coverage_and_verdicts(tmp_path):
    toy = tmp_path / "aot_toy.py"
    toy.write_text(textwrap.dedent(_TOY))
    proc = _run(["-c", _UNIT, str(toy)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["none_launched"] == ["_helper", "_main_kernel", "_orphan_kernel"]
    assert out["main_launched"] == ["_orphan_kernel"]
    assert out["verdicts"] == ["ok", "SMEM", "SMEM", "SPILL", "spill(autotune)", "ERROR"]
    assert out["failed"] == [False, True, True, True, False]
    assert out["per_kernel"] == {"_k": dict(compiles=4, fixed_spills=0, autotune_spills=1, max_autotune_spill=8,
                                            smem_over=1, max_smem_fraction=2.0, errors=1)}


def test_compiles_a_real_kernel_for_hopper(tmp_path):
    """End to end on the smallest kernel: capture, specialise, compile with ptxas, table and JSON."""
    proc = _run(["-m", "benchmarks.aot", "--kernel", "_sddmm", "--arch", "90", "--fixed-only", "--no-csrc",
                 "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("aot-triton*-fixed.json")
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert rows and all(r["kernel"] == "_sddmm_kernel" and r["arch"] == 90 for r in rows)
    # pointer dtypes in argument order (out fp32, dy and x per launch.DTYPES, indices i64), deduplicated
    assert {r["dtypes"] for r in rows} == {"fp32/fp16/i64", "fp32/bf16/i64", "fp32/i64"}
    assert all(r["verdict"] == "ok" and 0 < r["regs"] <= 255 and r["smem"] >= 0 for r in rows)
    assert "_sddmm_kernel" in proc.stdout and not result["summary"]["failed"]


_COVERAGE = r"""
import json, sys
import benchmarks.aot as aot
from tunefast.kernels import launch

modules, errors = aot.discover()
captured = {c.kernel.name for c in launch.capture_examples(launch.ARCHES[90])}
print(json.dumps(dict(uncovered=aot.coverage(modules, captured), errors=errors, captured=sorted(captured),
                      jit=sorted(n for m in modules.values() for n in launch.jit_functions(m)))))
"""


def test_every_kernel_in_kernels_is_reached_by_an_aot_example(tmp_path):
    """Capture only (no compile): every @triton.jit function of kernels/ is launched by a registered AOT
    example or called by one that is, so the check compiles all of them."""
    proc = _run(["-c", _COVERAGE], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == {} and out["uncovered"] == []
    # the prefix-attention kernels among them (they were once launched outside kernels/launch.py)
    assert {"_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_delta_kernel"} <= set(out["captured"])
    assert len(out["jit"]) > len(out["captured"])  # helpers are reached through their callers


_LOUD = r"""
import importlib.util, sys
import benchmarks.aot as aot

spec = importlib.util.spec_from_file_location("aot_toy", sys.argv[1])
toy = importlib.util.module_from_spec(spec)
sys.modules["aot_toy"] = toy
spec.loader.exec_module(toy)
modules, _ = aot.discover()  # imports kernels/, registering their AOT examples
aot.discover = lambda: ({**modules, "aot_toy": toy}, {})
from tunefast.kernels import launch
captured = {"_main_kernel"} | {c.kernel.name for c in launch.capture_examples(launch.ARCHES[90])}
aot.build_jobs = lambda arches, fixed_only, kernel_filter: ([], captured)
sys.exit(aot.main(["--fixed-only", "--arch", "90", "--no-csrc", "--out", sys.argv[2]]))
"""


def test_an_unchecked_kernel_fails_the_check_loudly(tmp_path):
    """main() exits 1 and names the @triton.jit function no AOT example reached (compiles stubbed out)."""
    toy = tmp_path / "aot_toy.py"
    toy.write_text(textwrap.dedent(_TOY))
    proc = _run(["-c", _LOUD, str(toy), str(tmp_path)], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "NOT CHECKED: @triton.jit _orphan_kernel" in proc.stderr
    assert "_main_kernel" not in proc.stderr.split("NOT CHECKED")[-1].split("\n")[0]
    (path,) = tmp_path.glob("aot-triton*-fixed.json")
    assert json.loads(path.read_text())["summary"]["unchecked_jit_functions"] == ["_orphan_kernel"]


_LEDGER = r"""
import copy, json, sys
from pathlib import Path
import benchmarks.aot as aot

tmp = Path(sys.argv[1])
aot.discover()
jobs, _ = aot.build_jobs([90], True, "_sddmm")
compiled = aot.run_jobs(jobs, 1, 300, str(tmp / "triton"), None, progress=False)
aot.write_ledger(tmp / "ledger.json", jobs, compiled, scope={})
ledger = aot.load_ledger(tmp / "ledger.json")
reused = aot.run_jobs(jobs, 1, 300, str(tmp / "triton"), None, progress=False, ledger=ledger)
# one job missing from the ledger is compiled again
partial = dict(ledger)
del partial[aot.ledger_key(jobs[0])]
mixed = aot.run_jobs(jobs, 1, 300, str(tmp / "triton"), None, progress=False, ledger=partial)
moved = copy.deepcopy(jobs[0])  # the same compile from a venv at another path
moved["options"]["extern_libs"] = tuple((n, "/elsewhere/venv/" + Path(p).name) for n, p in moved["options"]["extern_libs"])
warps = copy.deepcopy(jobs[0])
warps["options"]["num_warps"] *= 2
print(json.dumps(dict(
    n=len(jobs), compiled=compiled, reused=reused, mixed=mixed,
    moved_same=aot.ledger_key(moved) == aot.ledger_key(jobs[0]),
    warps_same=aot.ledger_key(warps) == aot.ledger_key(jobs[0]))))
"""


def test_the_ledger_reuses_only_identical_compiles(tmp_path):
    """CI's ledger: a recorded result is taken only for the same compile inputs (a config change is compiled
    again), independent of where the venv lives; a job not in the ledger is compiled."""
    proc = _run(["-c", _LEDGER, str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 3 and all(r["error"] is None and r["regs"] > 0 for r in out["compiled"])
    assert all(r["source"] == "ledger" for r in out["reused"])
    assert [{k: v for k, v in r.items() if k not in ("source", "seconds")} for r in out["reused"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in out["compiled"]]
    assert "source" not in out["mixed"][0] and all(r["source"] == "ledger" for r in out["mixed"][1:])
    assert out["moved_same"] and not out["warps_same"]


_LEDGER_COVERS = r"""
import json, sys
import benchmarks.aot as aot

aot.discover()
jobs, _ = aot.build_jobs([90, 80, 89], True, "")  # the scope of `make gpu-aot-ci`, capture only
ledger = aot.load_ledger(sys.argv[1])
missing = sorted({(j["kernel"], j["arch"]) for j in jobs if aot.ledger_key(j) not in ledger})
print(json.dumps(dict(jobs=len(jobs), missing=missing[:20], n_missing=len(missing))))
"""


def test_the_checked_in_ledger_covers_ci_scope(tmp_path):
    """Every fixed-config compile of CI's AOT scope (triton 3.8, sm_90/80/89) has its result in the ledger;
    otherwise CI compiles the missing ones (minutes each kernel): after changing kernels/ (even a docstring:
    triton's source key counts lines), run `make gpu-aot-ledger` and commit the ledger."""
    import triton

    if triton.__version__ != "3.8.0":
        pytest.skip(f"the ledger is for triton 3.8.0, this is {triton.__version__}")
    ledger = ROOT / "benchmarks" / "results" / "aot" / "ledger-triton3.8-fixed.json"
    proc = _run(["-c", _LEDGER_COVERS, str(ledger)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["jobs"] > 1000 and out["n_missing"] == 0, f"{out['n_missing']} compiles not in the ledger: {out['missing']}"


_UNTIL = r"""
import copy, json, sys
import benchmarks.aot as aot

aot.discover()
jobs, _ = aot.build_jobs([90, 80], False, "_lce_fwd")
jobs = [j for j in jobs if j["roles"] == {"auto"}][:2]
stopped = [dict(copy.deepcopy(j), until="llir") for j in jobs]
full = aot.run_jobs(jobs, 1, 300, sys.argv[1], None, progress=False)
smem = aot.run_jobs(stopped, 1, 300, sys.argv[1], None, progress=False)
row = dict(smem[0], roles={"auto"}, arch_smem=10**6)
verdicts = [aot.verdict(row), aot.verdict(dict(row, arch_smem=0))]
print(json.dumps(dict(full=full, smem=smem, keys_differ=aot.ledger_key(jobs[0]) != aot.ledger_key(stopped[0]),
                      verdicts=verdicts)))
"""


def test_smem_only_autotune_measures_the_same_shared_memory_without_ptxas(tmp_path):
    """--smem-only-autotune (the second triton version's full matrix): stopping after LLVM IR gives the
    compiled kernel's own shared memory, reports no registers or spills, and is cached apart from a full
    compile."""
    proc = _run(["-c", _UNTIL, str(tmp_path / "triton")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["full"]) == 2 and all(r["regs"] > 0 for r in out["full"])
    assert [r["smem"] for r in out["smem"]] == [r["smem"] for r in out["full"]]
    assert all(r["regs"] is None and r["spill"] is None and r["until"] == "llir" for r in out["smem"])
    assert out["keys_differ"]
    assert out["verdicts"] == ["ok(smem; to llir)", "SMEM"]

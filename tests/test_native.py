"""Native dropout kernels (tunefast._C, tunefast._C_cuda) against tunefast.reference.dropout.

Every comparison is exact, for float16 and bfloat16 too: the keep decision compares integers, and
the kernels round as PyTorch's `x * mask * scale` does (in fp32 with the scalar rounded to fp32,
once per op), so there is no ulp to allow. CUDA tests are marked ``gpu`` and skipped without one.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tunefast
from tunefast import _native
from tunefast.reference import dropout as ref

needs_cpu = pytest.mark.skipif(not _native.CPU_AVAILABLE, reason=f"tunefast._C: {_native.CPU_ERROR}")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 13), (97, 1025)]  # 97x1025 is above the OpenMP threshold
SEEDS = [0, 1234, 2**32 + 7, 2**64 - 1]  # >= 2**32 exercises the high key word
PS = [0.0, 0.1, 0.5, 0.9, 1.0]


def _device(name: str) -> torch.device:
    # A module that should have been built but was not fails test_*_module_built instead.
    if name == "cpu" and not _native.CPU_AVAILABLE:
        pytest.skip(f"tunefast._C: {_native.CPU_ERROR}")
    if name == "cuda" and not _native.CUDA_BUILT:
        pytest.skip(f"tunefast._C_cuda: {_native.CUDA_ERROR}")
    return torch.device(name)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != 0.0), except that any NaN matches any NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a.view(ints)[~nan], b.view(ints)[~nan])


def _run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter importing this same tunefast; return its printed JSON."""
    root = Path(tunefast.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- build -----------------------------------------------------------------------------------

def test_cpu_module_built():
    assert _native.CPU_AVAILABLE, _native.CPU_ERROR
    assert _native.CPU_ERROR is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the CUDA module is not expected")
def test_cuda_module_built_when_nvcc_present():
    assert _native.CUDA_BUILT, _native.CUDA_ERROR
    assert _native.status()["cuda_archs"]


@needs_cpu
def test_status_reports_build():
    info = _native.status()
    assert info["cpu_built"] and info["cpu_error"] is None
    assert isinstance(info["openmp"], bool) and info["cpu_threads"] >= 1
    assert info["cuda_built"] == _native.CUDA_BUILT
    assert info["cuda_usable"] == (_native.CUDA_BUILT and torch.cuda.is_available())
    assert (info["cuda_reason"] is None) == info["cuda_usable"]


@needs_cpu
def test_openmp_runtime_is_torchs():
    # _native imports torch first so that _C shares torch's libgomp: torch's thread setting applies.
    if not _native._C.openmp:
        pytest.skip("tunefast._C was built without OpenMP")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _native._C.max_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---- the mask --------------------------------------------------------------------------------

@needs_cpu
def test_philox_known_answer():
    # Random123's known-answer vector for philox4x32-10 with zero key and counter: first word 6627e8d5.
    assert int(ref.philox_draw(0, torch.zeros(1, dtype=torch.int64))) == 0x6627E8D5
    out = torch.empty(1, 1, dtype=torch.uint8)
    for threshold, kept in ((0x6627E8D5, 1), (0x6627E8D6, 0)):
        _native._C.keep_mask(out.data_ptr(), 1, 1, 0, 0, threshold)
        assert int(out) == kept


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("row_start", [0, 3])
def test_keep_mask_matches_reference(device, seed, shape, p, row_start):
    rows, cols = shape
    got = _native.keep_mask(seed, rows, cols, p, row_start=row_start, device=_device(device))
    assert got.dtype == torch.bool and got.shape == shape and got.device.type == device
    assert torch.equal(got.cpu(), ref.keep_mask(seed, rows, cols, p, row_start=row_start))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_offset", [2**32 - 2050, 2**40 + 17, 2**62])
def test_keep_mask_high_counter_word(device, first_offset):
    cols, seed = 1025, 99
    row_start, rows = first_offset // cols, 4
    got = _native.keep_mask(seed, rows, cols, 0.5, row_start=row_start, device=_device(device)).cpu()
    assert torch.equal(got, ref.keep_mask(seed, rows, cols, 0.5, row_start=row_start))
    # And the high word matters: the same offsets taken mod 2**32 draw a different mask.
    offsets = (torch.arange(row_start, row_start + rows)[:, None] * cols + torch.arange(cols)) % 2**32
    assert not torch.equal(got, ref.philox_draw(seed, offsets) >= ref.keep_threshold(0.5))


@needs_cpu
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    n = 512 * 512
    rate = _native.keep_mask(7, 512, 512, p).sum().item() / n
    assert abs(rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)


@needs_cpu
def test_empty_shapes():
    assert _native.keep_mask(1, 0, 5, 0.5).shape == (0, 5)
    assert _native.dropout_apply(torch.empty(3, 0), 1, 0.5).shape == (3, 0)


# ---- dropout_apply / dropout_add_ ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("row_start", [0, 2**32 // 13])  # the second crosses 2**32 in the 7x13 case
def test_dropout_apply_matches_reference(device, dtype, shape, p, row_start):
    x = torch.randn(shape).mul(3).to(dtype)
    got = _native.dropout_apply(x.to(_device(device)), 2**33 + 5, p, row_start=row_start)
    assert got.dtype == dtype and got.shape == shape and got.device.type == device
    assert _same_bits(got.cpu(), ref.dropout(x, 2**33 + 5, p, row_start))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_apply_every_bit_pattern(device, dtype):
    # All 65536 values: subnormals, overflow to inf under the 1/(1-p) scale, inf, NaN, -0.
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    got = _native.dropout_apply(x.to(_device(device)), 3, 0.3)
    assert _same_bits(got.cpu(), ref.dropout(x, 3, 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_apply_float32_specials(device):
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan])
    x = torch.cat([specials, torch.randn(97 * 13 - len(specials))]).reshape(97, 13)
    got = _native.dropout_apply(x.to(_device(device)), 11, 0.5)
    assert _same_bits(got.cpu(), ref.dropout(x, 11, 0.5))


@needs_cpu
def test_dropout_apply_non_contiguous_input():
    x = torch.randn(33, 70).t()
    got = _native.dropout_apply(x, 5, 0.25)
    assert got.is_contiguous() and torch.equal(got, ref.dropout(x.contiguous(), 5, 0.25))
    assert not torch.equal(got, x)  # p > 0 changed something


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("row_start", [0, 5])
def test_dropout_add_matches_reference(device, dtype, shape, p, row_start):
    dst, src = torch.randn(shape).to(dtype), torch.randn(shape).mul(2).to(dtype)
    expected = dst + ref.dropout(src, 42, p, row_start)
    dst_dev = dst.to(_device(device))
    out = _native.dropout_add_(dst_dev, src.to(dst_dev.device), 42, p, row_start=row_start)
    assert out is dst_dev
    assert _same_bits(dst_dev.cpu(), expected)


@needs_cpu
def test_dropout_add_non_contiguous_src_and_version_bump():
    dst, src = torch.randn(40, 24), torch.randn(24, 40).t()
    expected = dst + ref.dropout(src.contiguous(), 8, 0.5)
    version = dst._version
    _native.dropout_add_(dst, src, 8, 0.5)
    assert torch.equal(dst, expected) and dst._version > version


# ---- errors ----------------------------------------------------------------------------------

@needs_cpu
@pytest.mark.parametrize("call, error, match", [
    (lambda: _native.keep_mask(1, 2, 2, 1.5), ValueError, "p must be in"),
    (lambda: _native.keep_mask(1, 2, 2, -0.1), ValueError, "p must be in"),
    (lambda: _native.keep_mask(-1, 2, 2, 0.5), ValueError, "seed"),
    (lambda: _native.keep_mask(2**64, 2, 2, 0.5), ValueError, "seed"),
    (lambda: _native.keep_mask(1, -1, 2, 0.5), ValueError, "rows"),
    (lambda: _native.keep_mask(1, 2, 2, 0.5, row_start=-3), ValueError, "row_start"),
    (lambda: _native.keep_mask(1, 2, 2, 0.5, row_start=2**62), ValueError, "2\\^63"),
    (lambda: _native.dropout_apply(torch.randn(4), 1, 0.5), ValueError, "2-D"),
    (lambda: _native.dropout_apply(torch.randn(2, 2, 2), 1, 0.5), ValueError, "2-D"),
    (lambda: _native.dropout_apply(torch.randn(2, 2).double(), 1, 0.5), TypeError, "float64"),
    (lambda: _native.dropout_apply(torch.ones(2, 2, dtype=torch.int32), 1, 0.5), TypeError, "int32"),
    (lambda: _native.dropout_apply([[1.0]], 1, 0.5), TypeError, "torch.Tensor"),
    (lambda: _native.dropout_apply(torch.randn(2, 2, device="meta"), 1, 0.5), ValueError, "meta"),
    (lambda: _native.dropout_apply(torch.randn(2, 2), 1, 2.0), ValueError, "p must be in"),
    (lambda: _native.dropout_apply(torch.randn(2, 2), 1, 0.5, row_start=-1), ValueError, "row_start"),
    (lambda: _native.dropout_add_(torch.randn(2, 2), torch.randn(2, 2), 1, 0.5, row_start=-1), ValueError,
     "row_start"),
    (lambda: _native.dropout_add_(torch.randn(2, 3), torch.randn(3, 2), 1, 0.5), ValueError, "shapes differ"),
    (lambda: _native.dropout_add_(torch.randn(2, 2), torch.randn(2, 2).half(), 1, 0.5), TypeError, "dtypes differ"),
    (lambda: _native.dropout_add_(torch.randn(2, 2), torch.randn(2, 2, device="meta"), 1, 0.5),
     ValueError, "devices differ"),
    (lambda: _native.dropout_add_(torch.randn(3, 2).t(), torch.randn(2, 3), 1, 0.5), ValueError, "contiguous"),
])
def test_wrapper_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@needs_cpu
@pytest.mark.parametrize("call, match", [
    (lambda C: C.keep_mask(0, 2, 2, 0, 1, 0), "keep_mask: out is a null pointer"),
    (lambda C: C.keep_mask(0, -1, 2, 0, 1, 0), "keep_mask: rows must be >= 0"),
    (lambda C: C.keep_mask(0, 2, -2, 0, 1, 0), "keep_mask: cols must be >= 0"),
    (lambda C: C.keep_mask(0, 1, 2**40, 2**30, 1, 0), "2\\^63"),
    (lambda C: C.keep_mask(0, 0, 0, 0, 1, 2**32 + 1), "threshold must be <= 2\\^32"),
    (lambda C: C.dropout_apply(0, 8, 1, 1, 0, 1, 0, 1.0), "dropout_apply: in is a null pointer"),
    (lambda C: C.dropout_apply(8, 8, 1, 1, 3, 1, 0, 1.0), "dropout_apply: dtype_code must be"),
    (lambda C: C.dropout_apply(8, 8, 1, 1, 0, 1, 0, 1.0, -1), "dropout_apply: row_start must be >= 0"),
    (lambda C: C.dropout_add(8, 0, 1, 1, 0, 1, 0, 1.0), "dropout_add: src is a null pointer"),
    (lambda C: C.dropout_add(8, 8, 1, 1, -1, 1, 0, 1.0), "dropout_add: dtype_code must be"),
])
def test_raw_module_validates_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(_native._C)


@needs_cpu
def test_raw_module_accepts_null_pointers_for_empty_matrices():
    _native._C.keep_mask(0, 0, 5, 0, 1, 0)
    _native._C.dropout_apply(0, 0, 4, 0, 2, 1, 0, 1.0)
    _native._C.dropout_add(0, 0, 0, 0, 1, 1, 0, 1.0)


# ---- without a GPU, without an extension -----------------------------------------------------

@no_gpu
@pytest.mark.skipif(not _native.CUDA_BUILT, reason=f"tunefast._C_cuda: {_native.CUDA_ERROR}")
def test_cuda_without_gpu_raises_cleanly():
    with pytest.raises(RuntimeError, match="tunefast._C_cuda and a GPU: torch.cuda.is_available"):
        _native.keep_mask(1, 4, 4, 0.5, device="cuda")
    assert _native.status()["cuda_device_error"]
    # The raw module launched on a (fake) device pointer; in a subprocess so a crash fails only this test.
    result = _run_python("""
        import json
        from tunefast import _native
        errors = []
        for call in (lambda C: C.keep_mask(1 << 20, 4, 4, 0, 1, 0, 0),
                     lambda C: C.dropout_apply(1 << 20, 1 << 21, 4, 4, 2, 1, 0, 1.0, 0),
                     lambda C: C.dropout_add(1 << 20, 1 << 21, 4, 4, 0, 1, 0, 1.0, 0),
                     lambda C: C.device_count()):
            try:
                call(_native._C_cuda)
                errors.append(None)
            except RuntimeError as err:
                errors.append(str(err))
        print(json.dumps(errors))
    """)
    assert all(e and "CUDA" in e for e in result), result


def test_import_survives_missing_extension():
    # One interpreter, a fresh tunefast._native per case (a startup imports transformers: ~5 s).
    cases = {
        "ModuleNotFoundError(\"No module named 'tunefast._C'\", name='tunefast._C')":
            "native module tunefast._C not built",
        "ImportError('_C.so: undefined symbol: omp_get_max_threads')": "undefined symbol: omp_get_max_threads",
        "OSError('libgomp.so.1: cannot open shared object file')": "libgomp.so.1",
    }
    results = _run_python(f"""
        import importlib, importlib.abc, json, sys
        import torch

        class Broken(importlib.abc.MetaPathFinder):
            error = None
            def find_spec(self, name, path, target=None):
                if name in ("tunefast._C", "tunefast._C_cuda"):
                    raise eval(self.error)

        sys.meta_path.insert(0, Broken())
        results = []
        for error in {list(cases)!r}:
            Broken.error = error
            for name in ("tunefast._native", "tunefast._C", "tunefast._C_cuda"):
                sys.modules.pop(name, None)
            import tunefast._native as native
            try:
                native.dropout_apply(torch.ones(2, 2), 1, 0.5)
                call = None
            except RuntimeError as err:
                call = str(err)
            results.append(dict(cpu=native.CPU_AVAILABLE, cpu_error=native.CPU_ERROR, cuda=native.CUDA_BUILT,
                                status=native.status()["cpu_built"], call=call))
        print(json.dumps(results))
    """)
    for expected, result in zip(cases.values(), results):
        assert result["cpu"] is False and result["cuda"] is False and result["status"] is False, result
        assert expected in result["cpu_error"], result
        assert result["call"] and "needs tunefast._C" in result["call"] and expected in result["call"], result

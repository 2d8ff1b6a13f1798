"""The sparse-delta op against an fp64 dense oracle: Triton (interpreter), native C++ and plain-torch
implementations, and the native kernels (CPU; CUDA marked ``gpu``) against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.tolerances import assert_close_to_oracle
from tunefast import _native
from tunefast.ops import sparse as osp
from tunefast.reference import sparse as ref

IMPLS = ["triton", "native", "torch"]
needs_native = pytest.mark.skipif(not _native.SPARSE_CPU, reason=f"tunefast._C sparse kernels: {_native.CPU_ERROR}")


@pytest.fixture
def backend_for():
    """impl name -> the backend string that selects it ("reference" is plain torch)."""

    def pick(impl):
        if impl == "native" and not _native.SPARSE_CPU:
            pytest.skip(f"tunefast._C without sparse kernels: {_native.CPU_ERROR}")
        backend = {"triton": "triton", "native": "native", "torch": "reference"}[impl]
        assert osp.implementation(backend, torch.device("cpu")) == impl
        return backend

    return pick


def _indices(n, k, nnz, seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    if rows is not None:  # all entries in the given rows (skewed: thread partition, long segments)
        pool = torch.cat([torch.arange(r * k, (r + 1) * k) for r in rows])
        return pool[torch.randperm(pool.numel(), generator=g)[:nnz]].sort().values
    return torch.randperm(n * k, generator=g)[:nnz].sort().values


def _close(out, oracle, torch_same_dtype=None, name="output"):
    """tests/tolerances.py's rule; an empty delta's empty gradient only has to have the right shape."""
    if oracle.numel() == 0:
        assert out.shape == oracle.shape, name
        return
    assert_close_to_oracle(out, oracle, torch_same_dtype, name)


def _dense(idx, values, n, k, dtype=torch.float64):
    d = torch.zeros(n * k, dtype=dtype)
    d[idx] = values.detach().to(dtype)
    return d.view(n, k)


# ---- the values' gradient: SDDMM == masked dense gradient ------------------------------------------

SDDMM_CASES = [
    pytest.param(37, 23, 41, 50, None, id="odd"),
    pytest.param(37, 23, 41, 20, None, id="odd-few-entries"),  # nnz < K: the native direct path
    pytest.param(5, 8, 8, 0, None, id="empty-mask"),
    pytest.param(3, 7, 5, 35, None, id="full-density"),
    pytest.param(70, 33, 130, 200, [4, 31], id="skewed-rows"),
    pytest.param(1, 1, 1, 1, None, id="1x1"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,nnz,rows", SDDMM_CASES)
def test_values_gradient_equals_masked_dense_gradient(impl, dtype, m, n, k, nnz, rows, backend_for):
    backend = backend_for(impl)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    st = osp.sparse_structure(_indices(n, k, nnz, rows=rows), (n, k))
    got = osp._sddmm(osp.implementation(backend, x.device), dy, x, st)
    oracle = (dy.double().t() @ x.double()).view(-1)[st.indices]  # the dense gradient, then masked
    assert got.dtype == torch.float32 and got.shape == (nnz,)
    _close(got, oracle, name="dv")


def test_triton_sddmm_token_splits_match():
    from tunefast.kernels import sparse as ks

    x, dy = torch.randn(45, 19), torch.randn(45, 13)
    idx = _indices(13, 19, 60)
    one, three = ks.sddmm(dy, x, idx, 19), ks.sddmm(dy, x, idx, 19, splits=3)
    torch.testing.assert_close(three, one, rtol=1e-6, atol=1e-6)


# ---- the op: forward and every gradient against the fp64 oracle -------------------------------------

OP_CASES = [
    # lead, K, N, nnz per delta, bias, conv1d layout
    pytest.param((29,), 41, 23, [60], True, False, id="odd-2d"),
    pytest.param((2, 5), 24, 17, [30, 45], False, False, id="3d-two-deltas"),
    pytest.param((11,), 19, 26, [0], True, False, id="empty-delta"),
    pytest.param((9,), 40, 30, [12, 25], True, False, id="few-entries"),  # nnz < N, K: native direct path
    pytest.param((13,), 33, 21, [70], True, True, id="conv1d-layout"),
]


def _make(lead, k, n, nnzs, dtype, bias, conv1d, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(*lead, k).to(dtype)
    w = (torch.randn(k, n).to(dtype).t() if conv1d else torch.randn(n, k).to(dtype))
    b = torch.randn(n).to(dtype) if bias else None
    idxs = [_indices(n, k, c, seed=seed + i) for i, c in enumerate(nnzs)]
    vals = [torch.randn(c) * 0.5 for c in nnzs]
    return x, w, b, vals, idxs


def _oracle(x, w, b, vals, idxs):
    n, k = w.shape
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    ds = [_dense(i, v, n, k).requires_grad_() for i, v in zip(idxs, vals)]
    y = x64 @ (w.double() + sum(ds, torch.zeros(n, k, dtype=torch.float64))).t()
    y = y + b64 if b64 is not None else y
    return y, [x64, b64, *ds]


def _torch_same_dtype(x, w, b, vals, idxs):
    """PyTorch doing the dense math in x's dtype (W + Delta rounded to it), for the low-precision bound."""
    n, k = w.shape
    xx = x.detach().requires_grad_()
    bb = b.detach().requires_grad_() if b is not None else None
    ds = [_dense(i, v, n, k, dtype=x.dtype).requires_grad_() for i, v in zip(idxs, vals)]
    y = torch.nn.functional.linear(xx, w + sum(ds, torch.zeros(n, k, dtype=x.dtype)), bb)
    return y, [xx, bb, *ds]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n,nnzs,bias,conv1d", OP_CASES)
def test_forward_backward_against_oracle(impl, dtype, lead, k, n, nnzs, bias, conv1d, backend_for):
    backend = backend_for(impl)
    x, w, b, vals, idxs = _make(lead, k, n, nnzs, dtype, bias, conv1d)
    xg = x.clone().requires_grad_()
    bg = b.clone().requires_grad_() if b is not None else None
    vg = [v.clone().requires_grad_() for v in vals]
    y = osp.sparse_linear(xg, w, bg, vg, idxs, backend=backend)
    y_ref, leaves_ref = _oracle(x, w, b, vals, idxs)
    y_t, leaves_t = _torch_same_dtype(x, w, b, vals, idxs)
    g = torch.randn(y.shape).to(dtype)
    for out in (y, y_ref, y_t):
        out.backward(g.to(out.dtype))
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close_to_oracle(y, y_ref, y_t, "y")
    assert_close_to_oracle(xg.grad, leaves_ref[0].grad, leaves_t[0].grad, "dx")
    if b is not None:
        assert_close_to_oracle(bg.grad, leaves_ref[1].grad, leaves_t[1].grad, "db")
    for i, (v, idx) in enumerate(zip(vg, idxs)):
        want = leaves_ref[2 + i].grad.view(-1)[idx]  # the masked dense gradient
        assert v.grad.dtype == torch.float32 and v.grad.shape == v.shape
        _close(v.grad, want, name=f"dv{i}")


@pytest.mark.parametrize("impl", ["triton", "native"])
def test_implementations_agree_with_torch(impl, backend_for):
    x, w, b, vals, idxs = _make((4, 9), 40, 24, [90, 30], torch.float32, True, False, seed=3)
    outs = {}
    for name in (impl, "torch"):
        backend = backend_for(name)
        xg, vg = x.clone().requires_grad_(), [v.clone().requires_grad_() for v in vals]
        y = osp.sparse_linear(xg, w, b, vg, idxs, backend=backend)
        y.backward(torch.ones_like(y))
        outs[name] = [y.detach(), xg.grad, *[v.grad for v in vg]]
    for a, t in zip(outs[impl], outs["torch"]):
        torch.testing.assert_close(a, t, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_bf16_base_fp32_and_bf16_values(backend_for):
    backend = backend_for("native")
    x, w, b, vals, idxs = _make((17,), 30, 20, [50], torch.bfloat16, True, False)
    for vdt in (torch.float32, torch.bfloat16):
        v = vals[0].detach().to(vdt).requires_grad_()
        y = osp.sparse_linear(x, w, b, v, idxs[0], backend=backend)
        y.float().sum().backward()
        assert y.dtype == torch.bfloat16 and v.grad.dtype == vdt


# ---- nothing dense: no (N, K) tensor, no weight gradient, only x kept ----------------------------------


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tensor_of_the_weight_shape_is_formed(impl, backend_for):
    backend = backend_for(impl)
    n, k, m = 29, 37, 23  # distinct primes: no activation shape can equal (N, K) or (K, N)
    x, w, b, vals, idxs = _make((m,), k, n, [80], torch.float32, True, False)
    st = osp.sparse_structure(idxs[0], (n, k))
    xg, v = x.clone().requires_grad_(), vals[0].clone().requires_grad_()
    with _Shapes() as rec:
        y = osp.sparse_linear(xg, w, b, v, st, backend=backend)
        y.backward(torch.randn_like(y))
    assert not {(n, k), (k, n)} & rec.shapes, rec.shapes
    assert not any(len(s) == 1 and s[0] == n * k for s in rec.shapes)
    assert w.grad is None and v.grad.shape == (80,)


def test_keeps_only_x_for_backward():
    from tunefast.profiling import SavedTensors

    x, w, b, vals, idxs = _make((31,), 24, 16, [40], torch.float32, True, False)
    st = osp.sparse_structure(idxs[0], (16, 24))
    v = vals[0].requires_grad_()
    with SavedTensors(exclude=[w, b, v, *st]) as rec:
        osp.sparse_linear(x, w, b, v, st, backend="reference")
    assert rec.bytes == x.numel() * x.element_size()
    with SavedTensors(exclude=[w, b, v, *st]) as rec:  # no trained delta: nothing
        osp.sparse_linear(x, w, b, v.detach(), st, backend="reference")
    assert rec.bytes == 0


def test_trainable_weight_is_refused():
    x, w, b, vals, idxs = _make((4,), 8, 8, [5], torch.float32, False, False)
    w.requires_grad_()
    with pytest.raises(ValueError, match="weight requires grad"):
        osp.sparse_linear(x, w, b, vals[0], idxs[0])


@pytest.mark.parametrize(
    "indices,match",
    [
        ([3, 1, 5], "not sorted"),
        ([1, 3, 3], "duplicated"),
        ([4, 1, 4], "duplicated"),
        ([0, 64], "out of range"),
        ([-1, 2], "must be non-negative"),
        (torch.tensor([0.0, 1.0]), "must hold integers"),
        (torch.tensor([[0, 1]]), "must be 1-D"),
    ],
)
def test_bad_indices_get_clear_errors(indices, match):
    x, w = torch.randn(3, 8), torch.randn(8, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        osp.sparse_linear(x, w, None, torch.zeros(len(indices) if isinstance(indices, list) else 2), indices)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda kw: kw.update(x=torch.randn(3, 9)), ValueError, "features"),
        (lambda kw: kw.update(x=torch.randn(3, 8, dtype=torch.bfloat16)), TypeError, "weight dtype"),
        (lambda kw: kw.update(values=torch.zeros(4)), ValueError, "entries but its indices"),
        (lambda kw: kw.update(structures=osp.sparse_structure(torch.tensor([1, 2, 5]), (8, 9))), ValueError,
         "built for"),
        (lambda kw: kw.update(values=torch.zeros(3, dtype=torch.int64)), TypeError, "dtype"),
        (lambda kw: kw.update(backend="magic"), ValueError, "backend must be one of"),
        (lambda kw: kw.update(bias=torch.zeros(7)), ValueError, "bias has 7"),
    ],
)
def test_bad_input_gets_clear_error(mutate, exc, match):
    kw = dict(x=torch.randn(3, 8), weight=torch.randn(8, 8), bias=None, values=torch.zeros(3),
              structures=torch.tensor([1, 2, 5]))
    mutate(kw)
    with pytest.raises(exc, match=match):
        osp.sparse_linear(**kw)


def test_opcheck():
    x, w, b, vals, idxs = _make((3, 5), 16, 12, [20], torch.float32, True, False)
    st = osp.sparse_structure(idxs[0], (12, 16))
    x.requires_grad_()
    v = vals[0].requires_grad_()
    torch.library.opcheck(osp._sparse_linear_fwd, (x, w, b, [v], *[[t] for t in st], "reference"))


def test_compile_fullgraph():
    x, w, b, vals, idxs = _make((3, 5), 16, 12, [20], torch.float32, True, False)
    st = osp.sparse_structure(idxs[0], (12, 16))
    v = vals[0].requires_grad_()

    def f(x):
        return osp.sparse_linear(x, w, b, v, st, backend="auto")

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert v.grad is not None and w.grad is None


# ---- native kernels (tunefast._C; tunefast._C_cuda on a GPU) ----------------------------------------

NATIVE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@needs_native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("nnz", [3000, 90])  # transposed token blocks; direct gathers (nnz < N, K)
def test_native_kernels_are_deterministic_across_thread_counts(dtype, nnz):
    """Large enough for OpenMP; each entry is summed by one thread in one order whatever the team."""
    m, n, k = 400, 97, 260
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    st = osp.sparse_structure(_indices(n, k, nnz, rows=list(range(0, 97, 3))), (n, k))
    v = torch.randn(nnz)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype)
            dx = torch.zeros(m, k, dtype=dtype)
            _native.sparse_spmm_(y, x, st.row_ptr, st.indices, v)
            _native.sparse_spmm_(dx, dy, st.col_ptr, st.t_rows, v, st.t_perm)
            results.append((_native.sparse_sddmm(dy, x, st.indices, st.row_ptr), y, dx))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    y_ref = (torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype).float()
             + ref.spmm(x, st.indices, v, n)).to(dtype)
    torch.testing.assert_close(results[0][1], y_ref, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2)


def _scatter_device(name):
    if name == "cpu":
        if not _native.SPARSE_CPU:
            pytest.skip(f"tunefast._C: {_native.CPU_ERROR}")
    elif not _native.sparse_usable(torch.device("cuda"))[0]:
        pytest.skip(f"tunefast._C_cuda: {_native.sparse_usable(torch.device('cuda'))[1]}")
    return torch.device(name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("wdtype", NATIVE_DTYPES)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_native_scatter_is_bit_exact(device, wdtype, vdtype, transposed):
    dev = _scatter_device(device)
    n, k = 37, 53
    store = torch.randn((k, n) if transposed else (n, k)).to(wdtype).to(dev)
    idx = _indices(n, k, 400).to(dev)
    v = (torch.randn(400) * 1e-2).to(vdtype).to(dev)
    a, b = store.clone(), store.clone()
    view = (lambda t: t.t()) if transposed else (lambda t: t)
    saved_native = _native.sparse_scatter_add_(view(a), idx, v)
    saved_ref = ref.scatter_add_(view(b), idx, v)
    assert torch.equal(a, b) and torch.equal(saved_native, saved_ref)
    ref.scatter_restore_(view(a), idx, saved_native)
    assert torch.equal(a, store)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
def test_cuda_sddmm_against_reference(dtype):
    dev = _scatter_device("cuda")
    m, n, k = 1000, 96, 130
    x, dy = torch.randn(m, k).to(dtype).to(dev), torch.randn(m, n).to(dtype).to(dev)
    st = osp.sparse_structure(_indices(n, k, 900).to(dev), (n, k))
    got = _native.sparse_sddmm(dy, x, st.indices, st.row_ptr)
    torch.testing.assert_close(got, ref.sddmm(dy, x, st.indices, k), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_against_reference(dtype):
    """Compiled Triton kernels vs backend="reference" (CUDA SDDMM when built, torch SpMM)."""
    dev = torch.device("cuda")
    x, w, b, vals, idxs = _make((3, 700), 256, 384, [5000], dtype, True, False)
    x, w, b = x.to(dev), w.to(dev), b.to(dev)
    st = osp.sparse_structure(idxs[0].to(dev), (384, 256))
    outs = []
    for backend in ("triton", "reference"):
        xg, v = x.clone().requires_grad_(), vals[0].to(dev).requires_grad_()
        y = osp.sparse_linear(xg, w, b, v, st, backend=backend)
        y.float().sum().backward()
        outs.append((y.float(), xg.grad.float(), v.grad))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, t in zip(*outs):
        torch.testing.assert_close(a, t, rtol=tol, atol=tol)


def test_cuda_module_has_sparse_kernels_when_built():
    if not _native.CUDA_BUILT:
        pytest.skip(f"tunefast._C_cuda not built: {_native.CUDA_ERROR}")
    assert _native.SPARSE_CUDA_BUILT
    assert hasattr(_native._C_cuda, "sparse_scatter_add")


_AOT = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tunefast.kernels import sparse as ks

def sig(names, types):
    return dict(zip(names, types))

spmm = ["out_ptr", "inp_ptr", "seg_ptr", "gather_ptr", "val_ptr", "perm_ptr", "M", "S", "n_in", "stride_om",
        "stride_os", "stride_im", "stride_ig", "size_key", "TRANSPOSED", "BLOCK_T", "BLOCK_S"]
sddmm = ["out_ptr", "dy_ptr", "x_ptr", "idx_ptr", "M", "NNZ", "n_in", "T_PER_SPLIT", "stride_dym", "stride_dyn",
         "stride_xm", "stride_xk", "stride_os", "size_key", "BLOCK_T", "BLOCK_NZ"]
sizes = {}
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    for io in ("bf16", "fp32"):
        for transposed, gather in ((False, "*i64"), (True, "*i32")):
            meta = ks._gpu_configs("_spmm_kernel")[0].kwargs
            types = ["*" + io, "*" + io, "*i64", gather, "*fp32", gather] + ["i32"] * 8 + ["constexpr"] * 3
            src = ASTSource(ks._spmm_kernel, sig(spmm, types), constexprs={"TRANSPOSED": transposed, **meta})
            sizes[f"spmm-{arch}-{io}-{transposed}"] = len(triton.compile(src, target=target).asm["cubin"])
        meta = ks._gpu_configs("_sddmm_kernel")[0].kwargs
        types = ["*fp32", "*" + io, "*" + io, "*i64"] + ["i32"] * 10 + ["constexpr"] * 2
        src = ASTSource(ks._sddmm_kernel, sig(sddmm, types), constexprs=meta)
        sizes[f"sddmm-{arch}-{io}"] = len(triton.compile(src, target=target).asm["cubin"])
print(json.dumps(sizes))
"""


def test_triton_kernels_compile_for_ampere_and_hopper():
    """Ahead-of-time compilation to sm_80 / sm_90 cubins, no GPU needed (in a process without the
    interpreter): what a GPU machine's first launch would do, minus the launch."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_AOT)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == 12 and all(v > 0 for v in sizes.values())

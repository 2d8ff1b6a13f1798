"""The LoRA op's two GPU paths (fused Triton GEMM / cuBLAS + in-place low-rank term) and their selection
(tunefast/ops/lora_path.py), plus the (IA)3 / DoRA column-scale gradient where a scale entry is 0.

On CPU both paths run under the Triton interpreter (the "cublas" path's base product is then torch's CPU
matmul); the selection logic is driven by an injected timer. Nothing here has run on a GPU."""

import peft
import pytest
import torch

import tunefast
from tests import models as M
from tests.test_lora_op import _grads, _make, _oracle, _run_op, _torch_same_dtype
from tests.test_patch_lora import assert_rel_close
from tests.tolerances import assert_close_to_oracle
from tunefast import info as tinfo
from tunefast.kernels import launch
from tunefast.ops import _lowrank as lowrank
from tunefast.ops import lora as oplora
from tunefast.ops import lora_path as lp

PATHS = list(lp.PATHS)


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch, tmp_path):
    """Every test starts with no cached choice, no override, no injected timer and a private disk cache."""
    monkeypatch.delenv(lp.ENV, raising=False)
    monkeypatch.setenv("TUNEFAST_CACHE_DIR", str(tmp_path))
    lp.clear()
    saved = lp.set_lora_path(None), lp.set_timer(None)
    yield
    lp.clear()
    lp.set_lora_path(saved[0])
    lp.set_timer(saved[1])


@pytest.fixture
def ran(monkeypatch):
    """Counts the calls of each path's forward / dx implementation (so a test knows what really ran)."""
    calls = {"fwd:triton": 0, "fwd:cublas": 0, "dx:triton": 0, "dx:cublas": 0}
    for name, key in (("_fused_forward", "fwd:triton"), ("_cublas_forward", "fwd:cublas"),
                      ("_fused_dx", "dx:triton"), ("_cublas_dx", "dx:cublas")):
        impl = getattr(lowrank, name)

        def counted(*args, _impl=impl, _key=key):
            calls[_key] += 1
            return _impl(*args)

        monkeypatch.setattr(lowrank, name, counted)
    return calls


# ---- both paths against the fp64 oracle ------------------------------------------------------------

CASES = [
    # lead, K, N, ranks, p, bias, conv1d
    pytest.param((37,), 97, 65, [8], 0.0, True, False, id="odd-2d"),
    pytest.param((5, 7), 40, 33, [16], 0.3, True, False, id="dropout"),
    pytest.param((29,), 64, 24, [4, 12], 0.2, False, False, id="two-adapters-dropout-nobias"),
    pytest.param((19,), 50, 70, [8], 0.0, True, True, id="conv1d-layout"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n,ranks,p,bias,conv1d", CASES)
def test_each_path_against_oracle(ran, path, dtype, lead, k, n, ranks, p, bias, conv1d):
    x, w, b, a, bb = _make(lead, k, n, ranks, dtype, bias=bias, conv1d=conv1d)
    scalings = [2.0 / r for r in ranks]
    ps = [p] * len(ranks)
    seeds = torch.tensor([987654 + 11 * i for i in range(len(ranks))]) if p > 0 else None
    with lp.use_lora_path(path):
        y, *leaves = _run_op(x, w, b, a, bb, scalings, ps, seeds, "triton")
        g = torch.randn(y.shape).to(y.dtype).double()
        grads = _grads(y, g, *leaves)
    assert ran == {"fwd:triton": path == "triton", "fwd:cublas": path == "cublas",
                   "dx:triton": path == "triton", "dx:cublas": path == "cublas"}
    y_ref, *ref_leaves = _oracle(x, w, b, a, bb, scalings, ps, seeds)
    y_t, *t_leaves = _torch_same_dtype(x, w, b, a, bb, scalings, ps, seeds)
    assert y.dtype == dtype
    assert_close_to_oracle(y, y_ref, y_t, "y")
    names = ["dx"] + [f"dA{i}" for i in range(len(ranks))] + [f"dB{i}" for i in range(len(ranks))]
    for name, got, want, tgot in zip(names, grads, _grads(y_ref, g, *ref_leaves), _grads(y_t, g, *t_leaves)):
        assert_close_to_oracle(got, want, tgot, name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_each_path_bf16_base_fp32_adapters(path, p):
    """PEFT's default dtypes: the cuBLAS path adds the fp32 low-rank term through the Triton epilogue."""
    x, w, b, a, bb = _make((3, 11), 40, 24, [8], torch.bfloat16, adapter_dtype=torch.float32)
    seeds = torch.tensor([4242]) if p else None
    with lp.use_lora_path(path):
        y, *leaves = _run_op(x, w, b, a, bb, [0.5], [p], seeds, "triton")
        g = torch.randn(y.shape).to(y.dtype).double()
        grads = _grads(y, g, *leaves)
    y_ref, *ref_leaves = _oracle(x, w, b, a, bb, [0.5], [p], seeds)
    y_t, *t_leaves = _torch_same_dtype(x, w, b, a, bb, [0.5], [p], seeds)
    assert_close_to_oracle(y, y_ref, y_t, "y")
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for got, want, tgot in zip(grads, _grads(y_ref, g, *ref_leaves), _grads(y_t, g, *t_leaves)):
        assert_close_to_oracle(got, want, tgot)


def _col_scale_run(path_or_backend, x, w, b, a, bb, g_scale):
    backend = "reference" if path_or_backend == "reference" else "triton"
    leaves = [x.detach().requires_grad_(), *[t.detach().requires_grad_() for t in (*a, *bb)],
              g_scale.detach().requires_grad_()]
    n = len(a)
    with lp.use_lora_path(None if backend == "reference" else path_or_backend):
        y, _ = oplora._lora_linear_fwd(leaves[0], w, b, leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], [0.5] * n,
                                       [0.0] * n, None, leaves[-1], backend)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("path", PATHS)
def test_each_path_with_a_column_scale_matches_the_reference(path):
    """y = g * (x W^T + s xa B^T) + b (DoRA's and (IA)3's form) on both paths, gradients included."""
    x, w, b, a, bb = _make((23,), 48, 40, [8], torch.float32)
    g = torch.rand(40) + 0.5
    y, grads = _col_scale_run(path, x, w, b, a, bb, g)
    y_ref, grads_ref = _col_scale_run("reference", x, w, b, a, bb, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["dx", "dA", "dB", "dg"], grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=name)


# ---- the column-scale gradient where g == 0 --------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_col_scale_gradient_is_exact_where_the_scale_is_zero(backend):
    """dL/dg_j = sum_t dy_tj z_tj: where g_j = 0 it is finite (was 0/0 = NaN) and equals fp64 autograd."""
    x, w, b, a, bb = _make((17,), 32, 24, [4], torch.float32)
    g = torch.rand(24) + 0.5
    g[[0, 5, 23]] = 0.0
    _, grads = _col_scale_run(backend, x, w, b, a, bb, g)
    x64, a64, b64, g64 = (t.double().requires_grad_() for t in (x, a[0], bb[0], g))
    y64 = g64 * (x64 @ w.double().t() + 0.5 * (x64 @ a64.t()) @ b64.t()) + b.double()
    y64.backward(torch.linspace(-1, 1, y64.numel()).reshape(y64.shape).double())
    assert torch.isfinite(grads[-1]).all()
    assert grads[-1][[0, 5, 23]].abs().min() > 0  # the case under test: a non-trivial gradient there
    for name, got, want in zip(["dx", "dA", "dB", "dg"], grads, [x64.grad, a64.grad, b64.grad, g64.grad]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_col_scale_recompute_all_branch_matches_the_indexed_one():
    """The branch used while tracing (torch.compile: no values to find the zero columns) gives the same dg."""
    x, w, b, _, _ = _make((13,), 16, 12, [4], torch.float32)
    g = torch.rand(12) + 0.5
    g[[2, 7]] = 0.0
    xa, up = torch.randn(13, 4), torch.randn(12, 4)
    y = g * (x @ w.t() + 0.5 * xa @ up.t()) + b
    dy = torch.randn_like(y)
    indexed = oplora._col_scale_grad(dy, x, w, y, b, g, [up], [xa], [0.5], torch.tensor([2, 7]), False)
    whole = oplora._col_scale_grad(dy, x, w, y, b, g, [up], [xa], [0.5], None, True)
    torch.testing.assert_close(indexed, whole, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(indexed).all() and indexed[[2, 7]].abs().min() > 0


def test_col_scale_gradient_under_compile_with_zero_entries():
    """Traced (no values to look at), the zero columns are unknown: z is recomputed whole, same dg."""
    x, w, b, a, bb = _make((11,), 24, 20, [4], torch.float32)
    g = torch.rand(20) + 0.5
    g[[1, 19]] = 0.0

    def run(compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, a[0], bb[0], g)]

        def f(x_, a_, b_, g_):
            y, _ = torch.ops.tunefast.lora_linear_fwd(x_, w, b, [a_], [b_], [0.5], [0.0], None, g_, "reference")
            return y

        fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
        fn(*leaves).pow(2).sum().backward()
        return [t.grad for t in leaves]

    eager, compiled = run(False), run(True)
    assert torch.isfinite(compiled[-1]).all()
    for name, got, want in zip(["dx", "dA", "dB", "dg"], compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def _saved_storages(fn):
    ptrs = []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return set(ptrs)


def test_x_is_kept_only_when_some_scale_entry_is_zero():
    """(IA)3-style call (no trainable adapter): with every g != 0 nothing of x is kept (as before the fix);
    with a zero entry x is kept, to recompute those columns."""
    x = torch.randn(9, 16)
    w, bias = torch.randn(12, 16), torch.randn(12)
    empty_a, empty_b = x.new_zeros(0, 16), x.new_zeros(12, 0)

    def call(g):
        def fn():
            oplora._lora_linear_fwd(x, w, bias, [empty_a], [empty_b], [1.0], [0.0], None, g, "reference")
        return fn

    g = (torch.rand(12) + 0.5).requires_grad_()
    assert x.untyped_storage().data_ptr() not in _saved_storages(call(g))
    g0 = g.detach().clone()
    g0[3] = 0.0
    assert x.untyped_storage().data_ptr() in _saved_storages(call(g0.requires_grad_()))


def _loss_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ia3_with_zero_entries_matches_peft(backend):
    """(IA)3 on a tiny Llama with some l entries exactly 0: loss and every l gradient as PEFT's (finite)."""
    cfg = peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[], task_type="CAUSAL_LM")
    model = peft.get_peft_model(M.base_model("llama"), cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
                p.view(-1)[::5] = 0.0  # every fifth output column switched off
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert report.kernels().get(f"lora_linear[{backend}]", 0) == 4, str(report)  # 2 layers x (k, v)
    inputs = M.batch("llama")
    loss0, grads0 = _loss_grads(model, inputs)
    loss1, grads1 = _loss_grads(patched, inputs)
    assert_rel_close(loss1, loss0, "loss")
    assert grads0.keys() == grads1.keys() and grads0
    for name, want in grads0.items():
        assert torch.isfinite(grads1[name]).all(), name
        zero_cols = want.view(-1)[::5]
        assert zero_cols.abs().max() > 0, f"{name}: PEFT's gradient at l = 0 should be non-trivial"
        assert_rel_close(grads1[name], want, name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dora_with_zero_magnitude_entries_matches_peft(backend):
    """DoRA's column scale m / ||W + s B A|| is 0 where m is: loss and every gradient as PEFT's, finite."""
    model = M.peft_model("llama", ["q_proj", "v_proj"], use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
                p.view(-1)[::7] = 0.0
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert report.kernels().get(f"dora_linear[{backend}]", 0) == 4, str(report)
    inputs = M.batch("llama")
    loss0, grads0 = _loss_grads(model, inputs)
    loss1, grads1 = _loss_grads(patched, inputs)
    assert_rel_close(loss1, loss0, "loss")
    assert grads0.keys() == grads1.keys()
    for name, want in grads0.items():
        assert torch.isfinite(grads1[name]).all(), name
        if "lora_magnitude_vector" in name:
            assert want.view(-1)[::7].abs().max() > 0, name
        assert_rel_close(grads1[name], want, name)


# ---- selection -------------------------------------------------------------------------------------


class FakeClock:
    """A clock the runners advance: each path 'takes' its cost in fake milliseconds per call."""

    def __init__(self, cost):
        self.now, self.cost, self.timed = 0.0, dict(cost), []

    def timer(self, path, fn):
        self.timed.append(path)
        t0 = self.now
        fn()
        self.now += self.cost[path]
        return self.now - t0


def _layer(m=24, k=32, n=40, r=8, p=0.0):
    x, w, b, a, bb = _make((m,), k, n, [r], torch.float32)
    return lambda: oplora.lora_linear(x.requires_grad_(), w, b, a, bb, [0.5], [p], backend="triton")


def test_faster_path_is_chosen_cached_and_visible(ran):
    clock = FakeClock({"triton": 3.0, "cublas": 1.0})
    lp.set_timer(clock.timer)
    with launch.set_autotune(True):
        _layer(m=24)().sum().backward()
        assert clock.timed == ["triton", "cublas", "triton", "cublas"]  # fwd, then dx
        assert ran["fwd:cublas"] == 2 and ran["dx:cublas"] == 2  # timed once, then run
        _layer(m=30)().sum().backward()  # 30 tokens: the same M bucket (<= 32) -> cached
        assert len(clock.timed) == 4
        assert ran["fwd:triton"] == 1 and ran["fwd:cublas"] == 3
    made = dict(lp.choices())
    assert len(made) == 2
    fwd = next(c for key, c in made.items() if key.startswith("fwd M<=32 N=40 K=32 r=8 float32/float32"))
    assert fwd.path == "cublas" and fwd.how == "measured" and fwd.times_ms == {"triton": 3.0, "cublas": 1.0}
    text = tinfo.render(tinfo.collect())
    assert "fwd M<=32 N=40 K=32 r=8 float32/float32 on cpu: cublas (measured: cublas 1 ms, triton 3 ms)" in text


def test_a_new_shape_class_is_timed_again():
    clock = FakeClock({"triton": 1.0, "cublas": 2.0})
    lp.set_timer(clock.timer)
    with launch.set_autotune(True):
        _layer(m=24)()
        _layer(m=100)()  # new M bucket
        _layer(m=24, n=48)()  # new N
        _layer(m=24, p=0.5)()  # dropout on
        _layer(m=24)()  # cached
    assert clock.timed == ["triton", "cublas"] * 4
    assert {c.path for _, c in lp.choices()} == {"triton"}


def test_override_wins_over_the_measurement(monkeypatch, ran):
    clock = FakeClock({"triton": 3.0, "cublas": 1.0})
    lp.set_timer(clock.timer)
    with launch.set_autotune(True):
        _layer()()  # measured: cublas
        monkeypatch.setenv(lp.ENV, "triton")
        before = dict(ran)
        _layer()()
        assert ran["fwd:triton"] == before["fwd:triton"] + 1 and ran["fwd:cublas"] == before["fwd:cublas"]
        lp.set_lora_path("cublas")  # the setter wins over the variable
        _layer()()
        assert ran["fwd:cublas"] == before["fwd:cublas"] + 1
        lp.set_lora_path(None)
        monkeypatch.setenv(lp.ENV, "auto")
        _layer()()
        assert ran["fwd:cublas"] == before["fwd:cublas"] + 2  # back to the cached measurement
        monkeypatch.setenv(lp.ENV, "triton")
        lp.set_lora_path("auto")  # the setter's "auto" also wins over the variable: the measurement
        _layer()()
        assert ran["fwd:cublas"] == before["fwd:cublas"] + 3
    assert clock.timed == ["triton", "cublas"]  # overrides never time


def test_autotune_off_uses_the_fixed_rule_without_timing(ran):
    clock = FakeClock({"triton": 3.0, "cublas": 1.0})
    lp.set_timer(clock.timer)
    with launch.set_autotune(False):
        _layer()()
    assert clock.timed == [] and ran["fwd:triton"] == 1  # the rule on CPU tensors: the fused kernel
    assert [c.how for _, c in lp.choices()] == ["rule"]
    with launch.set_autotune(True):
        _layer()()  # a rule entry does not stop a later measurement
    assert clock.timed == ["triton", "cublas"]


def test_without_a_timer_cpu_tensors_take_the_rule(ran):
    with launch.set_autotune(True):
        _layer()()
    assert ran["fwd:triton"] == 1 and ran["fwd:cublas"] == 0


def test_bad_override_names_the_setting(monkeypatch):
    monkeypatch.setenv(lp.ENV, "cutlass")
    with pytest.raises(ValueError, match=f"{lp.ENV}.*'cutlass'"):
        lp.mode()
    with pytest.raises(ValueError, match=r"set_lora_path\(path\)"):
        lp.set_lora_path("fast")


def test_disk_cache_round_trip(monkeypatch, tmp_path):
    sc = lp.shape_class("fwd", 5000, 4096, 4096, [16], torch.bfloat16, torch.float32, False, False,
                        torch.device("cpu"))
    assert sc.m_bucket == 8192
    lp._save_disk(sc.text(), lp.Choice("cublas", "measured", {"triton": 1.5, "cublas": 1.25}))
    stored = lp.read_disk()
    assert stored == {sc.text(): lp.Choice("cublas", "disk", {"triton": 1.5, "cublas": 1.25})}
    assert any("cublas (disk: cublas 1.25 ms, triton 1.5 ms)" in line for line in lp.describe())
    monkeypatch.setattr(lp, "_versions", lambda: {"torch": "0.0", "triton": "0.0"})
    assert lp.read_disk() == {}  # measured with other versions: ignored
    monkeypatch.setenv(lp.CACHE_ENV, "0")
    assert lp.read_disk() == {}


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_each_path_on_gpu_matches_the_cpu_reference(path):
    """Never run yet (no GPU where this was written): both paths on CUDA in bf16 with dropout."""
    x, w, b, a, bb = _make((64,), 256, 192, [16], torch.bfloat16, adapter_dtype=torch.float32)
    seeds = torch.tensor([77])
    y_ref, *ref_leaves = _oracle(x, w, b, a, bb, [0.5], [0.1], seeds)
    y_t, *_ = _torch_same_dtype(x, w, b, a, bb, [0.5], [0.1], seeds)
    cuda = [t.cuda() for t in (x, w, b, *a, *bb)]
    with lp.use_lora_path(path):
        y, *_ = _run_op(cuda[0], cuda[1], cuda[2], [cuda[3]], [cuda[4]], [0.5], [0.1], seeds.cuda(), "triton")
    assert_close_to_oracle(y.cpu(), y_ref, y_t, "y")


@pytest.mark.gpu
def test_first_use_on_gpu_measures_both_paths_with_cuda_events():
    """Never run yet (no GPU where this was written): the default timer measures, caches and writes the file."""
    x, w, b, a, bb = _make((512,), 1024, 768, [16], torch.bfloat16)
    x, w, b, a, bb = x.cuda(), w.cuda(), b.cuda(), [a[0].cuda()], [bb[0].cuda()]
    with launch.set_autotune(True):
        y = oplora.lora_linear(x.requires_grad_(), w, b, a, bb, [0.5], [0.0], backend="triton")
        y.sum().backward()
    made = dict(lp.choices())
    assert {key.split()[0] for key in made} == {"fwd", "dx"}
    for key, choice in made.items():
        assert choice.how == "measured" and set(choice.times_ms) == set(PATHS), key
        assert all(t > 0 for t in choice.times_ms.values())
        assert choice.path == min(choice.times_ms, key=choice.times_ms.get)
    assert set(lp.read_disk()) == set(made)


def test_a_path_that_fails_while_timed_leaves_the_other(ran):
    def timer(path, fn):
        if path == "triton":
            raise RuntimeError("out of resources (simulated)")
        fn()
        return 5.0

    lp.set_timer(timer)
    with launch.set_autotune(True), pytest.warns(UserWarning, match="'triton' path failed"):
        _layer()()
    assert ran["fwd:cublas"] == 2 and ran["fwd:triton"] == 0
    (_, choice), = lp.choices()
    assert choice.path == "cublas" and choice.times_ms == {"cublas": 5.0}

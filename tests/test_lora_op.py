"""The fused LoRA op against an fp64 oracle: Triton (interpreter) and reference backends."""

import pytest
import torch

from tests.tolerances import assert_close_to_oracle
from tunefast.ops import lora as oplora
from tunefast.reference import dropout as rd

BACKENDS = ["triton", "reference"]


def _make(lead, k, n, ranks, dtype, adapter_dtype=None, bias=True, conv1d=False):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, k, dtype=dtype)
    w_store = torch.randn(k, n, dtype=dtype) if conv1d else torch.randn(n, k, dtype=dtype)
    w = w_store.t() if conv1d else w_store  # Conv1D: (in, out) storage, passed as a transposed view
    b = torch.randn(n, dtype=dtype) if bias else None
    a = [torch.randn(r, k, dtype=adapter_dtype) / k**0.5 for r in ranks]
    bb = [torch.randn(n, r, dtype=adapter_dtype) / r**0.5 for r in ranks]
    return x, w, b, a, bb


def _oracle(x, w, b, a, bb, scalings, ps, seeds):
    """fp64 autograd of the definition, masks from the pure-torch reference generator."""
    x64 = x.detach().double().requires_grad_()
    a64 = [t.detach().double().requires_grad_() for t in a]
    b64 = [t.detach().double().requires_grad_() for t in bb]
    x2d = x64.reshape(-1, x.shape[-1])
    y = x2d @ w.double().t() + (b.double() if b is not None else 0)
    for i, (ai, bi, s, p) in enumerate(zip(a64, b64, scalings, ps)):
        xd = rd.dropout(x2d, int(seeds[i]) if seeds is not None else 0, p)
        y = y + s * (xd @ ai.t()) @ bi.t()
    return y.reshape(*x.shape[:-1], w.shape[0]), x64, a64, b64


def _torch_same_dtype(x, w, b, a, bb, scalings, ps, seeds):
    """What PyTorch itself gets in x's dtype (PEFT's op sequence), for the low-precision error bound."""
    x = x.detach().requires_grad_()
    a = [t.detach().requires_grad_() for t in a]
    bb = [t.detach().requires_grad_() for t in bb]
    x2d = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(x2d, w, b)
    for i, (ai, bi, s, p) in enumerate(zip(a, bb, scalings, ps)):
        xd = rd.dropout(x2d.to(ai.dtype), int(seeds[i]) if seeds is not None else 0, p)
        y = (y + (xd @ ai.t()) @ bi.t() * s).to(x.dtype)
    return y.reshape(*x.shape[:-1], w.shape[0]), x, a, bb


def _run_op(x, w, b, a, bb, scalings, ps, seeds, backend):
    x = x.detach().requires_grad_()
    a = [t.detach().requires_grad_() for t in a]
    bb = [t.detach().requires_grad_() for t in bb]
    y, _ = oplora._lora_linear_fwd(x, w, b, a, bb, scalings, ps, seeds, None, backend)
    return y, x, a, bb


def _grads(y, g, x, a, bb):
    y.backward(g.to(y.dtype))
    return [x.grad, *[t.grad for t in a], *[t.grad for t in bb]]


CASES = [
    # lead, K, N, ranks, p, bias, conv1d
    pytest.param((37,), 97, 65, [8], 0.0, True, False, id="odd-2d"),
    pytest.param((2, 3), 48, 80, [1], 0.0, False, False, id="3d-rank1-nobias"),
    pytest.param((5, 7), 40, 33, [16], 0.3, True, False, id="dropout"),
    pytest.param((29,), 64, 24, [4, 12], 0.2, True, False, id="two-adapters-dropout"),
    pytest.param((19,), 50, 70, [8], 0.0, True, True, id="conv1d-layout"),
    pytest.param((3,), 33, 17, [256], 0.1, True, False, id="rank256"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n,ranks,p,bias,conv1d", CASES)
def test_forward_backward_against_oracle(backend, dtype, lead, k, n, ranks, p, bias, conv1d):
    if backend == "reference" and dtype == torch.float16 and not torch.backends.mkldnn.is_available():
        pytest.skip("no fp16 CPU matmul")
    x, w, b, a, bb = _make(lead, k, n, ranks, dtype, bias=bias, conv1d=conv1d)
    scalings = [2.0 / r for r in ranks]
    ps = [p] * len(ranks)
    seeds = torch.tensor([123456789 + 7 * i for i in range(len(ranks))]) if p > 0 else None

    y, *leaves = _run_op(x, w, b, a, bb, scalings, ps, seeds, backend)
    y_ref, *ref_leaves = _oracle(x, w, b, a, bb, scalings, ps, seeds)
    y_t, *t_leaves = _torch_same_dtype(x, w, b, a, bb, scalings, ps, seeds)
    g = torch.randn(y.shape).to(y.dtype).double()  # representable in y.dtype: every path sees the same dy
    grads, grads_ref, grads_t = _grads(y, g, *leaves), _grads(y_ref, g, *ref_leaves), _grads(y_t, g, *t_leaves)

    assert y.dtype == dtype
    assert_close_to_oracle(y, y_ref, y_t, "y")
    names = ["dx"] + [f"dA{i}" for i in range(len(ranks))] + [f"dB{i}" for i in range(len(ranks))]
    for name, got, want, tgot in zip(names, grads, grads_ref, grads_t):
        assert got.dtype == tgot.dtype
        assert_close_to_oracle(got, want, tgot, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_bf16_base_fp32_adapters(backend):
    """PEFT's default: bf16 base, fp32 adapters (autocast_adapter_dtype). Output bf16, grads fp32."""
    x, w, b, a, bb = _make((2, 9), 40, 24, [8], torch.bfloat16, adapter_dtype=torch.float32)
    y, *leaves = _run_op(x, w, b, a, bb, [0.5], [0.0], None, backend)
    y_ref, *ref_leaves = _oracle(x, w, b, a, bb, [0.5], [0.0], None)
    y_t, *t_leaves = _torch_same_dtype(x, w, b, a, bb, [0.5], [0.0], None)
    g = torch.randn(y.shape).to(y.dtype).double()  # representable in y.dtype: every path sees the same dy
    grads, grads_ref, grads_t = _grads(y, g, *leaves), _grads(y_ref, g, *ref_leaves), _grads(y_t, g, *t_leaves)
    assert y.dtype == torch.bfloat16
    assert_close_to_oracle(y, y_ref, y_t, "y")
    assert grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    for got, want, tgot in zip(grads, grads_ref, grads_t):
        assert_close_to_oracle(got, want, tgot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_dropout_and_public_seeding(backend):
    """The public entry draws seeds from torch's generator: same manual_seed, same mask, any backend."""
    x, w, b, a, bb = _make((4, 6), 32, 16, [8], torch.float32)
    outs = []
    for bk in ("reference", backend):
        torch.manual_seed(42)
        outs.append(oplora.lora_linear(x, w, b, a, bb, [1.0], [0.5], backend=bk))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.manual_seed(43)
    other = oplora.lora_linear(x, w, b, a, bb, [1.0], [0.5], backend=backend)
    assert not torch.allclose(other, outs[1]), "a new seed must draw a new mask"
    ev = oplora.lora_linear(x, w, b, a, bb, [1.0], [0.5], training=False, backend=backend)
    nodrop = oplora.lora_linear(x, w, b, a, bb, [1.0], [0.0], backend=backend)
    torch.testing.assert_close(ev, nodrop)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(backend, p):
    """xa = drop(x) A^T with x = 1 and A = I returns the scaled mask itself: its keep rate is 1 - p."""
    m, k = 64, 32
    x = torch.ones(m, k)
    eye = torch.eye(k)
    seeds = torch.tensor([987654321])
    _, (xa,) = oplora._lora_linear_fwd(x, torch.zeros(4, k), None, [eye], [torch.zeros(4, k)], [1.0], [p], seeds, None, backend)
    kept = (xa != 0).double().mean().item()
    sigma = (p * (1 - p) / (m * k)) ** 0.5
    assert abs(kept - (1 - p)) < 4 * sigma
    torch.testing.assert_close(xa[xa != 0], torch.full_like(xa[xa != 0], 1 / (1 - p)))


def test_split_k_reduction_matches():
    """dA/dB reductions over tokens split across programs (as on a GPU) give the unsplit result."""
    from tunefast.kernels import lora as kl

    a = torch.randn(300, 8)
    x = torch.randn(300, 40)
    seed = torch.tensor([5])
    whole = kl.dropout_matmul(a.t(), x, torch.float32, 2.0, seed, rd.keep_threshold(0.25), drop="b", split_k=1)
    split = kl.dropout_matmul(a.t(), x, torch.float32, 2.0, seed, rd.keep_threshold(0.25), drop="b", split_k=3)
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-5)
    ref = 2.0 * (a.t() @ (x * rd.keep_mask(5, 300, 40, 0.25)))  # the kernel's scale, mask unscaled
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_no_dropped_copy_or_mask(backend):
    """With dropout, backward keeps x (once), the (M, r) products and the seeds: no drop(x), no mask."""
    x, w, b, a, bb = _make((8, 16), 64, 48, [8], torch.float32)
    x.requires_grad_()
    a = [t.requires_grad_() for t in a]
    bb = [t.requires_grad_() for t in bb]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = oplora.lora_linear(x, w, b, a, bb, [1.0], [0.3], backend=backend)
    params = {w.data_ptr(), *[t.data_ptr() for t in a + bb]}
    acts = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in params}
    shapes = sorted(tuple(t.shape) for t in acts.values())
    assert shapes == sorted([(8, 16, 64), (128, 8), (1,)]), shapes
    assert not any(t.dtype == torch.bool for t in saved)
    y.sum().backward()
    assert w.grad is None


def test_frozen_base_never_gets_gradient_and_trainable_base_is_refused():
    x, w, b, a, bb = _make((4,), 8, 8, [2], torch.float32)
    w.requires_grad_()
    with pytest.raises(ValueError, match="weight requires grad"):
        oplora.lora_linear(x, w, b, a, bb, [1.0])


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda kw: kw.update(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x has dtype"),
        (lambda kw: kw.update(x=torch.randn(4, 8, device="meta")), ValueError, "meta tensor"),
        (lambda kw: kw.update(x=torch.randn(4, 9)), ValueError, "features"),
        (lambda kw: kw.update(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
        (lambda kw: kw.update(weight=torch.randn(8, 8, dtype=torch.bfloat16)), TypeError, "weight dtype"),
        (lambda kw: kw.update(lora_a=[torch.randn(2, 7)]), ValueError, "adapter 0"),
        (lambda kw: kw.update(scalings=[1.0, 2.0]), ValueError, "scalings has 2"),
        (lambda kw: kw.update(dropout_p=[1.5]), ValueError, r"dropout_p\[0\]"),
        (lambda kw: kw.update(backend="cuda-magic"), ValueError, "backend must be one of"),
        (lambda kw: kw.update(lora_b=[torch.randn(8, 2, device="meta")]), ValueError, "meta tensor"),
    ],
)
def test_bad_input_gets_clear_error(mutate, exc, match):
    kw = dict(x=torch.randn(4, 8), weight=torch.randn(8, 8), bias=None, lora_a=[torch.randn(2, 8)],
              lora_b=[torch.randn(8, 2)], scalings=[1.0], dropout_p=[0.0])
    mutate(kw)
    with pytest.raises(exc, match=match):
        oplora.lora_linear(**kw)


def test_triton_backend_unavailable_is_clear(monkeypatch):
    from tunefast import backend as bk

    monkeypatch.setattr(bk, "interpreter_on", lambda: False)
    x, w, b, a, bb = _make((4,), 8, 8, [2], torch.float32)
    with pytest.raises(bk.BackendUnavailableError, match="TRITON_INTERPRET"):
        oplora.lora_linear(x, w, b, a, bb, [1.0], backend="triton")


def test_opcheck():
    x, w, b, a, bb = _make((3, 5), 16, 12, [4], torch.float32)
    x.requires_grad_()
    a[0].requires_grad_()
    bb[0].requires_grad_()
    torch.library.opcheck(
        oplora._lora_linear_fwd, (x, w, b, a, bb, [0.5], [0.2], torch.tensor([7]), None, "reference")
    )


def test_compile_fullgraph():
    x, w, b, a, bb = _make((3, 5), 16, 12, [4], torch.float32)
    a[0].requires_grad_()

    def f(x):
        return oplora.lora_linear(x, w, b, a, bb, [0.5], [0.0], backend="auto")

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert a[0].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,r", [(33, 47, 4), (64, 100, 256), (5, 16, 1)])
def test_lowrank_row_norm(backend, n, k, r):
    from tunefast.ops.dora import lowrank_row_norm

    w, a, b = torch.randn(n, k), torch.randn(r, k), torch.randn(n, r)
    want = torch.linalg.vector_norm(w.double() + 0.7 * b.double() @ a.double(), dim=1)
    got = lowrank_row_norm(w, a, b, 0.7, backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got_t = lowrank_row_norm(w.t().contiguous().t(), a, b, 0.7, backend)  # strided (Conv1D) view
    torch.testing.assert_close(got_t, got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_against_oracle(backend, dtype):
    """y = m / ||W + s B A||_row (detached) * (x W^T + s x A^T B^T) + b, PEFT DoRA's definition."""
    x, w, b, a, bb = _make((3, 7), 40, 24, [8], dtype)
    m = (torch.rand(24) + 0.5).to(dtype)
    s = 0.75

    def run(x, w, b, a, bb, m, oracle):
        x, a0, b0, m = (t.detach().clone().requires_grad_() for t in (x, a[0], bb[0], m))
        if oracle:
            x64, a64, b64, m64 = (t.double() for t in (x, a0, b0, m))
            norm = torch.linalg.vector_norm(w.double() + s * b64 @ a64, dim=1).detach()
            y = (m64 / norm) * (x64 @ w.double().t() + s * (x64 @ a64.t()) @ b64.t()) + b.double()
        else:
            y = oplora.lora_linear(x, w, b, [a0], [b0], [s], magnitude=m, backend=backend)
        return y, (x, a0, b0, m)

    y, leaves = run(x, w, b, a, bb, m, False)
    y_ref, ref_leaves = run(x, w, b, a, bb, m, True)
    g = torch.randn(y.shape).to(dtype).double()
    y.backward(g.to(y.dtype))
    y_ref.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    for got, want in zip(leaves, ref_leaves):
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.double() / scale, want.grad.double() / scale, **tol)


def test_dora_bad_input():
    x, w, b, a, bb = _make((4,), 8, 8, [2, 2], torch.float32)
    with pytest.raises(ValueError, match="exactly one adapter"):
        oplora.lora_linear(x, w, b, a, bb, [1.0, 1.0], magnitude=torch.ones(8))
    with pytest.raises(ValueError, match="magnitude has 3"):
        oplora.lora_linear(x, w, b, a[:1], bb[:1], [1.0], magnitude=torch.ones(3))
    with pytest.raises(ValueError, match="dropout > 0"):
        oplora.lora_linear(x, w, b, a[:1], bb[:1], [1.0], [0.1], magnitude=torch.ones(8))

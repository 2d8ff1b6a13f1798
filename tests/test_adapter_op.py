"""The fused adapter op against an fp64 oracle: Triton (interpreter) and reference backends."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close_to_oracle
from tunefast.ops import adapter as opad
from tunefast.reference import dropout as rd

BACKENDS = ["triton", "reference"]
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda t: t}


def _make(lead, k, n, r, dtype, base=True, biases=True):
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return dict(
        x=rnd(*lead, k), base=rnd(*lead, n) if base else None,
        down_w=(rnd(r, k) / k**0.5).to(dtype), down_b=rnd(r) if biases else None,
        up_w=(rnd(n, r) / r**0.5).to(dtype), up_b=rnd(n) if biases else None,
    )


def _leaves(t, dtype=None):
    return {k: (v.detach().to(dtype or v.dtype).requires_grad_() if v is not None else None) for k, v in t.items()}


def _straightforward(t, scale, act, p, seed):
    """The definition in plain autograd, masks from the pure-torch reference generator."""
    x2d = t["x"].reshape(-1, t["x"].shape[-1])
    xd = rd.dropout(x2d, seed, p) if p > 0 else x2d
    pre = xd @ t["down_w"].t() + (t["down_b"] if t["down_b"] is not None else 0)
    h = ACT[act](pre.float()).to(pre.dtype) if t["x"].dtype != torch.float64 else ACT[act](pre)
    y = (h @ t["up_w"].t() + (t["up_b"] if t["up_b"] is not None else 0)) * scale
    y = y.reshape(*t["x"].shape[:-1], -1)
    return y + t["base"] if t["base"] is not None else y


def _run(t, scale, act, p, seed, backend):
    seed_t = torch.tensor([seed], dtype=torch.int64) if p > 0 else None
    y, _ = opad._adapter_fwd(t["x"], t["base"], t["down_w"], t["down_b"], t["up_w"], t["up_b"], scale, act, p,
                             seed_t, backend)
    return y


def _check(out, tensors, oracle, oracle_t, same, same_t, g):
    assert_close_to_oracle(out, oracle, same, "y")
    for v in (out, oracle, same):
        v.backward(g.to(v.dtype))
    for name, v in tensors.items():
        if v is not None:
            assert_close_to_oracle(v.grad, oracle_t[name].grad, same_t[name].grad, f"d{name}")


CASES = [
    # lead, K, N, r, act, p, base, biases
    pytest.param((37,), 97, 65, 8, "relu", 0.0, True, True, id="odd-relu"),
    pytest.param((2, 3), 48, 48, 1, "gelu", 0.0, True, False, id="3d-rank1-gelu-nobias"),
    pytest.param((5, 7), 40, 33, 16, "silu", 0.3, True, True, id="silu-dropout"),
    pytest.param((29,), 64, 24, 12, "gelu", 0.2, False, True, id="no-base-dropout"),
    pytest.param((19,), 50, 70, 64, "identity", 0.0, True, True, id="identity-r64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n,r,act,p,base,biases", CASES)
def test_forward_backward_against_oracle(backend, dtype, lead, k, n, r, act, p, base, biases):
    t = _make(lead, k, n, r, dtype, base, biases)
    seed, scale = 1234, 0.7
    mine, oracle_t, same_t = _leaves(t), _leaves(t, torch.float64), _leaves(t)
    out = _run(mine, scale, act, p, seed, backend)
    oracle = _straightforward(oracle_t, scale, act, p, seed)
    same = _straightforward(same_t, scale, act, p, seed)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    _check(out, mine, oracle, oracle_t, same, same_t, g)


def test_public_entry_houlsby_shares_x_and_base_and_dropout_follows_torch_rng():
    """A Houlsby adapter passes h as x and base: dh gets both the branch's and the residual's gradient."""
    t = _make((4, 5), 32, 32, 8, torch.float32)
    h = t["x"].requires_grad_()
    params = [t[k].requires_grad_() for k in ("down_w", "down_b", "up_w", "up_b")]
    y = opad.adapter(h, h, *params, scale=2.0, activation="silu")
    ref = _straightforward(dict(t, base=h), 2.0, "silu", 0.0, 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    (gy,) = torch.autograd.grad(y.sum(), h)
    (gr,) = torch.autograd.grad(ref.sum(), h)
    torch.testing.assert_close(gy, gr, rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)
    a = opad.adapter(h, h, *params, dropout_p=0.5)
    torch.manual_seed(4)
    b = opad.adapter(h, h, *params, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.allclose(a, opad.adapter(h, h, *params, dropout_p=0.5, training=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_are_x_and_pre_only(backend):
    """Bytes kept for backward: x once (also as base) and pre (M, r); never act(pre) or a mask."""
    t = _make((64,), 48, 48, 8, torch.float32)
    h = t["x"].requires_grad_()
    params = [t[k].requires_grad_() for k in ("down_w", "down_b", "up_w", "up_b")]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        opad.adapter(h, h, *params, dropout_p=0.3, activation="gelu", backend=backend)
    activations = [v for v in saved if v.dim() == 2 and v.shape[0] == 64]
    assert sorted(tuple(v.shape) for v in activations) == [(64, 8), (64, 48)]
    assert any(v.data_ptr() == h.data_ptr() for v in activations)


def test_opcheck():
    t = _make((6,), 16, 12, 4, torch.float32)
    for k in ("x", "down_w", "down_b", "up_w", "up_b"):
        t[k].requires_grad_()
    seed = torch.tensor([7], dtype=torch.int64)
    torch.library.opcheck(torch.ops.tunefast.adapter_fwd.default,
                          (t["x"], t["base"], t["down_w"], t["down_b"], t["up_w"], t["up_b"], 0.5, "gelu", 0.1,
                           seed, "reference"))


def test_compile_fullgraph():
    t = _make((3, 5), 16, 16, 4, torch.float32)
    params = [t[k].requires_grad_() for k in ("down_w", "down_b", "up_w", "up_b")]
    fn = lambda x: opad.adapter(x, x, *params, activation="relu", backend="reference")  # noqa: E731
    eager = fn(t["x"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(t["x"])
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert params[0].grad is not None


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(down_w=torch.randn(4, 7)), ValueError, r"x has 8 features but down_w"),
        (dict(up_w=torch.randn(8, 3)), ValueError, "up_w is"),
        (dict(up_b=torch.randn(5)), ValueError, "up_b has shape"),
        (dict(base=torch.randn(3, 8, dtype=torch.float64)), TypeError, "base has dtype"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(3, 8), base=torch.randn(3, 8), down_w=torch.randn(4, 8), down_b=None,
                up_w=torch.randn(8, 4), up_b=None)
    args.update({k: v for k, v in kwargs.items() if k in args})
    opts = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(exc, match=match):
        opad.adapter(*args.values(), **opts)

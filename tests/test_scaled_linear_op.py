"""The input-scaled linear op ((IA)3 on feed-forward layers) against an fp64 oracle and PEFT's own
expression, its saved tensors, zero entries of l, opcheck and torch.compile."""

import pytest
import torch

from tests import tolerances as tol
from tests.tolerances import assert_close_to_oracle
from tunefast.ops import scaled_linear as ops

BACKENDS = ["triton", "reference"]


def _make(lead, k, n, dtype, scale_dtype=None, bias=True, seed=5):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=rnd(*lead, k).to(dtype), weight=(rnd(n, k) / k**0.5).to(dtype),
                bias=rnd(n).to(dtype) if bias else None, scale=(1.0 + 0.3 * rnd(k)).to(scale_dtype or dtype))


def _peft_expression(x, weight, bias, scale):
    """PEFT's ia3.Linear feed-forward branch, written out: x.to(l) * l, back to x's dtype, then linear."""
    return torch.nn.functional.linear((x.to(scale.dtype) * scale).to(x.dtype), weight, bias)


def _leaves(t, dtype=None):
    out = {k: (v.detach().to(dtype or v.dtype) if v is not None else None) for k, v in t.items()}
    for k in ("x", "scale", "bias"):
        if out[k] is not None:
            out[k].requires_grad_()
    return out


CASES = [
    pytest.param((37,), 97, 65, True, id="odd-2d"),
    pytest.param((2, 5), 48, 33, False, id="3d-nobias"),
    pytest.param((3, 1, 7), 16, 128, True, id="4d"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
                         ids=["fp32", "fp16", "bf16", "bf16-fp32l", "fp16-fp32l"])
@pytest.mark.parametrize("lead,k,n,bias", CASES)
def test_forward_backward_against_oracle(backend, dtype, scale_dtype, lead, k, n, bias):
    t = _make(lead, k, n, dtype, scale_dtype, bias)
    mine, oracle_t, same_t = _leaves(t), _leaves(t, torch.float64), _leaves(t)
    out = ops.scaled_linear(**mine, backend=backend)
    oracle = _peft_expression(**oracle_t)
    same = _peft_expression(**same_t)
    assert out.dtype == dtype and out.shape == (*lead, n)
    assert_close_to_oracle(out, oracle, same, "y")
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    for v in (out, oracle, same):
        v.backward(gy.to(v.dtype))
    for name in ("x", "scale", "bias"):
        if mine[name] is None:
            continue
        assert mine[name].grad.dtype == mine[name].dtype
        if name == "scale" and scale_dtype is not None:
            # an fp32 dl made of bf16/fp16 products (x and dy W are in x's dtype, as in PEFT): x's dtype rule
            _assert_low_precision(mine[name].grad, oracle_t[name].grad, same_t[name].grad, dtype, "dl")
        else:
            assert_close_to_oracle(mine[name].grad, oracle_t[name].grad, same_t[name].grad, f"d{name}")


def _assert_low_precision(out, oracle, torch_same, dtype, name):
    err, torch_err = tol.max_err(out, oracle), tol.max_err(torch_same, oracle)
    bound = tol.LOW_PRECISION_FACTOR * torch_err + tol.LOW_PRECISION_FLOOR[dtype] * oracle.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} > {tol.LOW_PRECISION_FACTOR} x torch's {torch_err:.3g} (+floor)"


def test_equals_peft_expression_bit_for_bit_in_fp32():
    """The reference runs PEFT's operations in PEFT's order: fp32 results are identical, not just close."""
    t = _make((4, 9), 40, 24, torch.float32)
    mine, peft_t = _leaves(t), _leaves(t)
    y, want = ops.scaled_linear(**mine, backend="reference"), _peft_expression(**peft_t)
    assert torch.equal(y, want)
    y.sum().backward(), want.sum().backward()
    for name in ("x", "scale", "bias"):
        assert torch.equal(mine[name].grad, peft_t[name].grad), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_entries_of_l_have_finite_gradients(backend):
    """dl = sum_t x * (dy W): no division by l (the column-scale rule divides, and is NaN at l = 0)."""
    t = _make((11,), 8, 6, torch.float32)
    t["scale"][[0, 5]] = 0.0
    mine, oracle_t = _leaves(t), _leaves(t, torch.float64)
    ops.scaled_linear(**mine, backend=backend).pow(2).sum().backward()
    _peft_expression(**oracle_t).pow(2).sum().backward()
    assert torch.isfinite(mine["scale"].grad).all()
    assert mine["scale"].grad[0] != 0  # the gradient at l = 0 is not zeroed either
    assert_close_to_oracle(mine["scale"].grad, oracle_t["scale"].grad, name="dl")
    assert_close_to_oracle(mine["x"].grad, oracle_t["x"].grad, name="dx")


def test_transposed_weight_storage_conv1d():
    """A GPT-2 Conv1D stores W as (K, N): the op takes the (N, K) transposed view without a copy."""
    t = _make((13,), 24, 40, torch.float32)
    stored = t["weight"].t().contiguous()  # (K, N) as Conv1D keeps it
    mine, want_t = _leaves(t), _leaves(t)
    y = ops.scaled_linear(mine["x"], stored.t(), mine["bias"], mine["scale"])
    torch.testing.assert_close(y, _peft_expression(**want_t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_saved_tensors_are_x_once(scale_dtype):
    """Bytes kept: x as it came (never x * l, never x cast to l's dtype); nothing of x when l is frozen."""
    t = _make((64,), 48, 32, torch.bfloat16, scale_dtype)
    x = t["x"].requires_grad_()
    for scale_grad in (True, False):
        scale = t["scale"].detach().requires_grad_(scale_grad)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
            ops.scaled_linear(x, t["weight"], t["bias"], scale)
        acts = [v for v in saved if v.dim() == 2 and v.shape[0] == 64]
        assert [(v.data_ptr(), v.dtype) for v in acts] == ([(x.data_ptr(), torch.bfloat16)] if scale_grad else [])


def test_frozen_scale_and_input_without_grad():
    t = _make((5,), 8, 4, torch.float32)
    w = t["weight"]
    x = t["x"].requires_grad_()
    ops.scaled_linear(x, w, None, t["scale"]).sum().backward()
    torch.testing.assert_close(x.grad, (torch.ones(5, 4) @ w) * t["scale"])
    scale = t["scale"].clone().requires_grad_()
    ops.scaled_linear(t["x"].detach(), w, None, scale).sum().backward()
    torch.testing.assert_close(scale.grad, ((torch.ones(5, 4) @ w) * t["x"].detach()).sum(0))


def test_opcheck():
    t = _make((6,), 16, 12, torch.float32)
    for k in ("x", "scale", "bias"):
        t[k].requires_grad_()
    torch.library.opcheck(torch.ops.tunefast.scaled_linear_fwd.default,
                          (t["x"], t["weight"], t["bias"], t["scale"], "reference"))


def test_compile_fullgraph():
    t = _make((3, 5), 16, 8, torch.float32)
    scale = t["scale"].requires_grad_()
    fn = lambda x: ops.scaled_linear(x, t["weight"], t["bias"], scale)  # noqa: E731
    eager = fn(t["x"])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(t["x"])
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert scale.grad is not None


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(scale=torch.ones(7)), ValueError, "scale has 7 entries, expected in_features=8"),
        (dict(scale=torch.ones(1, 8)), ValueError, "scale must be 1-D"),
        (dict(weight=torch.randn(4, 7)), ValueError, "x has 8 features but weight expects 7"),
        (dict(weight=torch.randn(4, 8).requires_grad_()), ValueError, "weight requires grad"),
        (dict(bias=torch.ones(4, dtype=torch.bfloat16)), TypeError, "bias dtype"),
        (dict(scale=torch.ones(8, dtype=torch.float64)), TypeError, "scale has dtype"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(x=torch.randn(3, 8), weight=torch.randn(4, 8), bias=None, scale=torch.ones(8))
    args.update({k: v for k, v in kwargs.items() if k in args})
    opts = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(exc, match=match):
        ops.scaled_linear(*args.values(), **opts)


@pytest.mark.parametrize("act,vec", [(torch.float16, torch.float16), (torch.float32, torch.float32),
                                     (torch.bfloat16, torch.float32)])
def test_dl_partials_have_a_row_for_every_token_block_of_every_choosable_config(act, vec):
    """The backward writes one fp32 row of partial dl per BLOCK_M tokens: the buffer must hold the rows of
    the smallest BLOCK_M any config on any arch may pick (fp32 launches autotune 32-row tiles too)."""
    from tunefast.kernels import launch
    from tunefast.kernels import scaled_linear as ks

    m, k, n = 200, 256, 192
    x, w, scale = torch.empty(m, k, dtype=act), torch.empty(n, k, dtype=act), torch.empty(k, dtype=vec)
    for arch in launch.ARCHES.values():
        with launch.capture(arch) as launches:
            ks.scaled_linear_bwd(torch.empty(m, n, dtype=act), w, x, scale, True, True)
        (c,) = launches
        rows = c.args[5].shape[0]  # the partial dl buffer
        for cfg in c.choosable + [c.fixed]:
            assert rows >= -(-m // cfg.kwargs["BLOCK_M"]), (arch, cfg)

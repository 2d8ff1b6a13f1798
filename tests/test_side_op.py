"""The side-tuning ops against fp64 oracles: the ladder merge (Triton through the interpreter, and the
reference) and the chunked LM-head loss; what they keep for backward; opcheck; torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close_to_oracle
from tunefast.ops import side as ops
from tunefast.profiling import SavedTensors

BACKENDS = ["triton", "reference"]
T = 0.1  # gate temperature: g = sigmoid(alpha / T)


def _make(lead, d, n, dtype, *, side=True, bias=True, norm="rmsnorm", h_dtype=None):
    h = torch.randn(*lead, d, dtype=h_dtype or dtype)
    params = dict(
        weight=torch.randn(n, d, dtype=dtype) / d**0.5,
        bias=torch.randn(n, dtype=dtype) if bias else None,
        side=torch.randn(*lead, n, dtype=dtype) if side else None,
        alpha=torch.tensor(0.03) if side else None,  # g = sigmoid(0.3) ~ 0.57
        norm_weight=1 + 0.2 * torch.randn(n, dtype=dtype),
        norm_bias=0.1 * torch.randn(n, dtype=dtype) if norm == "layernorm" else None,
    )
    return h, params


def _leaves(params, cast=None):
    """Fresh grad-requiring copies (cast to ``cast`` except alpha); absent ones stay None."""
    out = {}
    for k, v in params.items():
        if v is None:
            out[k] = None
            continue
        v = v.detach()
        if cast is not None and k != "alpha":
            v = v.to(cast)
        out[k] = v.clone().requires_grad_()
    return out


def _definition(h, p, norm, eps=1e-6):
    """Plain autograd math in the leaves' dtype (fp64 for the oracle, low precision for 'torch')."""
    z = F.linear(h.to(p["weight"].dtype), p["weight"], p["bias"])
    if p["side"] is not None:
        g = torch.sigmoid(p["alpha"] / T).to(z.dtype)
        z = g * z + (1 - g) * p["side"]
    n = z.shape[-1]
    if norm == "rmsnorm":
        return F.rms_norm(z, (n,), p["norm_weight"], eps)
    return F.layer_norm(z, (n,), p["norm_weight"], p["norm_bias"], eps)


def _run_op(h, p, norm, backend):
    g = torch.sigmoid(p["alpha"] / T) if p["side"] is not None else None
    return ops.ladder_merge(h, p["weight"], p["bias"], p["side"], g, p["norm_weight"], p["norm_bias"],
                            norm=norm, backend=backend)


def _grads(y, dy, p):
    names = [k for k, v in p.items() if v is not None]
    grads = torch.autograd.grad(y, [p[k] for k in names], dy.to(y.dtype))
    return dict(zip(names, grads))


MERGE_CASES = [
    # lead, D, N, side, bias, norm
    pytest.param((37,), 97, 13, True, True, "rmsnorm", id="odd-rms"),
    pytest.param((2, 19), 80, 24, True, False, "layernorm", id="3d-layernorm-nobias"),
    pytest.param((21,), 48, 40, False, True, "layernorm", id="first-rung"),
    pytest.param((3, 11), 130, 5, True, True, "rmsnorm", id="narrow-side"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,d,n,side,bias,norm", MERGE_CASES)
def test_ladder_merge_against_oracle(backend, dtype, lead, d, n, side, bias, norm):
    h, params = _make(lead, d, n, dtype, side=side, bias=bias, norm=norm)
    mine, oracle, same = _leaves(params), _leaves(params, torch.float64), _leaves(params)
    y = _run_op(h, mine, norm, backend)
    y64 = _definition(h.double(), oracle, norm)
    yt = _definition(h, same, norm)
    dy = torch.randn(y.shape).to(dtype).double()  # representable in dtype: every path sees the same dy
    assert y.dtype == dtype
    assert_close_to_oracle(y, y64, yt, "y")
    got, want, tgot = _grads(y, dy, mine), _grads(y64, dy, oracle), _grads(yt, dy, same)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].dtype == tgot[name].dtype, name
        assert_close_to_oracle(got[name], want[name], tgot[name], f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_bf16_backbone_fp32_side(backend):
    """A bf16 backbone with an fp32 side network: the product is formed in fp32, outputs are fp32."""
    h, params = _make((2, 9), 72, 16, torch.float32, h_dtype=torch.bfloat16)
    mine, oracle = _leaves(params), _leaves(params, torch.float64)
    y = _run_op(h, mine, "rmsnorm", backend)
    y64 = _definition(h.double(), oracle, "rmsnorm")
    dy = torch.randn(y.shape).double()
    assert y.dtype == torch.float32
    assert_close_to_oracle(y, y64, name="y")
    got, want = _grads(y, dy, mine), _grads(y64, dy, oracle)
    for name in got:
        assert_close_to_oracle(got[name], want[name], name=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_only_h_and_the_side_state(backend):
    """Nothing of p, z or the norm statistics is kept: h (the backbone's own tensor) and side only."""
    h, params = _make((4, 33), 64, 16, torch.float32)
    p = _leaves(params)
    g = torch.sigmoid(p["alpha"] / T).detach()  # a constant gate: only the op's own saves are counted
    with SavedTensors(exclude=[p["weight"], p["bias"], p["norm_weight"]]) as rec:
        y = ops.ladder_merge(h, p["weight"], p["bias"], p["side"], g, p["norm_weight"], backend=backend)
    kept = {t.untyped_storage().data_ptr() for t in rec.tensors}
    assert h.untyped_storage().data_ptr() in kept
    assert rec.bytes == h.nbytes + p["side"].nbytes + 4, [tuple(t.shape) for t in rec.tensors]  # + the (1,) gate
    y.sum().backward()
    assert h.grad is None and all(v.grad is not None for k, v in p.items() if v is not None and k != "alpha")


def test_partial_sums_do_not_depend_on_the_row_tile():
    """Backward column sums land in fixed 16-row slices that every BLOCK_M writes in full (the buffer is
    torch.empty: a slice left unwritten would show up as garbage)."""
    from tunefast.kernels import side as ks

    h, params = _make((75,), 40, 24, torch.float32)
    args = (h, params["weight"], params["bias"], params["side"], torch.tensor([0.4]), params["norm_weight"])
    dy = torch.randn(75, 24)
    results = []
    for block_m in (16, 32, 64):
        ks._INTERPRET_META["BLOCK_M"], saved = block_m, ks._INTERPRET_META["BLOCK_M"]
        try:
            results.append(ks.ladder_merge_backward(dy, *args, 1e-6, True, True, True))
        finally:
            ks._INTERPRET_META["BLOCK_M"] = saved
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_wide_side_network_runs_on_reference_or_says_why():
    h, params = _make((3,), 16, 1100, torch.float32, side=False)
    y = ops.ladder_merge(h, params["weight"], params["bias"], None, None, params["norm_weight"], backend="auto")
    assert y.shape == (3, 1100)
    with pytest.raises(ValueError, match="side width 1100"):
        ops.ladder_merge(h, params["weight"], params["bias"], None, None, params["norm_weight"], backend="triton")


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda kw: kw.update(h=torch.randn(5, 9)), ValueError, "h has 9 features"),
        (lambda kw: kw.update(h=torch.randn(5, 8, dtype=torch.float64)), TypeError, "h has dtype"),
        (lambda kw: kw.update(h=torch.randn(5, 8, requires_grad=True)), ValueError, "h requires grad"),
        (lambda kw: kw.update(side=torch.randn(4, 4)), ValueError, "side has shape"),
        (lambda kw: kw.update(side=torch.randn(5, 4, dtype=torch.bfloat16)), TypeError, "side dtype"),
        (lambda kw: kw.update(bias=torch.randn(3)), ValueError, "bias has shape"),
        (lambda kw: kw.update(norm_bias=torch.randn(4)), ValueError, "norm_bias must be None"),
        (lambda kw: kw.update(gate=torch.ones(2)), ValueError, "gate must hold one value"),
        (lambda kw: kw.update(gate="0.5"), TypeError, "gate must be a float"),
        (lambda kw: kw.update(norm="batchnorm"), ValueError, "norm must be one of"),
        (lambda kw: kw.update(backend="cuda-magic"), ValueError, "backend must be one of"),
        (lambda kw: kw.update(eps=0.0), ValueError, "eps must be > 0"),
    ],
)
def test_bad_merge_input_gets_clear_error(mutate, exc, match):
    kw = dict(h=torch.randn(5, 8), weight=torch.randn(4, 8), bias=torch.randn(4), side=torch.randn(5, 4), gate=0.5,
              norm_weight=torch.ones(4), norm_bias=None, eps=1e-6, norm="rmsnorm", backend="reference")
    mutate(kw)
    with pytest.raises(exc, match=match):
        ops.ladder_merge(**kw)


# ----------------------------------------------------------------------------------------------------
# LM-head loss
# ----------------------------------------------------------------------------------------------------


def _lm_inputs(m=23, n=8, d=24, v=50, dtype=torch.float32, lm_dtype=None, lm_bias=False):
    lm_dtype = lm_dtype or dtype
    s = torch.randn(m, n, dtype=dtype, requires_grad=True)
    up_w = (torch.randn(d, n, dtype=dtype) / n**0.5).requires_grad_()
    up_b = (0.1 * torch.randn(d, dtype=dtype)).requires_grad_()
    h_last = torch.randn(m, d, dtype=lm_dtype)
    lm_w = torch.randn(v, d, dtype=lm_dtype) / d**0.5
    lm_b = torch.randn(v, dtype=lm_dtype) if lm_bias else None
    targets = torch.randint(0, v, (m,))
    targets[::4] = -100
    return s, up_w, up_b, h_last, lm_w, lm_b, targets


def _unfused_loss(s, up_w, up_b, h_last, lm_w, lm_b, targets):
    """The module chain the side model runs unfused: up, residual, frozen LM head, fp32 cross-entropy."""
    x = h_last + F.linear(s, up_w, up_b)
    logits = F.linear(x.to(lm_w.dtype), lm_w, lm_b).float()
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("backend,chunk_rows", [("reference", 1), ("reference", 5), ("reference", None),
                                                ("triton", None)])
@pytest.mark.parametrize("lm_bias", [False, True])
def test_lm_loss_against_fp64_cross_entropy(backend, chunk_rows, lm_bias):
    inputs = _lm_inputs(lm_bias=lm_bias)
    s, up_w, up_b = inputs[:3]
    loss = ops.side_lm_loss(*inputs, chunk_rows=chunk_rows, backend=backend)
    got = torch.autograd.grad(loss, [s, up_w, up_b])
    leaves64 = [t.detach().double().requires_grad_() for t in (s, up_w, up_b)]
    rest64 = [t.double() if t is not None else None for t in inputs[3:6]]
    loss64 = _unfused_loss(*leaves64, *rest64, inputs[6])
    want = torch.autograd.grad(loss64, leaves64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_oracle(loss, loss64, name="loss")
    for name, a, b in zip(("ds", "dup_weight", "dup_bias"), got, want):
        assert_close_to_oracle(a, b, name=name)


def test_lm_loss_bf16_head_fp32_side_matches_unfused_chain():
    inputs = _lm_inputs(lm_dtype=torch.bfloat16)
    s, up_w, up_b = inputs[:3]
    loss = ops.side_lm_loss(*inputs, chunk_rows=7, backend="reference")  # bf16 logits, as the unfused chain
    got = torch.autograd.grad(loss, [s, up_w, up_b])
    ref_loss = _unfused_loss(*inputs)
    want = torch.autograd.grad(ref_loss, [s, up_w, up_b])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lm_loss_keeps_no_logits_and_no_hidden_state():
    inputs = _lm_inputs(m=64, n=8, d=32, v=300)
    s, up_w, up_b = inputs[:3]
    with SavedTensors(exclude=[up_w, up_b]) as rec:
        loss = ops.side_lm_loss(*inputs)
    shapes = sorted(tuple(t.shape) for t in rec.tensors)
    assert shapes == sorted([(64, 8), (32, 8), (32,)]), shapes  # ds, d up_weight, d up_bias: the gradients
    (loss * 0.5).backward()  # backward scales what the forward formed
    ref = _unfused_loss(*inputs)
    want = torch.autograd.grad(0.5 * ref, [s, up_w, up_b])
    for a, b in zip((s.grad, up_w.grad, up_b.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(3, torch.randn(23, 25)), "shapes do not fit"),
        (lambda a: a.__setitem__(6, torch.zeros(23, dtype=torch.int32)), "targets must be an int64"),
        (lambda a: a.__setitem__(4, a[4].clone().requires_grad_()), "must not require grad"),
        (lambda a: a.__setitem__(2, torch.randn(7)), "up_bias has shape"),
    ],
)
def test_bad_lm_loss_input_gets_clear_error(mutate, match):
    args = list(_lm_inputs())
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ops.side_lm_loss(*args)


# ----------------------------------------------------------------------------------------------------
# torch.library checks and torch.compile
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_ladder_merge(backend):
    h, params = _make((3, 5), 16, 8, torch.float32, norm="layernorm")
    p = _leaves(params)
    gate = torch.tensor([0.6], requires_grad=True)
    torch.library.opcheck(
        ops._ladder_merge_fwd,
        (h, p["weight"], p["bias"], p["side"], gate, p["norm_weight"], p["norm_bias"], 1e-6, False, backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_lm_loss(backend):
    inputs = _lm_inputs(m=9, n=4, d=8, v=11, lm_bias=True)
    torch.library.opcheck(ops._side_lm_loss, (*inputs, 4, [True, True], backend))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compile_fullgraph(backend):
    h, params = _make((3, 5), 16, 8, torch.float32)
    p = _leaves(params)
    lm = _lm_inputs(m=15, n=8, d=16, v=20)

    def f(h, side):
        g = torch.sigmoid(p["alpha"] / T)
        y = ops.ladder_merge(h, p["weight"], p["bias"], side, g, p["norm_weight"], backend=backend)
        return ops.side_lm_loss(y.reshape(-1, 8), lm[1], lm[2], h.reshape(-1, 16), lm[4], None, lm[6])

    eager = f(h, p["side"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(h, p["side"])
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert p["weight"].grad is not None and p["side"].grad is not None and p["alpha"].grad is not None


# ----------------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these with TRITON_INTERPRET=0): compiled kernels, autotuned
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,h_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("lead,d,n,norm", [((4, 1023), 2048, 256, "rmsnorm"), ((3, 77), 4096, 1000, "layernorm")])
def test_ladder_merge_on_gpu(dtype, h_dtype, lead, d, n, norm):
    h, params = _make(lead, d, n, dtype, norm=norm, h_dtype=h_dtype)
    h = h.cuda()
    params = {k: v.cuda() if v is not None else None for k, v in params.items()}
    mine, oracle = _leaves(params), _leaves(params, torch.float64)
    same = _leaves(params, torch.float32 if h_dtype != dtype else None)
    y = _run_op(h, mine, norm, "triton")
    y64 = _definition(h.double(), oracle, norm)
    yt = _definition(h, same, norm)
    dy = torch.randn(y.shape, device="cuda").to(dtype).double()
    got, want, tgot = _grads(y, dy, mine), _grads(y64, dy, oracle), _grads(yt, dy, same)
    check = (lambda a, b, t, name: assert_close_to_oracle(a, b, name=name)) if dtype == torch.float32 else (
        lambda a, b, t, name: assert_close_to_oracle(a, b, t, name))
    check(y, y64, yt, "y")
    for name in got:
        check(got[name], want[name], tgot[name], f"d{name}")

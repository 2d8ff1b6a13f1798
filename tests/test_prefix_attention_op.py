"""The prefix attention op against an fp64 oracle: Triton (interpreter) and reference backends.

Shapes stay small: under the interpreter a 1x2x128x64 forward costs ~0.1 s.
"""

import pytest
import torch

from tests.tolerances import assert_close_to_oracle
from tunefast.ops import prefix_attention as opa
from tunefast.reference import prefix_attention as ref

BACKENDS = ["triton", "reference"]


def _make(b, hq, hkv, t, s, p, d, dtype, pad, device="cpu"):
    kw = dict(device=device)
    q = torch.randn(b, t, hq, d, **kw).transpose(1, 2).to(dtype)  # transformers' layout: a strided view
    k, v = torch.randn(b, hkv, s, d, **kw).to(dtype), torch.randn(b, hkv, s, d, **kw).to(dtype)
    pk, pv = torch.randn(hkv, p, d, **kw).to(dtype), torch.randn(hkv, p, d, **kw).to(dtype)
    mask = None
    if pad:
        mask = torch.ones(b, s, dtype=torch.bool, device=device)
        mask[0, -min(s, 3):] = False
        if b > 1:
            mask[-1, : s // 2] = False  # left padding on the last row
    return [q, k, v, pk, pv], mask


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _grads(out, g, leaves):
    out.backward(g.to(out.dtype))
    return [x.grad for x in leaves]


CASES = [
    # b, hq, hkv, t, s, p, d, causal, pad
    pytest.param(2, 4, 2, 37, 37, 5, 16, True, True, id="gqa-causal-pad-odd"),
    pytest.param(2, 2, 2, 33, 45, 7, 80, False, True, id="bidirectional-d80-s>t"),
    pytest.param(1, 3, 1, 1, 17, 3, 32, True, False, id="mqa-decode-t1"),
    pytest.param(2, 2, 1, 20, 29, 0, 32, True, True, id="p0-plain-flash"),
    pytest.param(1, 2, 2, 40, 30, 11, 96, True, False, id="t>s-d96"),
    pytest.param(1, 2, 1, 70, 70, 40, 64, True, True, id="multi-block-prefix"),
]
LOW_PRECISION = ["gqa-causal-pad-odd", "bidirectional-d80-s>t", "multi-block-prefix"]


def _cases(dtypes):
    for case in CASES:
        for dtype in dtypes:
            if dtype == torch.float32 or case.id in LOW_PRECISION:
                yield pytest.param(*case.values, dtype, id=f"{case.id}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,hq,hkv,t,s,p,d,causal,pad,dtype", list(_cases([torch.float32, torch.float16, torch.bfloat16])))
def test_forward_backward_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, dtype):
    _check_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, dtype, "cpu")


GPU_CASES = [
    # b, hq, hkv, t, s, p, d, causal, pad: tile boundaries of the 64 x 64 GPU default config
    pytest.param(2, 8, 2, 300, 300, 33, 128, True, True, id="gqa-causal-d128"),
    pytest.param(1, 4, 4, 257, 513, 64, 80, False, True, id="bidirectional-d80"),
    pytest.param(2, 4, 1, 1, 700, 256, 96, True, False, id="decode-p256-d96"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,hq,hkv,t,s,p,d,causal,pad", GPU_CASES)
def test_cuda_kernel_against_oracle(monkeypatch, b, hq, hkv, t, s, p, d, causal, pad, dtype):
    monkeypatch.setenv("TUNEFAST_AUTOTUNE", "0")  # one config: no autotuning compiles in the test budget
    _check_against_oracle("triton", b, hq, hkv, t, s, p, d, causal, pad, dtype, "cuda")


WINDOW_CASES = [
    # b, hq, hkv, t, s, p, d, causal, pad, window, window_counts_prefix
    pytest.param(2, 4, 2, 37, 37, 5, 16, True, True, (7, 0), True, id="sliding-counts-prefix"),
    pytest.param(2, 4, 2, 37, 37, 5, 16, True, True, (7, 0), False, id="sliding-prefix-always"),
    pytest.param(1, 2, 1, 70, 70, 40, 32, True, False, (20, 0), True, id="window-skips-blocks"),
    pytest.param(2, 2, 2, 33, 45, 7, 32, False, True, (3, 5), True, id="bidirectional-window-s>t"),
    pytest.param(1, 3, 1, 1, 17, 3, 32, True, False, (6, 0), True, id="decode-t1"),
    pytest.param(1, 2, 2, 40, 30, 11, 16, True, False, (12, 0), True, id="t>s"),
    pytest.param(1, 2, 1, 20, 20, 4, 16, False, False, (-1, 2), True, id="right-only"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,hq,hkv,t,s,p,d,causal,pad,window,counts", WINDOW_CASES)
def test_local_window_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, window, counts):
    _check_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, torch.float32, "cpu", window, counts)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_window_low_precision(dtype):
    _check_against_oracle("triton", 2, 4, 2, 37, 37, 5, 16, True, True, dtype, "cpu", (7, 0), True)


def test_window_semantics_by_hand():
    """Which keys a query sees, spelled out for one small case (P = 2, T = S = 4, window (2, 0))."""
    from tunefast.reference.prefix_attention import prefix_visible, visible

    seq = visible(4, 4, True, None, "cpu", (2, 0))[0, 0, 0].int().tolist()
    assert seq == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
    # the prefix sits at positions -2, -1: query 0 (position 0) sees both, query 1 only the last one
    pre = prefix_visible(4, 4, 2, True, "cpu", (2, 0), True)[0, 0, 0].int().tolist()
    assert pre == [[1, 1], [0, 1], [0, 0], [0, 0]]
    assert prefix_visible(4, 4, 2, True, "cpu", (2, 0), False) is None


BIAS_CASES = [
    # b, hq, hkv, t, s, p, d, causal, pad, window
    pytest.param(2, 4, 2, 37, 37, 5, 16, True, True, (-1, -1), id="causal-pad"),
    pytest.param(2, 2, 2, 33, 45, 7, 32, False, True, (-1, -1), id="bidirectional-s>t"),
    pytest.param(1, 2, 1, 70, 70, 40, 32, True, False, (20, 0), id="window-multi-block"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,hq,hkv,t,s,p,d,causal,pad,window", BIAS_CASES)
def test_bias_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, window):
    _check_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, torch.float32, "cpu", window, True, bias=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_low_precision(dtype):
    _check_against_oracle("triton", 2, 4, 2, 37, 37, 5, 16, True, True, dtype, "cpu", bias=True)


def test_bias_changes_the_output_and_gets_no_gradient():
    tensors, _ = _make(1, 2, 2, 6, 6, 3, 16, torch.float32, False)
    bias = torch.randn(2, 6, 9, requires_grad=True)  # a leaf: allowed, gets no gradient
    plain = opa.prefix_attention(*tensors, causal=True, backend="triton")
    out = opa.prefix_attention(*tensors, causal=True, bias=bias, backend="triton")
    assert not torch.allclose(out, plain, atol=1e-3)
    with pytest.raises(NotImplementedError, match="bias needs a gradient"):
        opa.prefix_attention(*tensors, causal=True, bias=bias * 2, backend="triton")
    with pytest.raises(ValueError, match=r"bias must be \(Hq, T, P \+ S\) = \(2, 6, 9\)"):
        opa.prefix_attention(*tensors, causal=True, bias=torch.randn(1, 2, 6, 9), backend="triton")


def _check_against_oracle(backend, b, hq, hkv, t, s, p, d, causal, pad, dtype, device, window=(-1, -1), counts=True,
                          bias=False):
    tensors, mask = _make(b, hq, hkv, t, s, p, d, dtype, pad, device)
    bias = torch.randn(hq, t, p + s, device=device).to(dtype) if bias else None  # representable in dtype
    leaves = _leaves(tensors)
    out = opa.prefix_attention(*leaves, causal=causal, key_padding_mask=mask, window=window,
                               window_counts_prefix=counts, bias=bias, backend=backend)
    oracle_leaves = _leaves(tensors, torch.float64)
    oracle, oracle_lse = ref.forward(*oracle_leaves, causal, mask, None, window, counts,
                                     None if bias is None else bias.double())
    torch_leaves = _leaves(tensors)  # PyTorch's own computation in this dtype: concatenation + eager softmax
    # rows that see no key (padding inside a window): eager softmax averages the masked values there, the
    # kernel and the oracle give 0; zero them in PyTorch's result and give them no dy, so they do not
    # loosen the low-precision bound
    seen = torch.isfinite(oracle_lse)[..., None]
    torch_out = ref.concat_attention(*torch_leaves, causal, mask, window=window, window_counts_prefix=counts,
                                     bias=bias) * seen
    g = torch.randn(out.shape, device=device).to(dtype).double() * seen  # representable in dtype: same dy everywhere

    assert out.dtype == dtype and out.shape == (b, hq, t, d)
    assert out.transpose(1, 2).is_contiguous()  # the attention interface's (B, T, H, D) for free
    assert_close_to_oracle(out, oracle, torch_out, "o")
    grads = _grads(out, g, leaves)
    want = ref.backward(g, *oracle_leaves, oracle, oracle_lse, causal, mask, None, window, counts,
                        None if bias is None else bias.double())
    torch_grads = _grads(torch_out, g, torch_leaves)
    for name, got, w, tg, x in zip(["dq", "dk", "dv", "dpk", "dpv"], grads, want, torch_grads, leaves):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        if w.numel():  # P = 0: empty prefix gradients
            assert_close_to_oracle(got, w, tg, name)


@pytest.mark.parametrize("window,counts", [((-1, -1), True), ((3, 0), True), ((3, 0), False), ((2, 4), True)])
def test_oracle_matches_autograd_of_the_concatenation(window, counts):
    """The reference backward (the oracle of every gradient above) against autograd, in fp64.

    Rows that see no key (padding inside a window) follow different conventions (the reference: 0; eager
    softmax: the mean of the masked values), so they are compared out: zero output there, zero dy."""
    tensors, mask = _make(2, 4, 2, 9, 12, 4, 8, torch.float64, True)
    w = dict(window=window, window_counts_prefix=counts)
    for causal in (True, False):
        leaves = _leaves(tensors)
        o, lse = ref.forward(*leaves, causal, mask, **w)
        seen = torch.isfinite(lse)[..., None]
        concat = ref.concat_attention(*leaves, causal, mask, **w)
        torch.testing.assert_close(o, concat * seen, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(o) * seen
        auto = torch.autograd.grad(ref.concat_attention(*leaves, causal, mask, **w), leaves, g)
        for a, r in zip(auto, ref.backward(g, *leaves, o, lse, causal, mask, **w)):
            torch.testing.assert_close(r, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_give_zero_and_no_nan(backend):
    """P = 0 and a fully padded batch row: output 0, gradients 0, nothing NaN (see the reference)."""
    tensors, mask = _make(2, 2, 1, 6, 6, 0, 16, torch.float32, False)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    leaves = _leaves(tensors)
    out = opa.prefix_attention(*leaves, causal=True, key_padding_mask=mask, backend=backend)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    out.sum().backward()
    q, k, v, _, _ = leaves
    assert torch.isfinite(q.grad).all() and q.grad[1].abs().max() == 0
    assert k.grad[1].abs().max() == 0 and v.grad[1].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_changes_the_output_and_p0_is_plain_attention(backend):
    tensors, mask = _make(2, 2, 2, 8, 8, 4, 16, torch.float32, True)
    q, k, v, pk, pv = tensors
    with_prefix = opa.prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend=backend)
    empty = pk[:, :0]
    plain = opa.prefix_attention(q, k, v, empty, empty, causal=True, key_padding_mask=mask, backend=backend)
    assert not torch.allclose(with_prefix, plain, atol=1e-3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :] & torch.ones(8, 8, dtype=torch.bool).tril()
    )
    torch.testing.assert_close(plain, sdpa, rtol=1e-5, atol=1e-5)


def test_prefix_gradient_is_deterministic_and_integer_masks_work():
    tensors, mask = _make(3, 2, 1, 10, 10, 6, 16, torch.float32, True)
    runs = []
    for m in (mask, mask.to(torch.int64)):
        leaves = _leaves(tensors)
        opa.prefix_attention(*leaves, causal=True, key_padding_mask=m, backend="triton").sum().backward()
        runs.append([x.grad for x in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_scale_is_used():
    tensors, _ = _make(1, 2, 2, 5, 5, 2, 16, torch.float64, False)
    out = opa.prefix_attention(*[t.float() for t in tensors], causal=False, scale=0.37, backend="triton")
    want, _ = ref.forward(*tensors, False, None, 0.37)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def _kw(**over):
    kw = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16),
              prefix_k=torch.randn(2, 3, 16), prefix_v=torch.randn(2, 3, 16), causal=True)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(prefix_k=torch.randn(4, 3, 16), prefix_v=torch.randn(4, 3, 16)), ValueError, "prefix has 4 heads but k/v have 2"),
        (dict(prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 3, 8)), ValueError, "prefix head dim is 8"),
        (dict(prefix_v=torch.randn(2, 4, 16)), ValueError, "prefix_k .* and prefix_v .* same shape"),
        (dict(prefix_k=torch.randn(2, 3, 16, dtype=torch.bfloat16)), TypeError, "prefix_k dtype torch.bfloat16 differs"),
        (dict(q=torch.randn(2, 4, 5, 16, dtype=torch.float64)), TypeError, "q has dtype torch.float64"),
        (dict(q=torch.randn(2, 3, 5, 16)), ValueError, "not a multiple"),
        (dict(k=torch.randn(2, 2, 6, 16)), ValueError, "same shape"),
        (dict(k=torch.randn(3, 2, 7, 16), v=torch.randn(3, 2, 7, 16)), ValueError, "do not fit q"),
        (dict(prefix_k=torch.randn(2, 3, 16, device="meta")), ValueError, "meta tensor"),
        (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"must be \(B, S\) = \(2, 7\)"),
        (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "additive float masks"),
        (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")), ValueError, "meta"),
        (dict(q=torch.randn(2, 4, 16)), ValueError, "q must be 4-D"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
        (dict(window=(4,)), ValueError, r"window must be None or \(left, right\)"),
        (dict(window=(-2, 0)), ValueError, "two ints >= -1"),
        (dict(window_counts_prefix=None), TypeError, "window_counts_prefix must be a bool"),
    ],
)
def test_bad_input_gets_clear_error(over, exc, match):
    with pytest.raises(exc, match=match):
        opa.prefix_attention(**_kw(**over))


@pytest.mark.gpu
def test_mismatched_devices_get_clear_error():
    with pytest.raises(ValueError, match="prefix_k is on cpu but q is on cuda"):
        opa.prefix_attention(**_kw(q=torch.randn(2, 4, 5, 16, device="cuda"), k=torch.randn(2, 2, 7, 16, device="cuda"),
                                   v=torch.randn(2, 2, 7, 16, device="cuda"), prefix_v=torch.randn(2, 3, 16, device="cuda")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    tensors, mask = _make(2, 4, 2, 5, 6, 3, 16, torch.float32, True)
    leaves = _leaves(tensors)
    bias = torch.randn(4, 5, 3 + 6)
    torch.library.opcheck(opa._prefix_attention_fwd, (*leaves, mask, True, 0.25, -1, -1, True, None, 0.0, 0, backend))
    torch.library.opcheck(opa._prefix_attention_fwd, (*leaves, None, False, 0.25, -1, -1, True, None, 0.0, 0, backend))
    torch.library.opcheck(opa._prefix_attention_fwd, (*leaves, mask, True, 0.25, 2, 0, True, bias, 0.1, 7, backend))


def test_compile_fullgraph():
    tensors, mask = _make(2, 4, 2, 6, 6, 3, 16, torch.float32, True)
    q, k, v, pk, pv = _leaves(tensors)

    def f(q):
        return opa.prefix_attention(q, k, v, pk, pv, causal=True, key_padding_mask=mask, backend="auto")

    eager = f(q)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert pk.grad is not None and pv.grad is not None


# ---- attention dropout (counter-based mask, regenerated in the backward) ----------------------------


def _dropped_attention(q, k, v, pk, pv, causal, mask, p, seed):
    """Plain autograd attention over [prefix | sequence] with the reference's dropout factor."""
    b, hq, t, d = q.shape
    hkv, s, n = k.shape[1], k.shape[2], pk.shape[1]
    g = hq // hkv
    kk = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2).repeat_interleave(g, dim=1)
    vv = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2).repeat_interleave(g, dim=1)
    scores = q @ kk.transpose(-1, -2) / d**0.5
    allowed = torch.ones(b, 1, t, n + s, dtype=torch.bool)
    if causal:
        allowed[..., n:] &= torch.ones(t, s, dtype=torch.bool).tril(s - t)
    if mask is not None:
        allowed[..., n:] &= mask[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    factor = ref.drop_factor((b, hkv, g, t, n + s), p, seed, probs.dtype, probs.device).reshape(b, hq, t, n + s)
    return (probs * factor) @ vv


def test_dropout_reference_matches_autograd():
    tensors, mask = _make(2, 4, 2, 9, 12, 4, 8, torch.float64, True)
    mask[:, 0] = True  # every row sees a key: softmax over -inf-only rows is NaN in the autograd version
    leaves = _leaves(tensors)
    o, lse = ref.forward(*leaves, True, mask, None, dropout_p=0.3, seed=11)
    want = _dropped_attention(*leaves, True, mask, 0.3, 11)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(o)
    auto = torch.autograd.grad(want, leaves, g)
    for a, r in zip(auto, ref.backward(g, *leaves, o, lse, True, mask, None, dropout_p=0.3, seed=11)):
        torch.testing.assert_close(r, a, rtol=1e-10, atol=1e-12)
    undropped, _ = ref.forward(*leaves, True, mask, None)
    assert not torch.allclose(o, undropped, atol=1e-3)


@pytest.mark.parametrize("b,hq,hkv,t,s,p,d,causal,window", [
    pytest.param(2, 4, 2, 37, 37, 5, 16, True, None, id="gqa-causal"),
    pytest.param(1, 2, 1, 70, 70, 40, 32, True, (20, 0), id="window-multi-block"),
    pytest.param(2, 2, 2, 33, 45, 7, 32, False, None, id="bidirectional-s>t"),
])
def test_dropout_kernel_regenerates_the_reference_mask(b, hq, hkv, t, s, p, d, causal, window):
    """Forward and backward of the kernel against the reference with the same seed: the same mask."""
    tensors, mask = _make(b, hq, hkv, t, s, p, d, torch.float32, True)
    g = torch.randn(b, hq, t, d)
    runs = []
    for backend in BACKENDS:
        leaves = _leaves(tensors)
        out = opa.prefix_attention(*leaves, causal=causal, key_padding_mask=mask, window=window, dropout_p=0.25,
                                   seed=1234, backend=backend)
        out.backward(g)
        runs.append([out.detach()] + [x.grad for x in leaves])
    for name, got, want in zip(["o", "dq", "dk", "dv", "dpk", "dpv"], *runs):
        scale = max(want.abs().max().item(), 1e-6)
        assert (got - want).abs().max().item() <= 1e-5 * scale, name


def test_dropout_statistics_and_seeds():
    """With every value 1 each output row is sum_j P_ij keep_ij / (1 - p): 1 in expectation, not per row."""
    tensors, _ = _make(1, 2, 2, 64, 64, 8, 16, torch.float32, False)
    q, k, v, pk, pv = tensors
    v, pv = torch.ones_like(v), torch.ones_like(pv)
    p = 0.2
    out = opa.prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p, seed=5, backend="triton")[..., 0]
    assert abs(out.mean().item() - 1.0) < 0.05, out.mean()
    assert out.std().item() > 0.05  # rows differ: something was dropped
    factor = ref.drop_factor((4, 8, 16, 64, 72), p, 5, torch.float32, "cpu")
    assert abs((factor == 0).float().mean().item() - p) < 0.01
    again = opa.prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p, seed=5, backend="triton")[..., 0]
    other = opa.prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p, seed=6, backend="triton")[..., 0]
    assert torch.equal(out, again) and not torch.equal(out, other)
    plain = opa.prefix_attention(q, k, v, pk, pv, causal=True, backend="triton")
    zero = opa.prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=0.0, seed=5, backend="triton")
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("kw,match", [(dict(dropout_p=1.0), "dropout_p must be a number in"),
                                      (dict(dropout_p=0.1, seed=-1), "seed must be None or a non-negative int")])
def test_dropout_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        opa.prefix_attention(**_kw(**kw))

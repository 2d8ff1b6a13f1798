"""The LoRA-on-embedding op against PEFT's expression (F.embedding of A^T, then B^T) in fp64: repeated
ids, padding_idx, scale_grad_by_freq, both backends, its saved tensors, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import assert_close_to_oracle
from tunefast.ops import lora_embedding as ope

BACKENDS = ["triton", "reference"]


def _make(vocab, n, r, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(weight=torch.randn(vocab, n, generator=g).to(dtype), lora_a=torch.randn(r, vocab, generator=g).to(dtype),
                lora_b=(torch.randn(n, r, generator=g) / r**0.5).to(dtype))


def _peft_expression(ids, weight, lora_a, lora_b, scaling, padding_idx=None, scale_grad_by_freq=False):
    """PEFT's lora.Embedding forward: base(x) + (embed(x, A^T) @ B^T) * s."""
    after_a = F.embedding(ids, lora_a.t(), padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    return F.embedding(ids, weight, padding_idx=padding_idx) + (after_a @ lora_b.t()) * scaling


def _leaves(t, dtype=None):
    out = {k: v.detach().to(dtype or v.dtype) for k, v in t.items()}
    out["lora_a"].requires_grad_(), out["lora_b"].requires_grad_()
    return out


def _ids(shape, vocab, pad=None, seed=4):
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    ids.view(-1)[:4] = 3  # the same id four times: its A^T row sums four tokens' gradients
    if pad is not None:
        ids.view(-1)[4:7] = pad % vocab
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,vocab,n,r,pad,freq", [
    pytest.param((2, 9), 50, 24, 4, None, False, id="plain"),
    pytest.param((37,), 97, 65, 8, 0, False, id="padding0"),
    pytest.param((3, 2, 5), 40, 16, 1, -1, False, id="padding-neg-rank1"),
    pytest.param((2, 11), 30, 33, 16, 5, True, id="freq-padding"),
])
def test_forward_backward_against_peft_in_fp64(backend, dtype, shape, vocab, n, r, pad, freq):
    t = _make(vocab, n, r, dtype)
    ids = _ids(shape, vocab, pad)
    mine, oracle_t, same_t = _leaves(t), _leaves(t, torch.float64), _leaves(t)
    out = ope.lora_embedding(ids, **mine, scaling=0.75, padding_idx=pad, scale_grad_by_freq=freq, backend=backend)
    oracle = _peft_expression(ids, **oracle_t, scaling=0.75, padding_idx=pad, scale_grad_by_freq=freq)
    same = _peft_expression(ids, **same_t, scaling=0.75, padding_idx=pad, scale_grad_by_freq=freq)
    assert out.shape == (*shape, n) and out.dtype == dtype
    assert_close_to_oracle(out, oracle, same, "y")
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    for v in (out, oracle, same):
        v.backward(gy.to(v.dtype))
    for name in ("lora_a", "lora_b"):
        assert_close_to_oracle(mine[name].grad, oracle_t[name].grad, same_t[name].grad, f"d{name}")
    if pad is not None:
        assert not mine["lora_a"].grad[:, pad % vocab].any()  # padding row: no gradient
    assert mine["lora_a"].grad[:, 3].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_tensors_are_the_ids_only(backend):
    """PEFT keeps A^T[ids] (M, r) for B's gradient; the op regathers it and keeps the ids alone."""
    t = _leaves(_make(64, 32, 8, torch.float32))
    ids = _ids((48,), 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        y = ope.lora_embedding(ids, **t, scaling=2.0, backend=backend)
    params = {t["lora_a"].data_ptr(), t["lora_b"].data_ptr()}
    kept = [v for v in saved if v.data_ptr() not in params]
    assert [v.data_ptr() for v in kept] == [ids.data_ptr()]
    y.sum().backward()
    assert t["lora_a"].grad.shape == (8, 64)


def test_frozen_b_or_a():
    t = _make(20, 8, 4, torch.float32)
    ids = _ids((10,), 20)
    a, b = t["lora_a"].clone().requires_grad_(), t["lora_b"]
    ope.lora_embedding(ids, t["weight"], a, b, 1.0).sum().backward()
    want = t["lora_a"].clone().requires_grad_()
    _peft_expression(ids, t["weight"], want, b, 1.0).sum().backward()
    torch.testing.assert_close(a.grad, want.grad)


def test_opcheck():
    t = _leaves(_make(16, 12, 4, torch.float32))
    torch.library.opcheck(torch.ops.tunefast.lora_embedding_fwd.default,
                          (_ids((2, 6), 16), t["weight"], t["lora_a"], t["lora_b"], 0.5, 2, False, "reference"))


def test_compile_fullgraph():
    t = _leaves(_make(16, 12, 4, torch.float32))
    fn = lambda ids: ope.lora_embedding(ids, **t, scaling=0.5, padding_idx=1)  # noqa: E731
    ids = _ids((3, 5), 16, 1)
    eager = fn(ids)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(ids)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert t["lora_a"].grad is not None and not t["lora_a"].grad[:, 1].any()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(ids=torch.zeros(3)), TypeError, "ids must be an int64 or int32 tensor"),
        (dict(lora_a=torch.randn(4, 9)), ValueError, r"do not fit a \(10, 8\) embedding table"),
        (dict(lora_b=torch.randn(8, 3)), ValueError, "do not fit"),
        (dict(lora_b=torch.randn(8, 4, dtype=torch.bfloat16)), TypeError, "lora_b dtype"),
        (dict(weight=torch.randn(10, 8).requires_grad_()), ValueError, "weight requires grad"),
        (dict(padding_idx=10), ValueError, "padding_idx must be in"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(ids=torch.tensor([1, 2, 3]), weight=torch.randn(10, 8), lora_a=torch.randn(4, 10),
                lora_b=torch.randn(8, 4))
    args.update({k: v for k, v in kwargs.items() if k in args})
    opts = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(exc, match=match):
        ope.lora_embedding(*args.values(), 1.0, **opts)

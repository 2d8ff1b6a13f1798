"""The fused LM-head loss op against an fp64 F.cross_entropy oracle on materialised logits.

Triton runs through the interpreter (tile 16 rows x 32 vocab x 16 hidden): V = 37 and H = 20 leave
partial tiles in both directions.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, assert_close_to_oracle, max_err
from tunefast.ops import linear_cross_entropy as ops
from tunefast.ops.linear_cross_entropy import linear_cross_entropy
from tunefast.profiling import SavedTensors

BACKENDS = ["triton", "reference"]
N, H, V = 13, 20, 37


def _inputs(n=N, h=H, v=V, bias=True, ignored=3):
    hidden = torch.randn(n, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) / h**0.25
    b = torch.randn(v, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,))
    if ignored:
        labels[::ignored] = -100
    return hidden, weight, b, labels


def _definition(hidden, weight, bias, labels, reduction="mean", softcap=None, logit_scale=1.0, label_smoothing=0.0,
                num_items_in_batch=None):
    """Materialised logits in the inputs' dtype, then fp32 (fp64 for the oracle) cross-entropy, as HF does."""
    z = F.linear(hidden, weight, bias)
    z = z.double() if z.dtype == torch.float64 else z.float()
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if num_items_in_batch is not None:
        return F.cross_entropy(z, labels, reduction="sum", label_smoothing=label_smoothing) / num_items_in_batch
    return F.cross_entropy(z, labels, reduction=reduction, label_smoothing=label_smoothing)


def _leaves(tensors, dtype, grad=(True, True, True)):
    return [t.detach().to(dtype).requires_grad_(g) if t is not None else None for t, g in zip(tensors, grad)]


def _loss_and_grads(fn, leaves, upstream):
    loss = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad((loss.double() * upstream).sum(), wanted) if wanted else []
    return loss, grads


def _assert_close(out, oracle, same, dtype, name):
    """tests/tolerances.py's rule keyed by the inputs' dtype (the loss is fp32 whatever the inputs)."""
    if dtype == torch.float32:
        return assert_close_to_oracle(out, oracle, name=name)
    assert out.shape == oracle.shape and torch.isfinite(out).all(), name
    scale = max(oracle.abs().max().item(), 1e-6)
    bound = LOW_PRECISION_FACTOR * max_err(same, oracle) + LOW_PRECISION_FLOOR[dtype] * scale
    assert max_err(out, oracle) <= bound, f"{name}: {dtype} error {max_err(out, oracle):.3g} > {bound:.3g}"


OPTIONS = [
    dict(),
    dict(softcap=3.0),
    dict(logit_scale=0.25),
    dict(label_smoothing=0.1),
    dict(softcap=2.0, logit_scale=0.5, label_smoothing=0.2),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "plain")
def test_against_fp64_oracle(backend, dtype, reduction, options):
    inputs = _inputs()
    hidden, weight, bias, labels = inputs
    upstream = torch.randn(N, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)

    def op(h, w, b):
        return linear_cross_entropy(h, w, labels, bias=b, reduction=reduction, backend=backend, chunk_rows=5, **options)

    def oracle(h, w, b):
        return _definition(h, w, b, labels, reduction, **options)

    rounded = [t.to(dtype).double() for t in inputs[:3]]  # the oracle sees the inputs the op sees
    loss, grads = _loss_and_grads(op, _leaves(inputs[:3], dtype), upstream)
    loss64, grads64 = _loss_and_grads(oracle, _leaves(rounded, torch.float64), upstream)
    same_loss, same_grads = _loss_and_grads(oracle, _leaves(inputs[:3], dtype), upstream)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    _assert_close(loss, loss64, same_loss, dtype, "loss")
    for name, g, g64, gs in zip(("dhidden", "dweight", "dbias"), grads, grads64, same_grads):
        assert g.dtype == dtype
        _assert_close(g, g64, gs, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_gives_only_dhidden_and_num_items_in_batch_divides_the_sum(backend):
    hidden, weight, bias, labels = _inputs(bias=False)
    h = hidden.float().requires_grad_()
    loss = linear_cross_entropy(h, weight.float(), labels, num_items_in_batch=torch.tensor(40), backend=backend)
    (dh,) = torch.autograd.grad(loss, h)
    h64 = hidden.clone().requires_grad_()
    want = _definition(h64, weight, None, labels, num_items_in_batch=40)
    assert_close_to_oracle(loss, want, name="loss")
    assert_close_to_oracle(dh, torch.autograd.grad(want, h64)[0], name="dhidden")
    assert not torch.allclose(loss.double(), _definition(hidden, weight, None, labels).float().double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty_batches_follow_cross_entropy(backend):
    hidden, weight, _, labels = _inputs(bias=False)
    h = hidden.float().requires_grad_()
    ignored = torch.full_like(labels, -100)
    mean = linear_cross_entropy(h, weight.float(), ignored, backend=backend)
    assert torch.isnan(mean) and torch.isnan(F.cross_entropy(hidden.float() @ weight.float().t(), ignored))
    total = linear_cross_entropy(h, weight.float(), ignored, reduction="sum", backend=backend)
    normalised = linear_cross_entropy(h, weight.float(), ignored, num_items_in_batch=8, backend=backend)
    assert total.item() == 0.0 and normalised.item() == 0.0  # HF's loss with num_items_in_batch: 0, not NaN
    (dh,) = torch.autograd.grad(normalised, h)
    assert torch.equal(dh, torch.zeros_like(dh))
    empty = torch.zeros(0, H, requires_grad=True)
    none = linear_cross_entropy(empty, weight.float(), labels[:0], reduction="none", backend=backend)
    assert none.shape == (0,)
    assert linear_cross_entropy(empty, weight.float(), labels[:0], reduction="sum", backend=backend).item() == 0.0
    assert torch.isnan(linear_cross_entropy(empty, weight.float(), labels[:0], backend=backend))


def test_ignore_index_other_than_default():
    hidden, weight, bias, labels = _inputs(ignored=0)
    labels[1::2] = 5  # a real class used as the ignore index
    got = linear_cross_entropy(hidden.float(), weight.float(), labels, bias=bias.float(), ignore_index=5)
    z = F.linear(hidden, weight, bias)
    assert_close_to_oracle(got, F.cross_entropy(z, labels, ignore_index=5), name="loss")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_keeps_no_logits_for_backward(reduction):
    n, h, v = 64, 16, 500
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h)  # frozen head, as under LoRA
    labels = torch.randint(0, v, (n,))
    with SavedTensors(exclude=[weight]) as rec:
        loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_rows=16)
    kept = sorted(tuple(t.shape) for t in rec.tensors if t.dim())  # 0-d: the mean's token count
    # mean: the (N, H) gradient formed in the forward; none: hidden, labels and the (N,) log-sum-exp
    assert kept == ([(n, h)] if reduction == "mean" else sorted([(n, h), (n,), (n,)])), kept
    assert all(t.numel() < n * v for t in rec.tensors)
    (loss.sum() * 0.5).backward()
    h64 = hidden.detach().double().requires_grad_()
    want = torch.autograd.grad(0.5 * _definition(h64, weight.double(), None, labels, reduction).sum(), h64)[0]
    assert_close_to_oracle(hidden.grad, want, name="dhidden")


def test_no_grad_forms_no_gradients():
    hidden, weight, bias, labels = _inputs()
    with SavedTensors() as rec, torch.no_grad():
        loss = linear_cross_entropy(hidden.float().requires_grad_(), weight.float(), labels, bias=bias.float())
    assert rec.tensors == [] and not loss.requires_grad


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(hidden=torch.randn(N, H + 1)), ValueError, "weight has shape"),
        (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "dtype"),
        (dict(labels=torch.zeros(N, dtype=torch.int32)), ValueError, "labels must be an int64"),
        (dict(labels=torch.full((N,), V)), ValueError, "labels must lie in"),
        (dict(bias=torch.randn(V + 1)), ValueError, "bias must have shape"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(reduction="sum", num_items_in_batch=3), ValueError, "num_items_in_batch"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_gets_clear_error(change, error, match):
    args = dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), labels=torch.randint(0, V, (N,)))
    args.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce_sum", [True, False])
def test_opcheck(backend, reduce_sum):
    hidden, weight, bias, labels = [t.float() if t.is_floating_point() else t for t in _inputs(n=5, h=8, v=11)]
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    torch.library.opcheck(
        ops._lce_fwd, (*leaves, labels, -100, 2.0, 1.0, 0.1, reduce_sum, [True, True, True], 2, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(backend, reduction):
    hidden, weight, _, labels = _inputs(bias=False)
    proj = torch.nn.Linear(H, H, dtype=torch.float64).float()

    def f(x):
        return linear_cross_entropy(proj(x), weight.float(), labels, reduction=reduction, softcap=5.0,
                                    backend=backend).sum()

    eager = f(hidden.float())
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden.float())
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# On a GPU (benchmarks/gpu_check.sh runs these with TRITON_INTERPRET=0): compiled kernels
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,h,v,options", [(1000, 896, 151_936, dict()), (257, 2048, 32_003, dict(softcap=30.0)),
                                           (64, 4096, 1000, dict(label_smoothing=0.1, logit_scale=0.5))])
def test_triton_on_gpu(dtype, n, h, v, options):
    hidden, weight, bias, labels = [t.cuda() for t in _inputs(n=n, h=h, v=v, ignored=5)]
    upstream = torch.tensor(1.0, dtype=torch.float64, device="cuda")

    def op(hh, w, b):
        return linear_cross_entropy(hh, w, labels, bias=b, backend="triton", **options)

    def oracle(hh, w, b):
        return _definition(hh, w, b, labels, **options)

    rounded = [t.to(dtype).double() for t in (hidden, weight, bias)]
    loss, grads = _loss_and_grads(op, _leaves((hidden, weight, bias), dtype), upstream)
    loss64, grads64 = _loss_and_grads(oracle, _leaves(rounded, torch.float64), upstream)
    same_loss, same_grads = _loss_and_grads(oracle, _leaves((hidden, weight, bias), dtype), upstream)
    _assert_close(loss, loss64, same_loss, dtype, "loss")
    for name, g, g64, gs in zip(("dhidden", "dweight", "dbias"), grads, grads64, same_grads):
        _assert_close(g, g64, gs, dtype, name)

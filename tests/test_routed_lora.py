"""Token-routed multi-adapter LoRA: against an fp64 per-adapter loop, both backends, and bad input."""

import pytest
import torch

from tunefast.ops import routed_lora as oprl

BACKENDS = ["triton", "reference"]


def _adapters(k, n_out, ranks, dtype=torch.float32):
    a = [(torch.randn(r, k) / k**0.5).to(dtype).requires_grad_() for r in ranks]
    b = [(torch.randn(n_out, r) / r**0.5).to(dtype).requires_grad_() for r in ranks]
    return a, b


def _loop_oracle(x, w, bias, a, b, scalings, ids):
    """Run each adapter on its own tokens separately (fp64): what the routed op must equal."""
    x64 = x.detach().double().requires_grad_()
    a64 = [t.detach().double().requires_grad_() for t in a]
    b64 = [t.detach().double().requires_grad_() for t in b]
    x2d = x64.reshape(-1, x.shape[-1])
    flat = ids.reshape(-1)
    rows = []
    for t in range(x2d.shape[0]):
        y = x2d[t] @ w.double().t() + bias.double()
        i = int(flat[t])
        if i >= 0:
            y = y + scalings[i] * (x2d[t] @ a64[i].t()) @ b64[i].t()
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], w.shape[0]), x64, a64, b64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per", ["token", "sequence"])
def test_routed_matches_per_adapter_loop(backend, per):
    k, n_out, ranks = 24, 20, [4, 8, 2]
    x = torch.randn(4, 5, k, requires_grad=True)
    w, bias = torch.randn(n_out, k), torch.randn(n_out)
    a, b = _adapters(k, n_out, ranks)
    ids = torch.randint(-1, 3, (4, 5)) if per == "token" else torch.tensor([2, -1, 0, 2])
    y = oprl.routed_lora_linear(x, w, bias, a, b, [0.5, 1.0, 2.0], ids, backend=backend)
    full_ids = ids if per == "token" else ids[:, None].expand(4, 5)
    y_ref, x64, a64, b64 = _loop_oracle(x, w, bias, a, b, [0.5, 1.0, 2.0], full_ids)
    g = torch.randn(y.shape)
    y.backward(g)
    y_ref.backward(g.double())
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in [(x, x64), *zip(a, a64), *zip(b, b64)]:
        want_grad = want.grad if want.grad is not None else torch.zeros_like(want)  # adapter with no tokens
        torch.testing.assert_close(got.grad.double(), want_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_adapter_gets_zero_gradient(backend):
    x = torch.randn(6, 16)
    a, b = _adapters(16, 8, [4, 4])
    y = oprl.routed_lora_linear(x, torch.randn(8, 16), None, a, b, [1.0, 1.0], torch.zeros(6, dtype=torch.long), backend=backend)
    y.sum().backward()
    assert a[1].grad is not None and not a[1].grad.any() and not b[1].grad.any()
    assert a[0].grad.any()


def test_backends_agree_with_dropout():
    x = torch.randn(3, 7, 32, requires_grad=True)
    w = torch.randn(16, 32)
    a, b = _adapters(32, 16, [8, 8])
    ids = torch.randint(-1, 2, (3, 7))
    outs = []
    for backend in BACKENDS:
        torch.manual_seed(11)
        y = oprl.routed_lora_linear(x, w, None, a, b, [1.0, 0.5], ids, [0.3, 0.5], backend=backend)
        y.sum().backward()
        outs.append((y.detach(), x.grad.clone(), a[0].grad.clone(), b[1].grad.clone()))
        x.grad = None
        for t in a + b:
            t.grad = None
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.manual_seed(11)
    nodrop = oprl.routed_lora_linear(x, w, None, a, b, [1.0, 0.5], ids, [0.0, 0.0], backend="reference")
    assert not torch.allclose(nodrop, outs[0][0])


@pytest.mark.parametrize(
    "ids,exc,match",
    [
        (torch.tensor([0, 1, 3, 0]), ValueError, r"in \[-1, 2\)"),
        (torch.tensor([0, 1, 0]), ValueError, "one id per token"),
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError, "integer tensor"),
        ([0, 1, 0, 1], TypeError, "integer tensor"),
    ],
)
def test_bad_routing(ids, exc, match):
    a, b = _adapters(8, 8, [2, 2])
    with pytest.raises(exc, match=match):
        oprl.routed_lora_linear(torch.randn(4, 8), torch.randn(8, 8), None, a, b, [1.0, 1.0], ids)


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 8, requires_grad=True)
    a, b = _adapters(8, 6, [2, 3])
    ids = torch.tensor([[0, 1, -1], [1, 1, 0]])
    torch.library.opcheck(
        oprl._routed_fwd, (x, torch.randn(6, 8), None, a, b, [1.0, 2.0], [0.0, 0.0], None, ids.reshape(-1), "reference")
    )


def _two_adapter_gpt2():
    import copy

    import tunefast
    from tests import models as M

    ref = M.peft_model("gpt2", ["c_attn"], adapters=("a", "b"))
    fast = copy.deepcopy(ref)
    tunefast.patch(fast, backend="reference")
    return ref, fast, M.batch("gpt2")


def test_route_per_sequence_falls_back_to_peft_mixed_batch_when_a_layer_needs_peft_forward():
    """A hook on lora_B makes that layer run PEFT's forward (so the hook fires); inside a per-sequence
    route it must run PEFT's own mixed-batch forward (``adapter_names``), not raise or apply one adapter."""
    import tunefast
    from tests.test_patch_lora import assert_rel_close

    ref, fast, inputs = _two_adapter_gpt2()
    fired = []
    for model in (ref, fast):
        layer = model.base_model.model.transformer.h[1].attn.c_attn
        layer.lora_B["b"].register_forward_hook(lambda m, i, o: (fired.append(1), o * 0.5)[1])
    rows = ["a", "b"]
    ref.eval(), fast.eval()
    with torch.no_grad():
        want = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], adapter_names=rows).logits
        n_ref = len(fired)
        with tunefast.route(fast, torch.tensor([0, 1]), ["a", "b"]):
            got = fast(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert len(fired) - n_ref == n_ref > 0, "the hook must fire in the routed forward as in PEFT's"
    assert_rel_close(got, want, "per-sequence route with a hooked layer")
    # per-token ids have no PEFT equivalent: that layer refuses instead of applying one adapter everywhere
    with torch.no_grad(), tunefast.route(fast, torch.zeros_like(inputs["input_ids"]), ["a", "b"]):
        with pytest.raises(RuntimeError, match="per-token ids"):
            fast(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])

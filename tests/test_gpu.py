"""GPU checks (marked ``gpu``; skipped without CUDA). benchmarks/gpu_check.sh runs them with
TRITON_INTERPRET=0, so the Triton kernels compile for the device and autotune.

Each compares the CUDA result with the CPU reference on the same inputs: the dropout masks are
counter-based, so the GPU must draw exactly the CPU's masks.
"""

import pytest
import torch

import tunefast
from tests import models as M
from tests.tolerances import assert_close_to_oracle
from tunefast.ops import lora as oplora
from tunefast.ops import routed_lora as oprl
from tunefast.reference import dropout as rd

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _inputs(m, k, n, r, dtype, adapter_dtype=None):
    adapter_dtype = adapter_dtype or dtype
    return (torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype) / k**0.5, torch.randn(n, dtype=dtype),
            torch.randn(r, k, dtype=adapter_dtype) / k**0.5, torch.randn(n, r, dtype=adapter_dtype) / r**0.5)


def test_triton_dropout_mask_equals_cpu_reference():
    """xa = drop(x) A^T with x = 1, A = I is the scaled mask: the GPU kernel's mask is the CPU one."""
    m, k, p, seed = 300, 200, 0.3, 2**40 + 17
    eye = torch.eye(k, device=CUDA)
    _, (xa,) = oplora._lora_linear_fwd(torch.ones(m, k, device=CUDA), torch.zeros(4, k, device=CUDA), None, [eye],
                                       [torch.zeros(4, k, device=CUDA)], [1.0], [p],
                                       torch.tensor([seed], device=CUDA), None, "triton")
    assert torch.equal((xa != 0).cpu(), rd.keep_mask(seed, m, k, p))


def test_native_cuda_dropout_equals_reference():
    from tunefast import _native

    if not _native.cuda_usable()[0]:
        pytest.fail(f"native CUDA module unusable on a GPU machine: {_native.cuda_usable()[1]}")
    x = torch.randn(257, 130)
    got = _native.dropout_apply(x.to(CUDA), 99, 0.25).cpu()
    assert torch.equal(got, rd.dropout(x, 99, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r,p", [(4096, 1024, 1024, 16, 0.0), (1000, 4096, 1536, 64, 0.1), (37, 97, 65, 8, 0.2)])
def test_lora_op_cuda_against_fp64(dtype, m, k, n, r, p):
    x, w, b, a, bb = _inputs(m, k, n, r, dtype, adapter_dtype=torch.float32 if dtype == torch.bfloat16 else None)
    seeds = torch.tensor([1234]) if p else None
    leaves_gpu = [t.to(CUDA).requires_grad_() for t in (x, a, bb)]
    y, _ = oplora._lora_linear_fwd(leaves_gpu[0], w.to(CUDA), b.to(CUDA), [leaves_gpu[1]], [leaves_gpu[2]], [2.0], [p],
                                   seeds.to(CUDA) if p else None, None, "triton")
    leaves_ref = [t.double().requires_grad_() for t in (x, a, bb)]
    xd = rd.dropout(leaves_ref[0], 1234, p)
    y_ref = leaves_ref[0] @ w.double().t() + b.double() + 2.0 * (xd @ leaves_ref[1].t()) @ leaves_ref[2].t()
    leaves_t = [t.to(CUDA).requires_grad_() for t in (x, a, bb)]
    xt = rd.dropout(leaves_t[0].to(leaves_t[1].dtype), 1234, p)
    y_t = (torch.nn.functional.linear(leaves_t[0], w.to(CUDA), b.to(CUDA)) + 2.0 * (xt @ leaves_t[1].t()) @ leaves_t[2].t()).to(dtype)
    g = torch.randn(y_ref.shape).to(dtype)
    y.backward(g.to(CUDA))
    y_ref.backward(g.double())
    y_t.backward(g.to(CUDA))
    assert_close_to_oracle(y.cpu(), y_ref.detach(), y_t.detach().cpu(), "y")
    for name, got, want, tgot in zip(("dx", "dA", "dB"), leaves_gpu, leaves_ref, leaves_t):
        assert_close_to_oracle(got.grad.cpu(), want.grad, tgot.grad.cpu(), name)


def test_dora_and_routed_cuda_match_cpu_reference():
    x, w, b, a, bb = _inputs(512, 256, 192, 8, torch.float32)
    m = torch.rand(192) + 0.5
    want = oplora.lora_linear(x, w, b, [a], [bb], [0.5], magnitude=m, backend="reference")
    got = oplora.lora_linear(*(t.to(CUDA) for t in (x, w, b)), [a.to(CUDA)], [bb.to(CUDA)], [0.5], magnitude=m.to(CUDA),
                             backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    ids = torch.randint(-1, 2, (512,))
    a2, b2 = [a, a * 2], [bb, bb / 2]
    want = oprl.routed_lora_linear(x, w, b, a2, b2, [0.5, 1.0], ids, backend="reference")
    got = oprl.routed_lora_linear(*(t.to(CUDA) for t in (x, w, b)), [t.to(CUDA) for t in a2], [t.to(CUDA) for t in b2],
                                  [0.5, 1.0], ids.to(CUDA), backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_patched_model_parity_on_cuda(family):
    model = M.peft_model(family, M.FAMILIES[family][2][0]).to(CUDA)
    patched = M.clone(model)
    report = tunefast.patch(patched)
    assert all(e.kernel == "lora_linear[triton]" for e in report.patched)
    inputs = {k: v.to(CUDA) for k, v in M.batch(family).items()}
    out0, out1 = model(**inputs), patched(**inputs)
    out0.loss.backward()
    out1.loss.backward()
    torch.testing.assert_close(out1.logits, out0.logits, rtol=1e-4, atol=1e-4)
    for (n, p0), (_, p1) in zip(model.named_parameters(), patched.named_parameters()):
        if p0.requires_grad:
            torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-3, atol=1e-4, msg=n)


def test_compile_patched_layer_on_cuda():
    model = M.peft_model("llama", ["q_proj"]).to(CUDA)
    tunefast.patch(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, 33, 64, device=CUDA)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-4, atol=1e-4)

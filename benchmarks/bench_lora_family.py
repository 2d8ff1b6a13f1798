"""The LoRA family beyond plain LoRA: DoRA and mixed-adapter batches, PEFT vs ``tunefast.patch``.

Cases:
  dora_layer     one PEFT DoRA layer (``use_dora=True``), forward + backward. PEFT forms B A (via an
                 identity matmul) and W + s B A, two (out x in) temporaries per step; tunefast's
                 low-rank row norm forms none. ``info`` counts the (out x in)-sized tensors a step
                 creates (``dense_temps``) next to the usual time and activation bytes.
  mixed_batch    one layer holding 8 adapters, a batch whose sequences each name their adapter
                 (PEFT's ``adapter_names=``; PEFT allows it in eval mode only, gradients still flow):
                 PEFT loops over adapters, tunefast runs one token-routed op. Forward + backward.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import harness

RANK, ALPHA, N_ADAPTERS = 16, 32, 8
CPU_SIZES = dict(dtype=torch.float32, K=1024, N=1024, M=2048, seqs=16)
CUDA_SIZES = dict(dtype=torch.bfloat16, K=4096, N=4096, M=8192, seqs=32)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class _DenseTemps(TorchDispatchMode):
    """Counts newly allocated op outputs of a given 2-D shape (either orientation) while active
    (views of an input, e.g. ``weight.t()``, allocate nothing and are not counted)."""

    def __init__(self, shape):
        super().__init__()
        self.shapes = {tuple(shape), tuple(reversed(shape))}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in inputs):
                self.count += 1
        return out


class _OneLinear(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x, **kw):
        return self.proj(x, **kw)


def _layer_model(K, N, dtype, device, adapters=1, **cfg):
    import peft

    model = _OneLinear(K, N).to(device=device, dtype=dtype)
    for i in range(adapters):
        lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=False, **cfg)
        torch.manual_seed(100 + i)
        if i == 0:
            model = peft.get_peft_model(model, lcfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", lcfg)
    return model


_variants = harness.peft_and_tunefast


def dora_case(K, N, M, dtype, device, **_) -> harness.Case:
    def inputs():
        model = _layer_model(K, N, dtype, device, use_dora=True)
        x = torch.randn(4, M // 4, K, device=device, dtype=dtype, requires_grad=True)
        return model, x, torch.randn(4, M // 4, N, device=device, dtype=dtype)

    def make_step(model, inp, info):
        _, x, gy = inp
        layer = model.base_model.model.proj

        def run():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(gy)

        counter = _DenseTemps((N, K))
        with counter:
            run()
        info = dict(info, dense_temps=counter.count)

        def check():
            run()
            return {"dx": x.grad.clone(), "dA": layer.lora_A["a0"].weight.grad,
                    "dm": layer.lora_magnitude_vector["a0"].weight.grad}

        return harness.Step.for_module(model, run, check, info)

    return harness.Case(suite="lora_family", name="dora_layer", params=dict(K=K, N=N, M=M, r=RANK, dtype=dtype),
                        variants=_variants(make_step), inputs=inputs, dtype=dtype, tolerance=TOLERANCE[dtype],
                        flops=4 * M * N * K + 6 * M * RANK * (K + N))


def mixed_case(K, N, M, seqs, dtype, device, **_) -> harness.Case:
    def inputs():
        model = _layer_model(K, N, dtype, device, adapters=N_ADAPTERS)
        for n, q in model.named_parameters():  # PEFT leaves added adapters frozen; train all eight
            q.requires_grad_("lora_" in n)
        model.eval()
        x = torch.randn(seqs, M // seqs, K, device=device, dtype=dtype, requires_grad=True)
        names = [f"a{i % N_ADAPTERS}" for i in torch.randperm(seqs).tolist()]
        return model, x, names, torch.randn(seqs, M // seqs, N, device=device, dtype=dtype)

    def make_step(model, inp, info):
        _, x, names, gy = inp
        layer = model.base_model.model.proj

        def run():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x, adapter_names=names).backward(gy)

        def check():
            run()
            return {"dx": x.grad.clone(), "dA3": layer.lora_A["a3"].weight.grad}

        return harness.Step.for_module(model, run, check, info)

    return harness.Case(suite="lora_family", name="mixed_batch",
                        params=dict(K=K, N=N, M=M, adapters=N_ADAPTERS, r=RANK, dtype=dtype),
                        variants=_variants(make_step), inputs=inputs, dtype=dtype, tolerance=TOLERANCE[dtype],
                        flops=4 * M * N * K + 6 * M * RANK * (K + N))


def cases(device: torch.device) -> list[harness.Case]:
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    return [dora_case(**sizes, device=device), mixed_case(**sizes, device=device)]


@harness.parametrize(cases(harness.bench_device()))
def test_lora_family(case, variant, measure):
    row = measure(case, variant)
    if variant == "tunefast" and case.name == "dora_layer":
        assert row["info"]["dense_temps"] == 0, row  # no (out x in) temporary at all
        assert row["act_ratio"] <= 1.0, row

"""The rest of the low-rank family (AdaLoRA, VeRA, (IA)3, LoRA on embeddings) and bottleneck adapters.

Cases (forward + backward of one layer on M tokens, dropout 0.1 where the method has one):
  adalora_layer    PEFT SVDLinear vs tunefast.patch (E and s/ranknum folded into A, fused LoRA op)
  vera_layer       PEFT VeRA Linear vs tunefast.patch (d, b folded into the shared A, B)
  ia3_layer        PEFT (IA)3 Linear on a k/v-type layer vs tunefast.patch (the op's column scale)
  ia3_ff_layer     PEFT (IA)3 Linear on a feed-forward layer ((x * l) W^T) vs tunefast.patch (scaled_linear)
  ia3_ff_bf16_layer  the same on a bf16 base with PEFT's default fp32 l (PEFT keeps an fp32 copy of x)
  lora_embedding   PEFT LoRA Embedding vs tunefast.patch (lora_embedding: gather of A^T rows, ids kept)
  adapter_layer    a Houlsby adapter h + up(act(down(drop(h)))) written as a plain nn.Module (the
                   straightforward implementation) vs the fused adapter op (tunefast/ops/adapter.py)

With dropout, outputs differ by design (PEFT's nn.Dropout vs counter-based masks): ``check`` runs in
eval mode, the timed steps in training mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import tunefast
from benchmarks import harness
from tunefast.ops.adapter import adapter as adapter_op

RANK, P = 16, 0.1
CPU_SIZES = dict(dtype=torch.float32, K=1024, N=1024, M=2048, vocab=8192)
CUDA_SIZES = dict(dtype=torch.bfloat16, K=4096, N=4096, M=8192, vocab=32768)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class _One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _peft_layer(cfg, layer, dtype, device, random=()):
    import peft

    model = peft.get_peft_model(_One(layer).to(device=device, dtype=dtype), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking values (several of these methods start as a no-op)
        for n, p in model.named_parameters():
            if any(k in n for k in random):
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.1 + (1.0 if "ia3_l" in n else 0.0))
    return model


def _peft_vs_tunefast(make_model, make_x, grads):
    def inputs():
        model = make_model()
        x, gy = make_x()
        return model, x, gy

    def make_step(model, inp, info):
        _, x, gy = inp
        layer = model.base_model.model.proj

        def named_grads():
            return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None and any(k in n for k in grads)}

        return harness.backward_step(model, layer, x, gy, named_grads, info, eval_module=layer)

    return inputs, harness.peft_and_tunefast(make_step)


def _linear_case(name, cfg_fn, random, grads, K, N, M, dtype, device, adapter_dtype=None, **_):
    import peft

    def make_model():
        model = _peft_layer(cfg_fn(peft), nn.Linear(K, N), dtype, device, random)
        if adapter_dtype is not None:  # PEFT's autocast_adapter_dtype: fp32 adapter vectors on a bf16 base
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.data = p.data.to(adapter_dtype)
        return model

    def make_x():
        x = torch.randn(4, M // 4, K, device=device, dtype=dtype, requires_grad=True)
        return x, torch.randn(4, M // 4, N, device=device, dtype=dtype)

    inputs, variants = _peft_vs_tunefast(make_model, make_x, grads)
    return harness.Case(suite="lowrank", name=name, params=dict(K=K, N=N, M=M, r=RANK, dtype=dtype),
                        variants=variants, inputs=inputs, dtype=dtype, tolerance=TOLERANCE[dtype],
                        flops=4 * M * N * K + 6 * M * RANK * (K + N))


def cases_peft(sizes, device):
    adalora = lambda peft: peft.AdaLoraConfig(init_r=RANK, target_r=RANK // 2, total_step=1000,  # noqa: E731
                                              lora_dropout=P, target_modules=["proj"])
    vera = lambda peft: peft.VeraConfig(r=RANK, vera_dropout=P, target_modules=["proj"])  # noqa: E731
    ia3 = lambda peft: peft.IA3Config(target_modules=["proj"], feedforward_modules=[])  # noqa: E731
    ia3_ff = lambda peft: peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"])  # noqa: E731
    return [
        _linear_case("adalora_layer", adalora, ("lora_",), ("lora_",), **sizes, device=device),
        _linear_case("vera_layer", vera, ("vera_lambda",), ("vera_lambda",), **sizes, device=device),
        _linear_case("ia3_layer", ia3, ("ia3_l",), ("ia3_l",), **sizes, device=device),
        _linear_case("ia3_ff_layer", ia3_ff, ("ia3_l",), ("ia3_l",), **sizes, device=device),
        _linear_case("ia3_ff_bf16_layer", ia3_ff, ("ia3_l",), ("ia3_l",), **dict(sizes, dtype=torch.bfloat16),
                     device=device, adapter_dtype=torch.float32),
        embedding_case(**sizes, device=device),
    ]


def embedding_case(N, M, vocab, dtype, device, **_):
    import peft

    def make_model():
        return _peft_layer(peft.LoraConfig(r=RANK, target_modules=["proj"], init_lora_weights=False),
                           nn.Embedding(vocab, N), dtype, device)

    def make_x():
        ids = torch.randint(0, vocab, (4, M // 4), device=device)
        return ids, torch.randn(4, M // 4, N, device=device, dtype=dtype)

    inputs, variants = _peft_vs_tunefast(make_model, make_x, ("lora_embedding",))
    return harness.Case(suite="lowrank", name="lora_embedding", params=dict(vocab=vocab, N=N, M=M, r=RANK, dtype=dtype),
                        variants=variants, inputs=inputs, dtype=dtype, tolerance=TOLERANCE[dtype],
                        flops=2 * M * RANK * N * 3)


class PlainAdapter(nn.Module):
    """The straightforward Houlsby adapter: h + s * up(act(down(dropout(h))))."""

    def __init__(self, hidden, r, dtype, device):
        super().__init__()
        self.down = nn.Linear(hidden, r, device=device, dtype=dtype)
        self.up = nn.Linear(r, hidden, device=device, dtype=dtype)
        self.dropout = nn.Dropout(P)

    def forward(self, h):
        return h + self.up(F.gelu(self.down(self.dropout(h))))


def adapter_case(N, M, dtype, device, **_):
    def inputs():
        torch.manual_seed(0)
        module = PlainAdapter(N, RANK, dtype, device)
        h = torch.randn(4, M // 4, N, device=device, dtype=dtype, requires_grad=True)
        return module, h, torch.randn(4, M // 4, N, device=device, dtype=dtype)

    def make_step(module, h, gy, forward, info):
        def weight_grads():
            return {"d_down": module.down.weight.grad.clone(), "d_up": module.up.weight.grad.clone()}

        return harness.backward_step(module, forward, h, gy, weight_grads, info)

    def plain_setup(inp):
        module, h, gy = copy.deepcopy(inp)
        return make_step(module, h, gy, module, {})

    def tunefast_setup(inp):
        module, h, gy = copy.deepcopy(inp)

        def fused(x):
            return adapter_op(x, x, module.down.weight, module.down.bias, module.up.weight, module.up.bias,
                              activation="gelu", dropout_p=P, training=module.training)

        return make_step(module, h, gy, fused, {"backend": tunefast.backend.resolve("auto", h.device)})

    return harness.Case(suite="lowrank", name="adapter_layer", params=dict(N=N, M=M, r=RANK, p=P, dtype=dtype),
                        variants={"plain": plain_setup, "tunefast": tunefast_setup}, inputs=inputs, dtype=dtype,
                        tolerance=TOLERANCE[dtype], flops=6 * M * RANK * N * 2)


def cases(device: torch.device) -> list[harness.Case]:
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    return [*cases_peft(sizes, device), adapter_case(**sizes, device=device)]


@harness.parametrize(cases(harness.bench_device()))
def test_lowrank(case, variant, measure):
    row = measure(case, variant)
    if variant == "tunefast" and case.name in ("adalora_layer", "vera_layer", "adapter_layer", "ia3_ff_bf16_layer",
                                               "lora_embedding"):
        # no dropped copy of x, no mask, no act(pre), no fp32 copy of a bf16 x, no A^T[ids] kept
        assert row["act_ratio"] < 1.0, row

"""QLoRA: PEFT's LoRA layers on bitsandbytes bases (the baseline) against the same layer after
``tunefast.patch(model)``.

Cases (sizes per device, see CPU_SIZES / CUDA_SIZES):
  layer   one PEFT ``lora.bnb.Linear4bit`` (nf4 with double quantisation, the QLoRA recipe; compute
          dtype = x's dtype) or ``lora.bnb.Linear8bitLt`` (CPU only: on CUDA bitsandbytes runs
          LLM.int8(), which tunefast leaves to PEFT), rank 16, dropout 0 (CPU) and 0.1: the step is
          forward + backward for x, A and B (x requires grad, as inside a network)
  dequant_cost  (when bitsandbytes is not installed, e.g. on the GPU machine) tunefast's QLoRA op on
          a weight quantised by tunefast's reference quantiser against tunefast's dense LoRA op on
          the same weight dequantised once: what dequantising twice per step costs

Variants share one template (deep copies), random B matrices (init_lora_weights=False) and inputs.
The checks run with the layer in training mode (bitsandbytes' int8 path depends on it) and its
dropout modules in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import tunefast
from benchmarks import harness
from benchmarks import bench_lora
from tunefast.ops.qlora import qlora_linear

RANK, ALPHA = 16, 32

# p = 0 isolates the cost of dequantising from that of regenerating dropout masks (the LoRA op's).
CPU_SIZES = {"dtype": torch.float32, "layers": [dict(K=1024, N=1024, M=2048)], "formats": ["nf4-dq", "int8"],
             "p": [0.0, 0.1]}
CUDA_SIZES = {"dtype": torch.bfloat16, "layers": [dict(K=4096, N=4096, M=8192)], "formats": ["nf4-dq"], "p": [0.1]}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max ||tunefast - PEFT|| / ||PEFT||


def _bnb():
    try:
        import bitsandbytes

        return bitsandbytes
    except ImportError:
        return None


class _OneLinear(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _quantised_template(fmt, K, N, p, dtype, device):
    """A PEFT LoRA model around one bitsandbytes layer, built as transformers' loader would."""
    import peft

    bnb = _bnb()
    w = torch.randn(N, K) / K**0.5
    if fmt == "int8":
        proj = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
    else:
        proj = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=fmt.endswith("-dq"),
                                 quant_type=fmt[:3])
    proj.weight.data = w.to(dtype)
    model = _OneLinear(proj.to(device))  # .to(device) quantises
    setattr(model, "is_loaded_in_8bit" if fmt == "int8" else "is_loaded_in_4bit", True)  # PEFT's dispatch
    return peft.get_peft_model(model, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules=["proj"], init_lora_weights=False))


def _quant_state_tensors(base) -> list[torch.Tensor]:
    """The bitsandbytes layer's quantisation state: model state (not parameters), kept by reference."""
    qs = getattr(base.weight, "quant_state", None)
    if qs is None:  # Linear8bitLt
        return [t for t in (base.state.CB, base.state.SCB, base.weight.SCB) if t is not None]
    tensors = [qs.absmax, qs.code, qs.offset]
    if qs.state2 is not None:
        tensors += [qs.state2.absmax, qs.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _step_for(model, x, gy, info):
    layer = model.base_model.model.proj  # the PEFT bnb LoRA layer (patched or not)
    layer(x)  # bitsandbytes moves CB / SCB into its state on the first forward
    return harness.backward_step(model, layer, x, gy, lambda: bench_lora.adapter_grads(layer), info,
                                 eval_module=layer.lora_dropout, extra_state=_quant_state_tensors(layer.get_base_layer()))


def layer_case(fmt, K, N, M, p, dtype, device) -> harness.Case:
    def inputs():
        template = _quantised_template(fmt, K, N, p, dtype, device)
        x = torch.randn(4, M // 4, K, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(4, M // 4, N, device=device, dtype=dtype)
        return template, x, gy

    def peft_setup(inp):
        template, x, gy = inp
        return _step_for(copy.deepcopy(template), x, gy, {})

    def tunefast_setup(inp):
        template, x, gy = inp
        model = copy.deepcopy(template)
        report = tunefast.patch(model)
        info = {"kernels": ", ".join(f"{k} x{n}" for k, n in report.kernels().items()),
                "skipped": [e.reason for e in report.skipped]}
        return _step_for(model, x, gy, info)

    return harness.Case(
        suite="qlora", name="layer",
        params=dict(fmt=fmt, K=K, N=N, M=M, r=RANK, p=p, dtype=dtype),
        variants={"peft": peft_setup, "tunefast": tunefast_setup},
        inputs=inputs, flops=bench_lora.layer_flops(K, N, M, RANK), dtype=dtype, tolerance=TOLERANCE[dtype],
    )


def dequant_cost_case(fmt, K, N, M, p, dtype, device) -> harness.Case:
    """Without bitsandbytes: the QLoRA op against the dense LoRA op on the dequantised weight."""
    from tunefast.reference import quant as rq

    def inputs():
        w = torch.randn(N, K, device=device) / K**0.5
        qw = rq.quantize_4bit(w, fmt[:3], 64, double_quant=fmt.endswith("-dq"))
        weight = rq.dequantize(qw, dtype)
        a = (torch.randn(RANK, K, device=device) / K**0.5).requires_grad_()
        b = (torch.randn(N, RANK, device=device) * 0.1).requires_grad_()
        x = torch.randn(4, M // 4, K, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(4, M // 4, N, device=device, dtype=dtype)
        return qw, weight, a, b, x, gy

    def setup(which):
        def make(inp):
            qw, weight, a, b, x, gy = inp
            scale = ALPHA / RANK

            def forward(drop):
                if which == "dense":
                    return tunefast.lora_linear(x, weight, None, [a], [b], [scale], [drop])
                return qlora_linear(x, qw, None, [a], [b], [scale], [drop])

            def run():
                x.grad = a.grad = b.grad = None
                forward(p).backward(gy)

            def check():
                x.grad = a.grad = b.grad = None
                y = forward(0.0)
                y.backward(gy)
                return {"y": y, "dx": x.grad, "dA": a.grad, "dB": b.grad}

            state = [weight, a, b, qw.data, qw.absmax, qw.absmax_code, qw.absmax_scale, qw.offset]
            return harness.Step(run=run, state=[t for t in state if t is not None], check=check)

        return make

    return harness.Case(
        suite="qlora", name="dequant_cost",
        params=dict(fmt=fmt, K=K, N=N, M=M, r=RANK, p=p, dtype=dtype),
        variants={"dense_lora": setup("dense"), "tunefast": setup("qlora")},
        inputs=inputs, flops=bench_lora.layer_flops(K, N, M, RANK), dtype=dtype, tolerance=TOLERANCE[dtype],
    )


def cases(device: torch.device) -> list[harness.Case]:
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    dtype = sizes["dtype"]
    if _bnb() is None:
        return [dequant_cost_case("nf4-dq", **s, p=p, dtype=dtype, device=device)
                for s in sizes["layers"] for p in sizes["p"]]
    return [layer_case(fmt, **s, p=p, dtype=dtype, device=device)
            for s in sizes["layers"] for fmt in sizes["formats"] for p in sizes["p"]]


@harness.parametrize(cases(harness.bench_device()))
def test_qlora(case, variant, measure):
    row = measure(case, variant)
    if variant == "tunefast" and case.name == "layer":
        # Kept for backward: x and x A^T and one seed; PEFT keeps x, drop(x) and its mask on top, and
        # a second x (its defensive result.clone() aside, bitsandbytes keeps its own reference).
        # Neither keeps a dense weight (bitsandbytes re-dequantises in backward, as tunefast does).
        assert row["act_ratio"] <= 1.0, row
        assert "qlora_linear" in row["info"]["kernels"], row["info"]

"""LoRA: PEFT's own layers (the baseline) against the same model after ``tunefast.patch(model)``.

Cases (sizes per device, see CPU_SIZES / CUDA_SIZES):
  layer       one PEFT ``lora.Linear`` on an ``nn.Linear`` base, rank 16, dropout 0 and 0.1: the
              step is forward + backward for x, A and B (x requires grad, as inside a network)
  llama_step  a Llama built from a config (no download), LoRA on all linear layers, rank 16: the step
              is forward, loss, backward and an AdamW step on the adapters

Both variants start from deep copies of one PEFT model, so they hold the same weights and see the
same inputs; B matrices are random (init_lora_weights=False) so that no product runs on zeros and
the checks compare non-trivial gradients. Adapters stay in PEFT's default dtype (fp32 on a bf16 base,
``autocast_adapter_dtype=True``): what a user of PEFT gets.

The tunefast rows' ``info`` (and a printed line) name the LoRA GPU path each layer shape ran, fused
Triton GEMM or cuBLAS + low-rank epilogue, with both times where they were measured on first use
(tunefast/ops/lora_path.py; ``TUNEFAST_LORA_PATH=triton|cublas`` forces one).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import tunefast
from benchmarks import harness

RANK, ALPHA = 16, 32

# Kept small enough that the whole CPU run stays near two minutes on 2 cores.
CPU_SIZES = {
    "dtype": torch.float32,
    "layers": [dict(K=1024, N=1024, M=2048)],
    "llama": dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=2048, batch=4, seq=256),
}
CUDA_SIZES = {
    "dtype": torch.bfloat16,
    "layers": [dict(K=4096, N=4096, M=8192)],
    "llama": dict(hidden=2048, intermediate=5504, layers=4, heads=16, kv_heads=8, vocab=8192, batch=4, seq=2048),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max ||tunefast - PEFT|| / ||PEFT||, eval mode
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}  # bf16 error compounds over layers


def _peft():
    import peft

    return peft


def _native_dropout(device) -> bool | None:
    """Whether the reference path's dropout runs the native kernel (tunefast._C / _C_cuda) on ``device``."""
    try:
        from tunefast import _native
    except ImportError:
        return None
    return _native.CPU_AVAILABLE if device.type == "cpu" else _native.cuda_usable()[0]


def lora_paths(tokens: int, shapes, p: float) -> str:
    """Which LoRA GPU path ran (tunefast/ops/lora_path.py) for linear layers of ``shapes`` [(K, N)] at
    ``tokens`` tokens, with both measured times where they were measured: "fwd KxN: path (how: times)"."""
    from tunefast.ops import lora_path

    bucket = lora_path.shape_class("fwd", tokens, 1, 1, [], torch.float32, torch.float32, False, False,
                                   torch.device("cpu")).m_bucket
    pairs = {("fwd", n, k) for k, n in shapes} | {("dx", k, n) for k, n in shapes}
    out = [f"{sc.op} {sc.k if sc.op == 'fwd' else sc.n}x{sc.n if sc.op == 'fwd' else sc.k}: {choice.describe()}"
           for sc, choice in lora_path.entries()
           if sc.m_bucket == bucket and sc.dropout == (p > 0) and (sc.op, sc.n, sc.k) in pairs]
    return "; ".join(out) or "none recorded (reference backend, or no Triton path ran)"


def _noting_paths(step: harness.Step, paths) -> harness.Step:
    """Record ``paths()`` in the row's info after the first run (the first use, where the LoRA path is
    chosen, happens in check(), before any timed step) and print it."""
    inner = step.run

    def run():
        inner()
        if "lora_path" not in step.info:
            step.info["lora_path"] = paths()
            print(f"\nlora path: {step.info['lora_path']}")

    step.run = run
    return step


def _patched(template):
    """A deep copy of ``template`` patched with the default backend; info names the kernels used."""
    model = copy.deepcopy(template)
    report = tunefast.patch(model)
    kernels = ", ".join(f"{k} x{n}" for k, n in report.kernels().items())
    device = next(model.parameters()).device
    return model, {"kernels": kernels, "skipped": len(report.skipped), "native": _native_dropout(device)}


# ---- one LoRA layer ------------------------------------------------------------------------------


class _OneLinear(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)  # Llama-style: no bias

    def forward(self, x):
        return self.proj(x)


def adapter_grads(layer, name="default"):
    """dA and dB of one PEFT LoRA layer's adapter ``name``."""
    return {"dA": layer.lora_A[name].weight.grad, "dB": layer.lora_B[name].weight.grad}


def layer_flops(K, N, M, r=RANK) -> float:
    """Matmul FLOPs of forward + backward with a frozen base: x W^T (2MNK) and dx = dy W (2MNK); the
    adapter's xa, xa B^T, dB, dxa, dA and its share of dx (each 2 M r K or 2 M r N)."""
    return 4 * M * N * K + 6 * M * r * (K + N)


def layer_case(K, N, M, p, dtype, device) -> harness.Case:
    def inputs():
        template = _OneLinear(K, N).to(device=device, dtype=dtype)
        template = _peft().get_peft_model(template, _peft().LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules=["proj"], init_lora_weights=False))
        x = torch.randn(4, M // 4, K, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(4, M // 4, N, device=device, dtype=dtype)
        return template, x, gy

    def step_for(model, x, gy, info):
        layer = model.base_model.model.proj  # the peft.tuners.lora.Linear (patched or not)
        return harness.backward_step(model, layer, x, gy, lambda: adapter_grads(layer), info, eval_module=layer)

    def peft_setup(inp):
        template, x, gy = inp
        return step_for(copy.deepcopy(template), x, gy, {})

    def tunefast_setup(inp):
        template, x, gy = inp
        model, info = _patched(template)
        return _noting_paths(step_for(model, x, gy, info), lambda: lora_paths(M, [(K, N)], p))

    return harness.Case(
        suite="lora", name="layer",
        params=dict(K=K, N=N, M=M, r=RANK, p=p, dtype=dtype),
        variants={"peft": peft_setup, "tunefast": tunefast_setup},
        inputs=inputs, flops=layer_flops(K, N, M), dtype=dtype, tolerance=TOLERANCE[dtype],
    )


# ---- a small model's training step ----------------------------------------------------------------


def llama_shapes(hidden, intermediate, heads, kv_heads, **_) -> list[tuple[int, int]]:
    """(K, N) of each LoRA-adapted linear layer of one decoder layer: q, k, v, o, gate, up, down."""
    kv = kv_heads * (hidden // heads)
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
            (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]


def llama_flops(hidden, intermediate, layers, heads, kv_heads, vocab, batch, seq, r=RANK) -> float:
    """Matmul FLOPs of one training step with a frozen base and LoRA on every linear layer:
    per linear (K -> N) 4 T N K (forward and dx) + 6 T r (K + N) (the adapter); causal attention
    2 B S^2 H forward (half of the full QK^T and PV) and twice that backward; the LM head 4 T V H."""
    t = batch * seq
    shapes = llama_shapes(hidden, intermediate, heads, kv_heads)
    linear = sum(4 * t * n * k + 6 * t * r * (k + n) for k, n in shapes)
    attention = 3 * 2 * batch * seq * seq * hidden
    return layers * (linear + attention) + 4 * t * vocab * hidden


def llama_case(sizes: dict, p, dtype, device) -> harness.Case:
    def inputs():
        import transformers as tf

        cfg = tf.LlamaConfig(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
                             intermediate_size=sizes["intermediate"], num_hidden_layers=sizes["layers"],
                             num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"],
                             max_position_embeddings=sizes["seq"])
        cfg._attn_implementation = "sdpa"
        base = tf.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        template = _peft().get_peft_model(base, _peft().LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=p, target_modules="all-linear", init_lora_weights=False,
            task_type="CAUSAL_LM"))
        ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), device=device)
        return template, ids

    def step_for(model, ids, info):
        trainable = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def check():
            model.eval()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out = {"loss": loss.detach(), "grads": torch.cat([q.grad.flatten().float() for q in trainable])}
            model.zero_grad(set_to_none=True)
            model.train()
            return out

        return harness.Step.for_module(model, run, check, info)

    def peft_setup(inp):
        template, ids = inp
        return step_for(copy.deepcopy(template), ids, {})

    def tunefast_setup(inp):
        template, ids = inp
        model, info = _patched(template)
        return _noting_paths(step_for(model, ids, info),
                             lambda: lora_paths(sizes["batch"] * sizes["seq"], llama_shapes(**sizes), p))

    return harness.Case(
        suite="lora", name="llama_step",
        params=dict(sizes, r=RANK, p=p, dtype=dtype),
        variants={"peft": peft_setup, "tunefast": tunefast_setup},
        inputs=inputs, flops=llama_flops(**sizes), dtype=dtype, tolerance=MODEL_TOLERANCE[dtype],
    )


def cases(device: torch.device) -> list[harness.Case]:
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    dtype = sizes["dtype"]
    out = [layer_case(**s, p=p, dtype=dtype, device=device) for s in sizes["layers"] for p in (0.0, 0.1)]
    out += [llama_case(sizes["llama"], p, dtype, device) for p in (0.0, 0.1)]
    return out


@harness.parametrize(cases(harness.bench_device()))
def test_lora(case, variant, measure):
    row = measure(case, variant)
    if variant == "tunefast":
        # The fused op keeps x and x A^T, never drop(x) or its mask: never more than PEFT, less with dropout.
        assert row["act_ratio"] <= 1.0, row
        if case.params["p"] > 0:
            assert row["act_ratio"] < 1.0, row

"""Sparse fine-tuning: tunefast's sparse deltas against dense-gradient masking (composable-sft style: the
whole weight trains, its dense gradient is masked, AdamW keeps dense states) and PEFT's SHiRA (which
clones the weight every forward and forms its dense gradient), at densities 0.1 %, 1 % and 5 %.

Cases (the same weights, inputs and, where the variants allow it, the same trained entries):
  values_grad  the values' gradient alone on a 4096 x 4096 layer: dense dy^T x then gather (baseline)
               against the SDDMM (tunefast.ops.sparse: native C++ on CPU, Triton on a GPU). The target's
               done-when: at 1 %, 2048 tokens, CPU: >= 5x faster and <= 1/50 of the gradient memory.
  layer_step   one 4096 x 4096 layer: forward, backward (dx too) and an AdamW step. All three variants
               train the same entries (SHiRA's r(in + out) of them, via its mask_fn) from the same values,
               so y, dx and the values' gradient are checked against the baseline.
  model_step   a small Llama (every linear layer but the head), forward + loss + backward + AdamW; each
               method picks its own entries (random), values start at zero, so the check is the loss.

What to read: cpu_ms (CPU; --bench-threads 1 on a shared box), act_bytes (what autograd keeps: the
sparse op keeps x only, SHiRA also a dense weight copy), and in ``info``: param_bytes / grad_bytes /
optim_bytes (trainable parameters, their gradients, AdamW state; dense masking also holds an (N, K)
bool mask), workspace_bytes (native SDDMM scratch, an upper bound), density (actual, SHiRA's r rounds).
On a GPU: peak_bytes, and throughput = tokens / time (``tokens`` in params). No TFLOP/s: the variants
do different work (the SDDMM does 2 * M * nnz multiply-adds where the dense gradient does 2 * M * N * K).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks import harness

DENSITIES = (0.001, 0.01, 0.05)
CPU_SIZES = {
    "dtype": torch.float32,
    "grad_layer": (4096, 4096, 2048),  # (N, K, tokens): the done-when run
    "step_layer": (4096, 4096, 256),
    "model": dict(hidden=256, intermediate=688, layers=4, heads=4, vocab=1024, batch=4, seq=128),
}
CUDA_SIZES = {
    "dtype": torch.bfloat16,
    "grad_layer": (4096, 4096, 8192),
    "step_layer": (4096, 4096, 8192),
    "model": dict(hidden=2048, intermediate=5504, layers=4, heads=16, vocab=32000, batch=4, seq=512),
}
MIN_SPEEDUP, MAX_GRAD_MEMORY = 5.0, 1 / 50  # the done-when, at 1 % on the CPU grad_layer case
NATIVE_BUFFER_BYTES = 256 << 10  # csrc/sparse_cpu.cpp kSddmmBufferBytes: per-thread scratch of the SDDMM


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _bytes_info(trainable) -> dict:
    """Trainable parameters, their gradients and AdamW's state (exp_avg, exp_avg_sq: 2x the parameters)."""
    b = _nbytes(trainable)
    return {"param_bytes": b, "grad_bytes": b, "optim_bytes": 2 * b}


def _shira_r(n: int, k: int, density: float) -> int:
    return max(1, round(density * n * k / (n + k)))


def _impl(device) -> str:
    from tunefast.ops.sparse import implementation

    return implementation("auto", device)


# ---- values_grad --------------------------------------------------------------------------------------


def grad_case(n, k, m, density, dtype, device) -> harness.Case:
    nnz = max(1, round(density * n * k))

    def inputs():
        from tunefast.ops.sparse import sparse_structure

        x = torch.randn(m, k, device=device, dtype=dtype)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        idx = torch.randperm(n * k, device=device)[:nnz].sort().values
        return x, dy, sparse_structure(idx, (n, k))

    def dense_gather(inp):
        x, dy, st = inp
        out = {}

        def run():
            g = dy.t() @ x  # the full (N, K) gradient, as composable-sft's masking forms it
            out["dv"] = g.view(-1)[st.indices].float()

        info = {"grad_bytes": n * k * dy.element_size() + nnz * 4, "nnz": nnz}
        return harness.Step(run=run, state=[x, dy, *st], check=lambda: (run(), {"dv": out["dv"]})[1], info=info)

    def sddmm(inp):
        from tunefast.ops import sparse as osp

        x, dy, st = inp
        impl = _impl(device)
        out = {}

        def run():
            out["dv"] = osp._sddmm(impl, dy, x, st)

        threads = torch.get_num_threads() if device.type == "cpu" else 0
        workspace = threads * NATIVE_BUFFER_BYTES if impl == "native" else 0
        info = {"grad_bytes": nnz * 4 + workspace, "workspace_bytes": workspace, "nnz": nnz, "impl": impl}
        return harness.Step(run=run, state=[x, dy, *st], check=lambda: (run(), {"dv": out["dv"]})[1], info=info)

    return harness.Case(suite="sparse", name="values_grad",
                        params=dict(N=n, K=k, tokens=m, density=density, dtype=dtype),
                        variants={"dense_grad_gather": dense_gather, "sddmm": sddmm}, inputs=inputs, dtype=dtype,
                        tolerance=1e-4 if dtype == torch.float32 else 2e-2)


# ---- layer_step ---------------------------------------------------------------------------------------


class _Layer(nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return self.proj(x)


def layer_case(n, k, m, density, dtype, device) -> harness.Case:
    r = _shira_r(n, k, density)
    nnz = r * (n + k)  # SHiRA's count; every variant trains exactly these entries

    def inputs():
        layer = _Layer(n, k).to(device=device, dtype=dtype)
        idx = torch.randperm(n * k, device=device)[:nnz].sort().values
        values = torch.randn(nnz, device=device) * 0.02
        x = torch.randn(m, k, device=device, dtype=dtype)
        g = torch.randn(m, n, device=device, dtype=dtype)  # the upstream gradient
        return layer, idx, values, x, g

    def step(module, trainable, x, g, info, extra_state=(), after_backward=None, dv=None):
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        xg = x.clone().requires_grad_()

        def run():
            y = module(xg)
            y.backward(g)
            if after_backward is not None:
                after_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            xg.grad = None

        def check():
            y = module(xg)
            y.backward(g)
            out = {"y": y.float(), "dx": xg.grad.float(), "dv": dv()}
            opt.zero_grad(set_to_none=True)
            xg.grad = None
            return out

        info.update(_bytes_info(trainable))
        return harness.Step.for_module(module, run, check, info=info, extra_state=[xg, g, *extra_state])

    def dense_masking(inp):
        layer, idx, values, x, g = inp
        module = copy.deepcopy(layer)
        w = module.proj.weight
        mask = torch.zeros(n * k, dtype=torch.bool, device=device)
        mask[idx] = True
        mask = mask.view(n, k)
        with torch.no_grad():
            w.view(-1)[idx] += values.to(dtype)
        info = {"mask_bytes": mask.numel(), "nnz": nnz, "density": nnz / (n * k)}
        return step(module, [w], x, g, info, extra_state=[mask], after_backward=lambda: w.grad.mul_(mask),
                    dv=lambda: w.grad.view(-1)[idx].float())

    def peft_shira(inp):
        import peft

        layer, idx, values, x, g = inp
        module = copy.deepcopy(layer)
        mask = torch.zeros(n * k, device=device, dtype=dtype)
        mask[idx] = 1
        cfg = peft.ShiraConfig(r=r, target_modules=["proj"])
        cfg.mask_fn = lambda base_layer, r, **kw: mask.view(n, k)
        module = peft.inject_adapter_in_model(cfg, module)
        shira = module.proj.shira_weight["default"]
        with torch.no_grad():
            shira.copy_(values.to(shira.dtype))
        trainable = [p for p in module.parameters() if p.requires_grad]
        return step(module, trainable, x, g, {"nnz": nnz, "density": nnz / (n * k)}, dv=lambda: shira.grad.float())

    def tunefast_sparse(inp):
        from tunefast.methods import sparse

        layer, idx, values, x, g = inp
        module = sparse.apply(copy.deepcopy(layer), sparse.SparseConfig(selection={"proj": idx.cpu()}))
        delta = module.proj.deltas["default"]
        with torch.no_grad():
            delta.values.copy_(values)
        info = {"nnz": nnz, "density": nnz / (n * k), "impl": _impl(device)}
        return step(module, sparse.trainable_parameters(module), x, g, info, dv=lambda: delta.values.grad.float())

    return harness.Case(suite="sparse", name="layer_step",
                        params=dict(N=n, K=k, tokens=m, density=density, shira_r=r, dtype=dtype),
                        variants={"dense_masking": dense_masking, "peft_shira": peft_shira,
                                  "tunefast_sparse": tunefast_sparse},
                        inputs=inputs, dtype=dtype, tolerance=1e-4 if dtype == torch.float32 else 3e-2)


# ---- model_step ---------------------------------------------------------------------------------------

LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(s, device, dtype):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                         max_position_embeddings=s["seq"])
    cfg._attn_implementation = "sdpa"
    return tf.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def model_case(s, density, dtype, device) -> harness.Case:
    def inputs():
        return _llama(s, device, dtype), torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)

    def step(model, trainable, ids, info, after_backward=None):
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

        def run():
            model(input_ids=ids, labels=ids).loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def check():
            with torch.no_grad():
                return {"loss": model(input_ids=ids, labels=ids).loss.float()}

        info.update(_bytes_info(trainable))
        return harness.Step.for_module(model, run, check, info=info)

    def dense_masking(inp):
        template, ids = inp
        model = copy.deepcopy(template)
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        weights, masks = [], []
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_NAMES:
                w = mod.weight.requires_grad_(True)
                nnz = max(1, round(density * w.numel()))
                mask = torch.zeros(w.numel(), dtype=torch.bool)
                mask[torch.randperm(w.numel(), generator=gen)[:nnz]] = True
                weights.append(w)
                masks.append(mask.view_as(w).to(device))

        def mask_grads():
            for w, m in zip(weights, masks):
                w.grad.mul_(m)

        info = {"mask_bytes": sum(m.numel() for m in masks), "density": density}
        return step(model, weights, ids, info, after_backward=mask_grads)

    def peft_shira(inp):
        import peft

        template, ids = inp
        r = _shira_r(s["hidden"], s["hidden"], density)
        model = peft.get_peft_model(copy.deepcopy(template), peft.ShiraConfig(r=r, target_modules=LINEAR_NAMES,
                                                                            random_seed=0))
        trainable = [p for p in model.parameters() if p.requires_grad]
        linear_numel = sum(m.weight.numel() for n, m in template.named_modules()
                           if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_NAMES)
        return step(model, trainable, ids, {"r": r, "density": _nbytes(trainable) / 4 / linear_numel})

    def tunefast_sparse(inp):
        from tunefast.methods import sparse

        template, ids = inp
        model = sparse.apply(copy.deepcopy(template), sparse.SparseConfig(density=density, target_modules=LINEAR_NAMES))
        return step(model, sparse.trainable_parameters(model), ids, {"density": density, "impl": _impl(device)})

    return harness.Case(suite="sparse", name="model_step", params=dict(s, density=density, dtype=dtype,
                                                                         tokens=s["batch"] * s["seq"]),
                        variants={"dense_masking": dense_masking, "peft_shira": peft_shira,
                                  "tunefast_sparse": tunefast_sparse},
                        inputs=inputs, dtype=dtype, tolerance=1e-5 if dtype == torch.float32 else 1e-2)


def cases(device: torch.device) -> list[harness.Case]:
    sz = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    dt = sz["dtype"]
    out = [grad_case(*sz["grad_layer"], d, dt, device) for d in DENSITIES]
    out += [layer_case(*sz["step_layer"], d, dt, device) for d in DENSITIES]
    out += [model_case(sz["model"], d, dt, device) for d in DENSITIES]
    return out


_ROWS: dict[tuple[str, str], dict] = {}


@harness.parametrize(cases(harness.bench_device()))
def test_sparse(case, variant, measure):
    row = measure(case, variant)
    _ROWS[(case.id, variant)] = row
    base = _ROWS.get((case.id, case.baseline))
    if case.name == "values_grad" and variant == "sddmm" and base is not None and case.params["density"] <= 0.01:
        assert row["info"]["grad_bytes"] <= MAX_GRAD_MEMORY * base["info"]["grad_bytes"], (row["info"], base["info"])
        if case.params["density"] == 0.01 and row["device_type"] == "cpu" and row["cpu_ratio"] is not None:
            assert row["cpu_ratio"] <= 1 / MIN_SPEEDUP, row
    if case.name != "values_grad" and variant == "tunefast_sparse" and base is not None:
        assert row["info"]["optim_bytes"] < base["info"]["optim_bytes"]

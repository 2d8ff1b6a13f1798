"""Fused LM-head loss (tunefast.ops.linear_cross_entropy) against PEFT's unfused head + Hugging Face loss.

Case ``head`` (one per tokens x hidden x vocab): the head and its loss alone, hidden (N, H) requiring
grad, the head frozen (as under LoRA); one step = loss + backward into hidden.
  unfused   logits = F.linear(h, W) in the model dtype, then ForCausalLMLoss's fp32 cross-entropy
            (what an unpatched PEFT model runs)
  fused     linear_cross_entropy (reference token chunks on a CPU, Triton vocab tiles on a GPU)
  (Liger's fused loss would sit beside them when liger_kernel is installed; it is not, here.)

Cases ``lora_step`` (small Llama, vocab 32,000) and ``qwen_step`` (Qwen2.5-0.5B's shape: hidden 896,
vocab 151,936, tied head, r = 16 all-linear, 2 x 512 tokens, gradient checkpointing; on a CPU also
with fewer layers so it can be timed): a LoRA training step (forward with labels, backward).
  peft_lora          unpatched PEFT (the baseline)
  peft_fused_head    PEFT's LoRA layers, only the LM head's loss fused (tunefast/patching/lm_head.py)
  tunefast           tunefast.patch (the head is fused by default): LoRA layers and the head

What to read: act_bytes (what autograd keeps between forward and backward) and its ratio; the project's
claims, checked below when the variants ran: lora_step tunefast <= 0.25 x PEFT, qwen_step (24 layers)
<= 0.2 x PEFT. On a CPU the fused loss runs the plain-PyTorch reference, so its times say how much
memory traffic is skipped, not what the Triton kernel does. No peak memory on CPU (the harness reports
CUDA peaks only).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks import harness

RANK, ALPHA = 16, 32
MAX_ACT = {"lora_step": 0.25, "qwen_step": 0.2}

CPU_SIZES = {
    "dtype": torch.float32,
    # (tokens, hidden, vocab): 256 tokens keep one step under ~2 s on one core at V = 151,936
    "head": [(256, 896, 32_000), (256, 896, 128_256), (256, 896, 151_936), (256, 4096, 32_000)],
    "lora": dict(hidden=256, intermediate=688, layers=2, heads=4, kv_heads=4, batch=2, seq=256, vocab=32_000),
    # 24 layers: the Qwen2.5-0.5B shape (act_bytes only: a timed run needs minutes per step on this box)
    "qwen_layers": [24, 2],
}
CUDA_SIZES = {
    "dtype": torch.bfloat16,
    "head": [(n, h, v) for n in (4096,) for h in (896, 2048, 4096) for v in (32_000, 128_256, 151_936)],
    "lora": dict(hidden=2048, intermediate=5504, layers=4, heads=16, kv_heads=8, batch=4, seq=1024, vocab=32_000),
    "qwen_layers": [24],
}
QWEN = dict(hidden=896, intermediate=4864, heads=14, kv_heads=2, batch=2, seq=512, vocab=151_936)

_ROWS: dict[tuple[str, str], dict] = {}


def head_case(tokens, hidden, vocab, dtype, device) -> harness.Case:
    def inputs():
        h = torch.randn(tokens, hidden, device=device, dtype=dtype)
        w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
        labels = torch.randint(0, vocab, (tokens,), device=device)
        labels[::7] = -100
        return h, w, labels

    def variant(fused):
        def setup(inp):
            from tunefast import backend
            from tunefast.ops.linear_cross_entropy import linear_cross_entropy

            h0, w, labels = inp
            h = h0.clone().requires_grad_()

            def loss():
                if fused:
                    return linear_cross_entropy(h, w, labels)
                return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100)

            def run():
                loss().backward()
                h.grad = None

            def check():
                out = loss()
                (dh,) = torch.autograd.grad(out, h)
                return {"loss": out, "dhidden": dh}

            info = {"backend": backend.resolve("auto", device) if fused else "torch"}
            return harness.Step(run=run, state=[h, w, labels], check=check, info=info)

        return setup

    return harness.Case(
        suite="lm_head", name="head", params=dict(N=tokens, H=hidden, V=vocab, dtype=dtype),
        variants={"unfused": variant(False), "fused": variant(True)}, inputs=inputs, baseline="unfused",
        flops=4.0 * tokens * hidden * vocab, dtype=dtype,  # logits + dhidden, two N x V x H matmuls
    )


def _model(kind, sizes, layers, device, dtype):
    import transformers as tf

    common = dict(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                  num_hidden_layers=layers, num_attention_heads=sizes["heads"], num_key_value_heads=sizes["kv_heads"],
                  max_position_embeddings=sizes["seq"])
    if kind == "qwen":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    model.config._attn_implementation = "sdpa"
    return model.to(device=device, dtype=dtype)


def step_case(name, kind, sizes, layers, dtype, device, checkpointing) -> harness.Case:
    def inputs():
        ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), device=device)
        return _model(kind, sizes, layers, device, dtype), ids

    def variant(which):
        def setup(inp):
            import peft

            import tunefast
            from tunefast.patching import lm_head

            template, ids = inp
            model = copy.deepcopy(template)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                task_type="CAUSAL_LM"))
            model.train()
            info = {}
            if which == "tunefast":
                report = tunefast.patch(model, lm_head=True)
                info = {"kernels": report.kernels()}
                assert any(k.startswith("linear_cross_entropy") for k in info["kernels"]), report
            elif which == "peft_fused_head":
                info = {"head": [e.kernel for e in lm_head.apply(model, "auto")]}
            trainable = [p for p in model.parameters() if p.requires_grad]

            def run():
                model(input_ids=ids, labels=ids).loss.backward()
                for p in trainable:
                    p.grad = None

            def check():
                out = model(input_ids=ids, labels=ids)
                grads = torch.autograd.grad(out.loss, trainable)
                return {"loss": out.loss, **{f"grad{i}": g for i, g in enumerate(grads[:8])}}

            info["trainable"] = sum(p.numel() for p in trainable)
            return harness.Step.for_module(model, run, check=check, info=info)

        return setup

    params = dict(sizes, layers=layers, r=RANK, ckpt=int(checkpointing), dtype=dtype)
    return harness.Case(
        suite="lm_head", name=name, params=params,
        variants={v: variant(v) for v in ("peft_lora", "peft_fused_head", "tunefast")},
        inputs=inputs, baseline="peft_lora", dtype=dtype,
    )


def cases(device: torch.device) -> list[harness.Case]:
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    dtype = sizes["dtype"]
    out = [head_case(n, h, v, dtype, device) for n, h, v in sizes["head"]]
    out.append(step_case("lora_step", "llama", sizes["lora"], sizes["lora"]["layers"], dtype, device, False))
    out += [step_case("qwen_step", "qwen", QWEN, layers, dtype, device, True) for layers in sizes["qwen_layers"]]
    return out


@harness.parametrize(cases(harness.bench_device()))
def test_lm_head(case, variant, measure):
    row = measure(case, variant)
    _ROWS[(case.id, variant)] = row
    if case.name == "head" and variant == "fused":  # only dhidden (N, H) is kept: nothing of size V
        p = case.params
        assert row["act_bytes"] <= int(p["N"]) * int(p["H"]) * 4 + 4096, row
    limit = MAX_ACT.get(case.name)
    full_shape = case.name == "lora_step" or case.params.get("layers") == 24  # the claims' shapes
    if limit is not None and variant == "tunefast" and full_shape:
        assert row["act_ratio"] <= limit, row

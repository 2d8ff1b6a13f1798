"""Prefix attention: tunefast's shared-prefix kernel against PEFT's concatenation + SDPA.

Cases (sizes per device: CUDA_SIZES, and CPU_SIZES reduced so that the CPU run takes about a minute):
  attention    the attention alone, forward + backward for q, k, v and the prefix; q (B, Hq, T, D),
               k / v (B, Hkv, T, D) causal, prefix (Hkv, P, D), no padding:
                 peft_sdpa          what PEFT + transformers' sdpa run: the prefix copied into every batch
                                    element (cat), K/V repeated per query head (repeat_kv: SDPA takes no
                                    GQA with a mask), an explicit (B, 1, T, P + T) bool mask (the key
                                    length differs from the query length), F.scaled_dot_product_attention
                 tunefast           prefix_attention (Triton on a GPU; on a CPU the plain-PyTorch
                                    reference, so CPU times say nothing about the kernel: act bytes do)
                 sdpa_same_length   plain causal SDPA over P + T tokens with native GQA: the cost of
                                    treating the prefix as ordinary tokens (flash attention on a GPU)
               TFLOP/s counts the useful work of the prefix problem (kernels.prefix_attention.flops) for
               every variant, so sdpa_same_length's own rate is higher than shown.
  llama_step   a prefix-tuned Llama (PEFT, sdpa attention): forward, loss, backward, AdamW, against the
               same model after tunefast.patch. Activation bytes: PEFT keeps per layer the concatenated
               (B, H, P + T, D) K/V (the prefix once per batch element); patched, the prefix is held once.
  mistral_step the same with a Mistral (sliding window W = T / 2, every layer local): PEFT runs transformers'
               sliding-window mask over its concatenated cache; patched, the kernel takes the window (counting
               the prefix's positions as PEFT's cache does) and skips key blocks outside it. Its FLOP count
               is the full-causal one of llama_step (an upper bound: the window halves the attention work).
  t5_step /    prefix-tuned T5 / BART (SEQ_2_SEQ_LM: the prefix on decoder self-attention, as PEFT puts it),
  bart_step    source and target of T tokens; T5 runs eager attention (its relative position bias), BART
               sdpa. Patched, T5's bias reaches the kernel as one (H, T, P + T) tensor shared by the batch.
  prompt_step  a prompt-tuned Llama (input-level virtual tokens; the patch keeps PEFT's path) against the
               base model run on P + T real tokens: PEFT's path keeps nothing beyond the longer sequence.

GPU grid: P in {16, 64, 256} x T in {512, 2048, 8192} x B in {1, 8}, Hq 32, Hkv 8, D 128 (Llama-3-8B
attention), bf16. CPU grid (reduced to run in about a minute): P in {16, 64} x T = 128 x B in {1, 4},
Hq 8, Hkv 2, D 64, fp32; the model cases at hidden 128, 2 layers, B 8, T 64, P 32.
"""

from __future__ import annotations

import copy

import torch

import tunefast
from benchmarks import harness
from tunefast.ops.prefix_attention import prefix_attention

CPU_SIZES = {
    "dtype": torch.float32,
    "attention": dict(heads=8, kv_heads=2, head_dim=64, grid=[(p, 128, b) for p in (16, 64) for b in (1, 4)]),
    "llama": dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1024, batch=8, seq=64, prefix=32),
}
CUDA_SIZES = {
    "dtype": torch.bfloat16,
    "attention": dict(heads=32, kv_heads=8, head_dim=128,
                      grid=[(p, t, b) for p in (16, 64, 256) for t in (512, 2048, 8192) for b in (1, 8)]),
    "llama": dict(hidden=2048, intermediate=5504, layers=4, heads=16, kv_heads=4, vocab=8192, batch=8, seq=2048, prefix=64),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max ||tunefast - PEFT|| / ||PEFT||
MODEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


# ---- the attention op alone ------------------------------------------------------------------------


def visible_pairs(t: int, s: int, causal: bool) -> float:
    """(query, sequence key) pairs that attend: query t sees s <= t + S - T when causal."""
    if not causal:
        return float(t * s)
    return t * (s - t) + t * (t + 1) / 2 if t <= s else s * (s + 1) / 2


def attention_flops(batch, heads, t, s, p, d, causal: bool, backward: bool = False) -> float:
    """Matmul FLOPs actually needed (masked pairs excluded): forward QK^T and PV (2 matmuls, 4 d FLOPs
    per pair); backward QK^T recompute, dV, dP, dQ, dK (5 matmuls, 10 d FLOPs per pair)."""
    pairs = t * p + visible_pairs(t, s, causal)
    return batch * heads * pairs * d * (10.0 if backward else 4.0)


def peft_sdpa(q, k, v, pk, pv):
    """PEFT's prefix through transformers' sdpa integration: cat per batch element, repeat_kv, bool mask."""
    b, hq, t, _ = q.shape
    hkv, p = k.shape[1], pk.shape[1]
    kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2).repeat_interleave(hq // hkv, dim=1)
    vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2).repeat_interleave(hq // hkv, dim=1)
    rows = torch.arange(t, device=q.device)[:, None]
    cols = torch.arange(p + t, device=q.device)[None, :]
    mask = (cols <= rows + p).expand(b, 1, t, p + t)  # transformers materialises it per batch element
    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask.contiguous())


def attention_case(p, t, b, heads, kv_heads, head_dim, dtype, device) -> harness.Case:
    def inputs():
        def leaf(*shape):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

        q = torch.randn(b, t, heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        return (q, leaf(b, kv_heads, t, head_dim), leaf(b, kv_heads, t, head_dim),
                leaf(kv_heads, p, head_dim), leaf(kv_heads, p, head_dim),
                torch.randn(b, heads, t, head_dim, device=device, dtype=dtype))

    def step_for(fn, inp, info=None):
        leaves, grad = inp[:5], inp[5]

        def run():
            for x in leaves:
                x.grad = None
            fn(*leaves).backward(grad)

        def check():
            run()
            out = {"o": fn(*leaves).detach()}
            out.update({f"d{n}": x.grad for n, x in zip(("q", "k", "v", "pk", "pv"), leaves)})
            return out

        return harness.Step(run=run, check=check, info=dict(info or {}))

    def tunefast_setup(inp):
        from tunefast import backend

        def fn(q, k, v, pk, pv):
            return prefix_attention(q, k, v, pk, pv, causal=True)

        return step_for(fn, inp, {"backend": backend.resolve("auto", inp[0].device)})

    def same_length_setup(inp):
        q, k = inp[0], inp[1]
        q2 = torch.randn(b, heads, p + t, head_dim, device=device, dtype=dtype, requires_grad=True)
        k2 = torch.randn(b, kv_heads, p + t, head_dim, device=device, dtype=dtype, requires_grad=True)
        v2 = torch.randn_like(k2, requires_grad=True)
        g2 = torch.randn_like(q2)

        def run():
            for x in (q2, k2, v2):
                x.grad = None
            torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=True).backward(g2)

        return harness.Step(run=run, info={"tokens": p + t})

    return harness.Case(
        suite="prefix", name="attention",
        params=dict(P=p, T=t, B=b, Hq=heads, Hkv=kv_heads, D=head_dim, dtype=dtype),
        variants={"peft_sdpa": lambda inp: step_for(peft_sdpa, inp), "tunefast": tunefast_setup,
                  "sdpa_same_length": same_length_setup},
        inputs=inputs, dtype=dtype,
        flops=attention_flops(b, heads, t, t, p, head_dim, True) + attention_flops(b, heads, t, t, p, head_dim, True, True),
    )


# ---- a small model's training step ----------------------------------------------------------------


def _llama(sizes, dtype, device, family="llama"):
    """family "llama", or "mistral": the same sizes with every layer windowed to sliding_window = T / 2."""
    import transformers as tf

    kw = dict(vocab_size=sizes["vocab"], hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
              num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
              num_key_value_heads=sizes["kv_heads"], max_position_embeddings=sizes["seq"] + sizes["prefix"])
    if family == "mistral":
        cfg, cls = tf.MistralConfig(**kw, sliding_window=sizes["seq"] // 2), tf.MistralForCausalLM
    else:
        cfg, cls = tf.LlamaConfig(**kw), tf.LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    return cls(cfg).to(device=device, dtype=dtype)


def model_flops(hidden, intermediate, layers, heads, kv_heads, vocab, batch, seq, prefix) -> float:
    """Matmul FLOPs of a step with a frozen base: per linear 4 T N K (forward and dx; no weight grads);
    attention over P + causal T keys (forward 4, backward 10 FLOPs per pair and head dim); the LM head."""
    t, d = batch * seq, hidden // heads
    kv = kv_heads * d
    linear = sum(4 * t * n * k for k, n in [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),
                                             (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)])
    attn = attention_flops(batch, heads, seq, seq, prefix, d, True) * 3.5
    return layers * (linear + attn) + 4 * t * vocab * hidden


def _train_step(model, ids, info, labels=None, embeds=None):
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    kw = dict(inputs_embeds=embeds) if embeds is not None else dict(input_ids=ids)
    labels = ids if labels is None else labels

    def run():
        model(**kw, labels=labels).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def check():
        model.eval()
        loss = model(**kw, labels=labels).loss
        loss.backward()
        out = {"loss": loss.detach(), "grads": torch.cat([q.grad.flatten().float() for q in trainable])}
        model.zero_grad(set_to_none=True)
        model.train()
        return out

    return harness.Step.for_module(model, run, check if trainable else None, info)


def _patched(template):
    model = copy.deepcopy(template)
    report = tunefast.patch(model)
    return model, {"kernels": ", ".join(f"{k} x{n}" for k, n in report.kernels().items()) or "-",
                   "skipped": len(report.skipped)}


def llama_case(sizes, dtype, device, family="llama") -> harness.Case:
    import peft

    def inputs():
        template = peft.get_peft_model(_llama(sizes, dtype, device, family), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=sizes["prefix"]))
        ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), device=device)
        return template, ids

    def tunefast_setup(inp):
        model, info = _patched(inp[0])
        assert "prefix_attention" in info["kernels"], f"the prefix model was not patched: {info}"
        return _train_step(model, inp[1], info)

    return harness.Case(
        suite="prefix", name=f"{family}_step", params=dict(sizes, dtype=dtype),
        variants={"peft": lambda inp: _train_step(copy.deepcopy(inp[0]), inp[1], {}), "tunefast": tunefast_setup},
        inputs=inputs, flops=model_flops(**sizes), dtype=dtype, tolerance=MODEL_TOLERANCE[dtype],
    )


def _seq2seq(family, sizes, dtype, device):
    import transformers as tf

    h, heads, layers = sizes["hidden"], sizes["heads"], sizes["layers"]
    if family == "t5":
        cfg = tf.T5Config(vocab_size=sizes["vocab"], d_model=h, d_ff=sizes["intermediate"], d_kv=h // heads,
                          num_layers=layers, num_heads=heads, dropout_rate=0.0, decoder_start_token_id=0)
        cfg._attn_implementation = "eager"
        cls = tf.T5ForConditionalGeneration
    else:
        cfg = tf.BartConfig(vocab_size=sizes["vocab"], d_model=h, encoder_layers=layers, decoder_layers=layers,
                            encoder_attention_heads=heads, decoder_attention_heads=heads,
                            encoder_ffn_dim=sizes["intermediate"], decoder_ffn_dim=sizes["intermediate"],
                            max_position_embeddings=sizes["seq"] + sizes["prefix"] + 2, dropout=0.0,
                            attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None)
        cfg._attn_implementation = "sdpa"
        cls = tf.BartForConditionalGeneration
    return cls(cfg).to(device=device, dtype=dtype)


def seq2seq_case(family, sizes, dtype, device) -> harness.Case:
    import peft

    def inputs():
        template = peft.get_peft_model(_seq2seq(family, sizes, dtype, device), peft.PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=sizes["prefix"]))
        src = torch.randint(3, sizes["vocab"], (sizes["batch"], sizes["seq"]), device=device)
        tgt = torch.randint(3, sizes["vocab"], (sizes["batch"], sizes["seq"]), device=device)
        return template, src, tgt

    def tunefast_setup(inp):
        model, info = _patched(inp[0])
        assert "prefix_attention" in info["kernels"], f"the prefix model was not patched: {info}"
        return _train_step(model, inp[1], info, labels=inp[2])

    return harness.Case(
        suite="prefix", name=f"{family}_step", params=dict(sizes, dtype=dtype),
        variants={"peft": lambda inp: _train_step(copy.deepcopy(inp[0]), inp[1], {}, labels=inp[2]),
                  "tunefast": tunefast_setup},
        inputs=inputs, dtype=dtype, tolerance=MODEL_TOLERANCE[dtype],
    )


def prompt_case(sizes, dtype, device) -> harness.Case:
    """PEFT prompt tuning (kept by the patch) against the plain model on P + T real tokens."""
    import peft

    p = sizes["prefix"]

    def inputs():
        template = peft.get_peft_model(_llama(sizes, dtype, device), peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=p))
        ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), device=device)
        return template, ids

    def tunefast_setup(inp):
        model, info = _patched(inp[0])  # the report keeps PEFT's path (one skip entry with the reason)
        return _train_step(model, inp[1], info)

    def same_length_setup(inp):
        base = copy.deepcopy(inp[0].get_base_model())
        ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"] + p), device=device)
        embeds = base.get_input_embeddings()(ids).detach()  # the frozen embedding's output, like PEFT's prompts
        return _train_step(base, ids, {"tokens": sizes["seq"] + p}, embeds=embeds.requires_grad_())

    return harness.Case(
        suite="prefix", name="prompt_step", params=dict(sizes, dtype=dtype),
        variants={"peft": lambda inp: _train_step(copy.deepcopy(inp[0]), inp[1], {}),
                  "tunefast": tunefast_setup,
                  "plain_same_length": same_length_setup},
        inputs=inputs, flops=model_flops(**{**sizes, "seq": sizes["seq"] + p, "prefix": 0}), dtype=dtype,
    )


def cases(device: torch.device) -> list[harness.Case]:
    sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
    dtype, att = sizes["dtype"], sizes["attention"]
    out = [attention_case(p, t, b, att["heads"], att["kv_heads"], att["head_dim"], dtype, device) for p, t, b in att["grid"]]
    return out + [llama_case(sizes["llama"], dtype, device), llama_case(sizes["llama"], dtype, device, "mistral"),
                  seq2seq_case("t5", sizes["llama"], dtype, device), seq2seq_case("bart", sizes["llama"], dtype, device),
                  prompt_case(sizes["llama"], dtype, device)]


@harness.parametrize(cases(harness.bench_device()))
def test_prefix(case, variant, measure):
    row = measure(case, variant)
    if variant == "tunefast":
        # tolerance checked here, not by Case.tolerance: the same-length variants compute another function
        tol = (TOLERANCE if case.name == "attention" else MODEL_TOLERANCE)[case.params["dtype"]]
        assert row["max_rel_err"] is not None and row["max_rel_err"] <= tol, row
    if variant == "tunefast" and case.name in ("attention", "llama_step", "mistral_step", "t5_step", "bart_step"):
        # no prefix copy per batch element, no K/V repeated per query head, no (T, P + T) mask or scores
        assert row["act_ratio"] < 1.0, row
    if variant == "tunefast" and case.name == "prompt_step":
        assert row["act_ratio"] <= 1.0, row

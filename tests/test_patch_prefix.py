"""tunefast.patch on PEFT prompt-learning models: parity with PEFT, generate, gradient checkpointing,
BERT prefix tuning, report, unpatch."""

import copy

import pytest
import torch

import tunefast
from tests import models as M
from tests import prefix_models as PM
from tests.test_patch_lora import assert_rel_close
from tunefast.patching import prefix as tp
from tunefast.patching import registry


def assert_parity(want, got):
    (logits0, loss0, grads0), (logits1, loss1, grads1) = want, got
    assert_rel_close(logits1, logits0, "logits")
    assert_rel_close(loss1, loss0, "loss")
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert_rel_close(grads1[name], grads0[name], name)


def attention_entries(report):
    """(patched, skipped) entries of attention modules (other handlers, e.g. the LM head's, may patch too)."""
    patched = [e for e in report.patched if e.kernel.startswith("prefix_attention")]
    return patched, [e for e in report.skipped if not e.name.endswith("lm_head")]


def peft_reference(model, inputs, family):
    forward = PM.peft_prefix_encoder_outputs if family == "bert" else None  # PEFT refuses BERT: its own semantics
    return PM.logits_loss_grads(model, inputs, forward)


def test_registry_supports_model_handlers():
    assert hasattr(registry, "register_model"), (
        "tunefast.patching.registry needs register_model / model_handlers and patch()/unpatch() must call them: "
        "prompt learning is patched per model"
    )


# The kernel runs (interpreter) on every family; the projection MLP only changes the prompt encoder, so
# those cases run the reference backend (the interpreter costs ~4 s per tiny-model step).
PARITY = [(f, proj, "triton" if not proj else "reference") for f in PM.PREFIX_FAMILIES for proj in (False, True)]


@pytest.mark.parametrize("family,projection,backend", PARITY, ids=[f"{f}-{'proj' if p else 'emb'}-{b}" for f, p, b in PARITY])
def test_prefix_tuning_parity_with_peft(family, projection, backend):
    model = PM.prefix_model(family, projection=projection)
    patched = copy.deepcopy(model)
    entries, skipped = attention_entries(tunefast.patch(patched, backend=backend))
    assert len(entries) == 2 and not skipped, (entries, skipped)
    assert all(e.kernel == f"prefix_attention[{backend}]" for e in entries)
    inputs = M.batch(family)  # padded batch
    assert_parity(peft_reference(model, inputs, family), PM.logits_loss_grads(patched, inputs))


def test_roberta_parity_with_padding_aware_positions():
    model = PM.roberta_prefix_model()
    patched = copy.deepcopy(model)
    report = tunefast.patch(patched, backend="reference")
    assert len(report.patched) == 2, str(report)
    inputs = M.batch("bert")
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 1)  # RoBERTa's pad id
    assert_parity(PM.logits_loss_grads(model, inputs, PM.peft_prefix_encoder_outputs), PM.logits_loss_grads(patched, inputs))


def test_prefix_changes_the_output_at_all():
    """Guards the parity tests: the prefix is not a no-op."""
    model = PM.prefix_model("llama")
    inputs = M.batch("llama")
    with model.disable_adapter():
        base = model(**inputs).logits
    assert not torch.allclose(model(**inputs).logits, base, atol=1e-3)


@pytest.mark.parametrize("family,backend", [("llama", "triton"), ("gpt2", "reference")])
def test_gradient_checkpointing_matches_peft_without_it(family, backend):
    """PEFT fails here (the recompute pushes the prefix through the cache twice); patched, no cache is used."""
    model = PM.prefix_model(family, projection=True)
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend=backend)
    patched.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = M.batch(family)
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))


def test_reentrant_checkpointing_gets_a_clear_error():
    model = PM.prefix_model("llama")
    tunefast.patch(model, backend="reference")
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant': False"):
        model(**M.batch("llama"))


@pytest.mark.parametrize("family,backend", [("llama", "triton"), ("gpt2", "reference")])
def test_generate_matches_peft(family, backend):
    model = PM.prefix_model(family)
    model.eval()
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend=backend)
    ids = torch.randint(3, M.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding, as for generation
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    want, got = model.generate(**kw), patched.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_prefix_tuning_trains_a_patched_bert():
    """PEFT raises at the first forward ("Model does not support past key values"); patched, it trains."""
    model = PM.prefix_model("bert")
    tunefast.patch(model, backend="reference")  # the kernel's BERT parity is tested above
    inputs = M.batch("bert", bsz=4, seq=8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", ["prompt", "p"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_input_level_methods_keep_peft_path_with_a_reason(family, kind):
    model = PM.prompt_model(family, kind)
    patched = copy.deepcopy(model)
    impl = patched.base_model.config._attn_implementation
    report = tunefast.patch(patched, lm_head=False)  # bitwise: PEFT's head
    head = []
    assert [e.name for e in report.patched] == head and len(report.skipped) == 1
    assert report.skipped[0].name == "prompt_encoder.default"
    assert "PEFT's path is kept" in report.skipped[0].reason
    assert patched.base_model.config._attn_implementation == impl
    inputs = M.batch(family)
    (l0, loss0, g0), (l1, loss1, g1) = PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs)
    assert torch.equal(l0, l1) and torch.equal(loss0, loss1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_unpatch_restores_everything_and_patch_twice_is_a_noop():
    model = PM.prefix_model("qwen2", projection=True)
    model.eval()
    inputs = M.batch("qwen2")
    before = model(**inputs).logits
    cls, impl = type(model), model.base_model.config._attn_implementation
    first = tunefast.patch(model)
    assert type(model) is not cls and model.base_model.config._attn_implementation == "tunefast_prefix_auto"
    assert tunefast.patch(model) is first
    tunefast.unpatch(model)
    assert type(model) is cls and model.base_model.config._attn_implementation == impl
    assert tp._STATE not in model.__dict__ and tunefast.get_report(model) is None
    assert torch.equal(model(**inputs).logits, before)


def _registered(name):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return [name in AttentionInterface._global_mapping, name in AttentionMaskInterface._global_mapping]


def test_the_attention_registration_lives_as_long_as_a_patched_model():
    """transformers' attention table is process-wide: the name stays while any patched model (a deep copy
    included) uses it, and goes with the last unpatch or garbage collection."""
    import gc

    from tunefast.patching import prefix_interface

    name = "tunefast_prefix_reference"
    gc.collect()
    base = prefix_interface._holds.get(name, 0)  # patched models other tests of this process still hold

    def holds(n):
        assert prefix_interface._holds.get(name, 0) == base + n
        assert _registered(name) == [base + n > 0] * 2

    model = PM.prefix_model("llama")
    model.eval()
    inputs = M.batch("llama")
    want = model(**inputs).logits
    holds(0)
    tunefast.patch(model, backend="reference", lm_head=False)
    holds(1)
    twin = copy.deepcopy(model)
    holds(2)
    tunefast.unpatch(model)
    holds(1)  # the copy still runs through it
    assert_rel_close(twin(**inputs).logits, want, "logits of the patched copy")
    tunefast.unpatch(twin)
    holds(0)
    assert torch.equal(model(**inputs).logits, want) and torch.equal(twin(**inputs).logits, want)
    tunefast.patch(model, backend="reference", lm_head=False)
    holds(1)
    del model
    gc.collect()
    holds(0)


def test_disabled_adapter_runs_the_base_model():
    model = PM.prefix_model("llama")
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="triton", lm_head=False)  # compares training logits
    inputs = M.batch("llama")  # right padding: every query sees a key
    with model.disable_adapter(), patched.disable_adapter():
        torch.testing.assert_close(patched(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_report_gives_reasons_when_the_model_cannot_be_patched(monkeypatch):
    cases = [
        (PM.sliding_window_prefix_model("gemma2", 6, attn_logit_softcapping=50.0),
         "soft-capping (attn_logit_softcapping=50.0)"),
        (PM.sliding_window_prefix_model("gemma3", 6, use_bidirectional_attention=True), "bidirectional sliding"),
    ]
    base = M.base_model("llama")
    base.config.attention_chunk_size = 8  # Llama 4's chunked local attention
    cases.append((PM.prefix_model("llama", base=base), "chunked local attention (attention_chunk_size=8)"))
    for model, reason in cases:
        patched, skipped = attention_entries(tunefast.patch(model))
        assert not patched and len(skipped) == 2 and all(reason in e.reason for e in skipped), (reason, skipped)
    # an attention module that does not call the attention interface blocks the whole model
    real = tp._calls_attention_interface
    monkeypatch.setattr(tp, "_calls_attention_interface", lambda cls: real(cls) and cls.__name__ != "GPT2Attention")
    model = PM.prefix_model("gpt2")
    impl = model.base_model.config._attn_implementation
    patched, skipped = attention_entries(tunefast.patch(model))
    assert not patched and skipped
    assert all("does not call transformers' attention interface" in e.reason for e in skipped), skipped
    assert model.base_model.config._attn_implementation == impl


def _bert_with_attention_dropout(p=0.1):
    base = M.base_model("bert")
    for layer in base.bert.encoder.layer:
        layer.attention.self.dropout.p = p
    return PM.prefix_model("bert", base=base, projection=True)


def test_attention_dropout_runs_in_the_kernel_and_checkpointing_regenerates_it():
    """Dropout in training: reported; eval mode is dropout-free; with the same torch seed, a checkpointed
    step (whose recompute draws the mask again) gives the same loss and gradients as a plain one."""
    model = _bert_with_attention_dropout()
    report = tunefast.patch(model, backend="triton")
    assert all("attention dropout 0.1 in the kernel" in e.detail for e in report.patched), str(report)
    inputs = M.batch("bert")
    model.eval()
    with torch.no_grad():
        eval_loss = model(**inputs).loss
    model.train()
    torch.manual_seed(3)
    plain = PM.logits_loss_grads(model, inputs)
    torch.manual_seed(4)
    other = PM.logits_loss_grads(model, inputs)
    assert not torch.allclose(plain[1], eval_loss) and not torch.allclose(plain[1], other[1])
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)
    assert_parity(plain, PM.logits_loss_grads(model, inputs))


def test_autocast_matches_peft_under_autocast():
    model = PM.prefix_model("llama", projection=True)
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="reference", lm_head=False)  # compares training logits
    inputs = M.batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(**inputs), patched(**inputs)
    assert got.logits.dtype == want.logits.dtype
    torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=0.05, atol=0.05)


def test_compile_patched_prefix_model():
    model = PM.prefix_model("llama", projection=True)
    tunefast.patch(model, backend="reference")
    inputs = M.batch("llama")
    eager = PM.logits_loss_grads(model, inputs)
    compiled = torch.compile(model, backend="aot_eager")
    logits, loss, _ = PM.logits_loss_grads(compiled, inputs)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_parity(eager, (logits, loss, grads))


def test_prefix_is_computed_once_not_per_batch_element():
    """The prefix handed to the attention is one (L, 2, Hkv, P, D) view, whatever the batch size."""
    model = PM.prefix_model("llama", projection=True)
    tunefast.patch(model)
    prefix = tp.layer_prefix(model)
    cfg = model.active_peft_config
    assert prefix.shape == (cfg.num_layers, 2, 2, cfg.num_virtual_tokens, 16)
    assert prefix.untyped_storage().nbytes() == prefix.numel() * prefix.element_size()


# ----------------------------------------------------------------------------------------------------
# Sliding-window layers
# ----------------------------------------------------------------------------------------------------

# Windows with the P = 5 prefix and T = 9 tokens: 16 >= P + T (every key inside: below the window),
# 6 (the prefix drops out of the window of later queries: above it), 4 < P (PEFT's sliding cache for
# Gemma keeps only the last W - 1 = 3 prefix tokens).
SLIDING = [(f, w) for f in PM.SLIDING_FAMILIES for w in (16, 6, 4)]


@pytest.mark.parametrize("family,window", SLIDING, ids=[f"{f}-w{w}" for f, w in SLIDING])
def test_sliding_window_parity_with_peft(family, window):
    model = PM.sliding_window_prefix_model(family, window)
    patched = copy.deepcopy(model)
    patched_entries, skipped = attention_entries(tunefast.patch(patched, backend="triton"))
    assert len(patched_entries) == 2 and not skipped, (patched_entries, skipped)
    assert any(f"sliding window {window}" in e.detail for e in patched_entries), patched_entries
    inputs = M.batch("llama")
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))


def test_sliding_window_counts_the_prefix_positions(monkeypatch):
    """Guards the semantics: PEFT's cache puts the prefix inside the window, so a kernel that kept the
    prefix always visible would differ from PEFT once T + P > W (here W = 6, P = 5, T = 9)."""
    import functools

    from tunefast.patching import prefix_interface

    model = PM.sliding_window_prefix_model("mistral", 6)
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="reference")
    inputs = M.batch("llama")
    inputs.pop("labels")
    want = model(**inputs).logits
    torch.testing.assert_close(patched(**inputs).logits, want, rtol=1e-5, atol=1e-5)
    always = functools.partial(prefix_interface.prefix_attention, window_counts_prefix=False)
    monkeypatch.setattr(prefix_interface, "prefix_attention", always)
    assert not torch.allclose(patched(**inputs).logits, want, atol=1e-3)


@pytest.mark.parametrize("family,window,backend", [("mistral", 4096, "triton"), ("gemma2", 6, "reference")])
def test_sliding_window_gradient_checkpointing(family, window, backend):
    """Mistral's default config (sliding_window=4096) with prefix tuning and gradient
    checkpointing crashed (PEFT's own path: "The size of tensor a (9) must match the size of tensor b
    (14)"); patched, it equals PEFT without checkpointing."""
    model = PM.sliding_window_prefix_model(family, window, projection=True)
    patched = copy.deepcopy(model)
    patched_entries, skipped = attention_entries(tunefast.patch(patched, backend=backend))
    assert len(patched_entries) == 2 and not skipped, (patched_entries, skipped)
    patched.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    inputs = M.batch("llama")
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_generate_matches_peft(family):
    """Prompt 6 + prefix 5 + 4 new tokens run past the window of 6 while decoding."""
    model = PM.sliding_window_prefix_model(family, 6)
    model.eval()
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="triton")
    ids = torch.randint(3, M.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    want, got = model.generate(**kw), patched.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Encoder-decoders: PEFT's prefix reaches decoder self-attention only
# ----------------------------------------------------------------------------------------------------


SEQ2SEQ = [("bart", False, "triton"), ("bart", True, "reference"), ("t5", False, "reference"), ("t5", True, "triton")]


def seq2seq_model(family, projection=False):
    return PM.bart_prefix_model(projection=projection) if family == "bart" else PM.t5_prefix_model(projection=projection)


@pytest.mark.parametrize("family,projection,backend", SEQ2SEQ, ids=[f"{f}-{'proj' if p else 'emb'}-{b}" for f, p, b in SEQ2SEQ])
def test_seq2seq_prefix_parity_with_peft(family, projection, backend):
    """T5: no scaling, relative position bias over the prefix and decoder keys (the op's batch-shared bias)."""
    model = seq2seq_model(family, projection)
    patched = copy.deepcopy(model)
    entries, skipped = attention_entries(tunefast.patch(patched, backend=backend))
    assert len(entries) == 6 and not skipped, (entries, skipped)  # encoder self, decoder self, cross x 2 layers
    assert sum("prefix 5" in e.detail for e in entries) == 2, entries  # decoder self-attention only
    inputs = PM.seq2seq_batch()
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_gradient_checkpointing_matches_peft_without_it(family):
    model = seq2seq_model(family, projection=True)
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="reference")
    patched.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.train()
    inputs = PM.seq2seq_batch()
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_generate_matches_peft(family):
    model = seq2seq_model(family)
    model.eval()
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="triton")
    inputs = PM.seq2seq_batch()
    PM.assert_same_greedy(model, patched, inputs)

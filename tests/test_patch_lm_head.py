"""tunefast.patch fuses the LM-head loss of Hugging Face causal LMs: same loss and gradients as unpatched
PEFT in training, untouched logits and generation in eval, reversible.

Families: Llama (untied and tied heads), Qwen2, GPT-2 (tied, Conv1D body), Gemma-2 (final logit
softcapping), BioGPT (head called ``output_projection``), all tiny and built from configs.
"""

import copy

import peft
import pytest
import torch
import transformers as tf

import tunefast
from tests import models as M
from tests import prefix_models as PM
from tunefast.patching import lm_head
from tunefast.profiling import SavedTensors

LOSS_RTOL, GRAD_TOL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _fused_head_on(monkeypatch):
    monkeypatch.setenv(lm_head.ENABLE_ENV, "1")  # opt-in for now (see tunefast/patching/lm_head.py)

EXTRA_FAMILIES = {
    "llama_tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=M.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=M.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, final_logit_softcapping=3.0,
        sliding_window=8)),
    "biogpt": lambda: tf.BioGptForCausalLM(tf.BioGptConfig(
        vocab_size=M.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layerdrop=0.0)),
}
FAMILIES = ["llama", "llama_tied", "qwen2", "gpt2", "gemma2", "biogpt"]
TARGETS = {"gpt2": ["c_attn"], "biogpt": ["q_proj", "v_proj"]}


def base(family, seed=0):
    if family not in EXTRA_FAMILIES:
        return M.base_model(family, seed=seed)
    torch.manual_seed(seed)
    model = EXTRA_FAMILIES[family]()
    model.config._attn_implementation = "eager"
    return model


def lora(family, targets=None, seed=0, **extra):
    model = base(family, seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or TARGETS.get(family, ["q_proj", "v_proj"]),
                          init_lora_weights=False, task_type="CAUSAL_LM", fan_in_fan_out=family == "gpt2", **extra)
    torch.manual_seed(seed + 100)
    return peft.get_peft_model(model, cfg)


def step(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_training_step(patched, reference, inputs):
    out, grads = step(patched, inputs)
    want, want_grads = step(reference, inputs)
    assert out.logits is None and want.logits is not None
    torch.testing.assert_close(out.loss, want.loss, rtol=LOSS_RTOL, atol=0)
    assert grads.keys() == want_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=GRAD_TOL, atol=GRAD_TOL * want_grads[name].abs().max())


def head_entries(report):
    return [e for e in report.patched if e.kernel.startswith("linear_cross_entropy")], [
        e for e in report.skipped if "head" in e.reason or "loss" in e.reason]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_and_grads_equal_unpatched_peft(family, backend):
    reference = lora(family)
    model = copy.deepcopy(reference)
    report = tunefast.patch(model, backend=backend)
    patched, _ = head_entries(report)
    head_name = {"biogpt": "output_projection"}.get(family, "lm_head")
    assert [e.name for e in patched] == [f"base_model.model.{head_name}"], report
    if family == "gemma2":
        assert "softcap 3" in patched[0].detail
    if family in ("llama_tied", "gpt2"):
        assert "tied" in patched[0].detail
    model.train(), reference.train()
    assert_same_training_step(model, reference, M.batch("llama"))


def test_num_items_in_batch_and_trainable_tied_embeddings():
    """Trainer's gradient-accumulation normaliser, and a head that trains (tied to trainable embeddings)."""
    reference = lora("llama_tied", modules_to_save=None)
    reference.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    model = copy.deepcopy(reference)
    tunefast.patch(model, backend="reference")
    model.train(), reference.train()
    inputs = dict(M.batch("llama"), num_items_in_batch=torch.tensor(23))
    assert_same_training_step(model, reference, inputs)
    _, grads = step(model, inputs)
    assert any("embed_tokens" in n for n in grads)


def test_eval_logits_and_greedy_generation_unchanged():
    reference = lora("gemma2")
    model = copy.deepcopy(reference)
    tunefast.patch(model, backend="reference")
    model.eval(), reference.eval()
    inputs = M.batch("llama")
    with torch.no_grad():
        out, want = model(**inputs), reference(**inputs)
    assert torch.equal(out.logits, want.logits) and torch.equal(out.loss, want.loss)
    model.train()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    assert torch.equal(model(**no_labels).logits, reference(**no_labels).logits)  # no labels: full logits
    model.eval()
    prompt = inputs["input_ids"][1:, :4]
    gen = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen, reference.generate(input_ids=prompt, max_new_tokens=5, do_sample=False))


def test_gradient_checkpointing_and_no_logits_kept():
    reference = lora("qwen2")
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference.enable_input_require_grads()
    model = copy.deepcopy(reference)
    tunefast.patch(model, backend="reference")
    model.train(), reference.train()
    inputs = M.batch("llama", bsz=2, seq=9)
    assert_same_training_step(model, reference, inputs)
    tokens, vocab = inputs["input_ids"].numel(), M.VOCAB
    for m, logits_kept in ((model, False), (reference, True)):
        params = list(m.parameters())
        with SavedTensors(exclude=params) as rec:
            out = m(**inputs)
        has_logits = any(t.shape[-1] == vocab and t[..., 0].numel() >= tokens for t in rec.tensors if t.dim())
        assert has_logits == logits_kept
        del out


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prompt_learning_models(kind):
    reference = PM.prefix_model("llama") if kind == "prefix" else PM.prompt_model("llama", "prompt")
    model = copy.deepcopy(reference)
    report = tunefast.patch(model, backend="reference")
    assert len(head_entries(report)[0]) == 1, report
    model.train(), reference.train()
    assert_same_training_step(model, reference, M.batch("llama"))


def test_sparse_delta_model():
    from tunefast import sparse

    reference = sparse.apply(base("llama"), sparse.SparseConfig(density=0.05, target_modules=["q_proj", "v_proj"]))
    for p in sparse.trainable_parameters(reference):
        torch.nn.init.normal_(p, std=0.02)
    model = copy.deepcopy(reference)
    report = tunefast.patch(model, backend="reference")
    assert len(head_entries(report)[0]) == 1, report
    model.train(), reference.train()
    assert_same_training_step(model, reference, M.batch("llama"))


def test_lora_on_the_head_is_skipped_with_a_reason():
    reference = lora("llama", targets=["q_proj", "lm_head"])
    model = copy.deepcopy(reference)
    report = tunefast.patch(model, backend="reference")
    skipped = [e for e in report.skipped if e.name.endswith("lm_head") and "LoRA" in e.reason]
    assert len(skipped) == 1, report
    model.train(), reference.train()
    out, _ = step(model, M.batch("llama"))
    assert out.logits is not None  # PEFT's own head and loss ran


def test_unknown_logit_post_processing_is_skipped():
    class ClampedLlama(tf.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            logits = self.lm_head(hidden)
            logits = logits.clamp(-1, 1)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            return tf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    ClampedLlama.__name__ = "LlamaForCausalLM"  # a causal LM class by name, with its own forward
    model = ClampedLlama(M.FAMILIES["llama"][0]())
    report = tunefast.patch(model, backend="reference")
    assert any("logits.clamp" in e.reason for e in report.skipped), report


def test_unpatch_restores_the_forward():
    model = lora("llama")
    lm = model.base_model.model
    original = type(lm)
    tunefast.patch(model, backend="reference")
    assert type(lm) is not original and lm_head._STATE in lm.__dict__
    tunefast.unpatch(model)
    assert type(lm) is original and lm_head._STATE not in lm.__dict__
    model.train()
    assert model(**M.batch("llama")).logits is not None


def test_off_without_the_opt_in(monkeypatch):
    monkeypatch.delenv(lm_head.ENABLE_ENV)
    report = tunefast.patch(lora("llama"), backend="reference")
    assert head_entries(report) == ([], [])

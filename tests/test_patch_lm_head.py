"""tunefast.patch fuses the LM-head loss of Hugging Face causal LMs (on by default): same loss and
gradients as unpatched PEFT in training, untouched logits and generation in eval, PEFT's plain model
back from merge_and_unload / unload, PEFT's path for dtypes the op lacks, reversible.

Families: Llama (untied and tied heads), Qwen2, GPT-2 (tied, Conv1D body), Gemma-2 (final logit
softcapping), BioGPT (head called ``output_projection``), all tiny and built from configs.
"""

import copy
import inspect
import threading

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
def _no_env_override(monkeypatch):
    monkeypatch.delenv(lm_head.ENABLE_ENV, raising=False)  # the default (on) is what these tests check

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


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_unpatch_restores_the_forward(kind):
    """LoRA: PEFT's tuner (LoraModel) is the swapped module, so unloading leaves nothing behind; prompt
    learning: the causal LM itself."""
    model = lora("llama") if kind == "lora" else _prompt_learning(kind)
    swapped = model.base_model
    original = type(swapped)
    tunefast.patch(model, backend="reference")
    assert type(swapped) is not original and lm_head._STATE in swapped.__dict__
    tunefast.unpatch(model)
    assert type(swapped) is original and not any(lm_head._STATE in vars(m) for m in model.modules())
    model.train()
    assert model(**M.batch("llama")).logits is not None


def _prompt_learning(kind):
    if kind == "prefix":
        return PM.prefix_model("llama")
    return PM.prompt_model("llama", {"prompt": "prompt", "p_tuning": "p_tuning"}[kind])


def test_lm_head_false_and_the_env_override_leave_the_head_alone(monkeypatch):
    for off in ("argument", "env"):
        model = lora("llama")
        lm, tuner = model.base_model.model, model.base_model
        classes = (type(lm), type(tuner))
        if off == "env":
            monkeypatch.setenv(lm_head.ENABLE_ENV, "0")
        report = tunefast.patch(model, backend="reference", lm_head=off == "env")
        assert head_entries(report) == ([], []) and len(report.patched) == 4, report
        assert (type(lm), type(tuner)) == classes and not lm_head.is_fused(model)
        model.train()
        assert model(**M.batch("llama")).logits is not None
        monkeypatch.delenv(lm_head.ENABLE_ENV, raising=False)
    fused = lora("llama")
    tunefast.patch(fused, backend="reference")
    with pytest.raises(ValueError, match="lm_head=False"):
        tunefast.patch(fused, backend="reference", lm_head=False)


@pytest.mark.parametrize("dtype", [torch.float64])
def test_dtype_the_op_lacks_runs_peft_head_per_call(dtype):
    """Moved to float64 after patch: PEFT's head and loss run (logits returned); back to fp32: fused again."""
    reference = lora("llama")
    model = copy.deepcopy(reference)
    tunefast.patch(model, backend="reference")
    inputs = M.batch("llama")
    for m in (model, reference):
        m.to(dtype).train()
    out, grads = step(model, inputs)
    want, want_grads = step(reference, inputs)
    assert out.logits is not None and out.logits.dtype == dtype  # PEFT's head ran (HF's loss is fp32 anyway)
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)
    assert grads.keys() == want_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-10, atol=1e-12)
    for m in (model, reference):
        m.to(torch.float32)
    assert_same_training_step(model, reference, inputs)


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_merge_and_unload_returns_the_plain_transformers_model(unload):
    reference = lora("llama")
    model = copy.deepcopy(reference)
    tunefast.patch(model, backend="reference")
    model.train(), reference.train()
    assert_same_training_step(model, reference, M.batch("llama"))  # fused before unloading
    plain, want = getattr(model, unload)(), getattr(reference, unload)()
    assert type(plain) is type(want) is tf.LlamaForCausalLM
    assert type(plain.lm_head) is torch.nn.Linear and "forward" not in vars(plain.lm_head)
    assert not any(lm_head._STATE in vars(m) for m in plain.modules())
    plain.train(), want.train()
    inputs = M.batch("llama")
    out, got = plain(**inputs), want(**inputs)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, got.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, got.loss, rtol=LOSS_RTOL, atol=0)
    tunefast.unpatch(model)  # the PeftModel it came from still unpatches cleanly
    assert type(model.base_model) is peft.LoraModel


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt", "p_tuning"])
def test_eval_forward_and_generate_equal_peft(kind):
    """Eval forwards (with and without labels) give PEFT's logits and loss; greedy generate() gives PEFT's
    tokens, in eval and in training mode (generate never passes labels)."""
    reference = lora("llama") if kind == "lora" else _prompt_learning(kind)
    model = copy.deepcopy(reference)
    report = tunefast.patch(model, backend="reference")
    assert len(head_entries(report)[0]) == 1, report
    inputs = M.batch("llama")
    model.eval(), reference.eval()
    with torch.no_grad():
        out, want = model(**inputs), reference(**inputs)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, want.loss, rtol=LOSS_RTOL, atol=0)
    prompt = inputs["input_ids"][1:, :4]
    for mode in ("eval", "train"):
        model.train(mode == "train"), reference.train(mode == "train")
        with torch.no_grad():
            gen = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
            assert torch.equal(gen, reference.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)), mode
    model.train(), reference.train()
    assert_same_training_step(model, reference, inputs)


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_forward_signature_seen_by_trainer_and_generate(kind):
    """Trainer keeps the dataset columns the base model's forward names (a bare (*args, **kwargs) made it
    drop input_ids); generate() validates its arguments against the same signature."""
    model = lora("llama") if kind == "lora" else _prompt_learning(kind)
    want = list(inspect.signature(model.get_base_model().forward).parameters)
    tunefast.patch(model, backend="reference")
    got = list(inspect.signature(model.get_base_model().forward).parameters)
    assert got == want and "input_ids" in got and "labels" in got


def test_prompt_tuning_trainer_steps_equal_peft(tmp_path):
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, M.VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    losses = []
    for patched in (False, True):
        model = _prompt_learning("prompt")
        if patched:
            tunefast.patch(model, backend="reference")
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 seed=0, data_seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[1]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_threads_share_a_patched_model():
    """A fused training forward in one thread and eval forwards of the same model in others: each gets
    what it would get alone (the head's input is captured for the calling thread only)."""
    reference = lora("llama")
    model = copy.deepcopy(reference)
    tunefast.patch(model, backend="reference")
    inputs = M.batch("llama")
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    model.train(), reference.train()
    with torch.no_grad():
        want_loss, want_logits = reference(**inputs).loss, reference(**no_labels).logits
    results, errors = [], []

    def work(i):
        try:
            for _ in range(3):
                with torch.no_grad():
                    out = model(**(inputs if i % 2 == 0 else no_labels))
                results.append((i % 2, out.loss if i % 2 == 0 else out.logits))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 12
    for labels, value in results:
        torch.testing.assert_close(value, want_loss if labels == 0 else want_logits, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model.base_model.model.lm_head)


def test_vocabulary_not_larger_than_hidden_is_skipped():
    """The fused loss keeps (N, H); with V <= H PEFT's (N, V) logits are no bigger: skipped, PEFT's path."""
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2))
    report = tunefast.patch(model, backend="reference")
    assert [e.name for e in report.skipped if "vocabulary 48 <= hidden size 64" in e.reason] == ["lm_head"], report
    model.train()
    ids = torch.randint(0, 48, (2, 6))
    assert model(input_ids=ids, labels=ids).logits is not None

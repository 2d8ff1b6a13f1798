"""tunefast.patch on PEFT LoRA models: parity with unpatched PEFT, report, unpatch, save, bad input."""

import os

import peft
import pytest
import torch

import tunefast
from tests import models as M

BACKENDS = ["triton", "reference"]
FP32_RTOL = 1e-5


def assert_rel_close(got, want, what, floor=0.0):
    """Relative error ||got - want|| / ||want|| <= FP32_RTOL (norm-wise, not elementwise).

    ``floor`` (a norm) covers gradients that are token sums with heavy cancellation, ~0 in exact
    arithmetic (a key projection's bias: softmax ignores a per-query constant, up to RoPE), where
    summation order alone moves the result by more than 1e-5 of its own tiny norm.
    """
    err = (got.double() - want.double()).norm().item()
    scale = max(want.double().norm().item(), floor, 1e-12)
    assert err <= FP32_RTOL * scale, f"{what}: relative error {err / scale:.3g} (norm {scale:.3g})"


def assert_parity(reference, patched, inputs, min_grads=1):
    logits0, loss0, grads0 = M.logits_loss_grads(reference, inputs)
    logits1, loss1, grads1 = M.logits_loss_grads(patched, inputs)
    assert_rel_close(logits1, logits0, "logits")
    assert_rel_close(loss1, loss0, "loss")
    assert grads0.keys() == grads1.keys() and len(grads0) >= min_grads
    # bias gradients are token sums; a few (k_proj's) nearly cancel: measure those against 1% of
    # the largest gradient norm in the model instead of their own tiny norm
    bias_floor = 0.01 * max(g.norm().item() for g in grads0.values())
    for name in grads0:
        assert_rel_close(grads1[name], grads0[name], name, bias_floor if name.endswith("bias") else 0.0)


def _is_head(entry):
    """The fused LM-head loss's report entry (tunefast/patching/lm_head.py), on by default."""
    return entry.kernel.startswith("linear_cross_entropy[")


PARITY = [(fam, i) for fam, (_, _, targets) in M.FAMILIES.items() for i in range(len(targets))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,targets_idx", PARITY, ids=[f"{f}-t{i}" for f, i in PARITY])
def test_parity_with_peft(family, targets_idx, backend):
    targets = M.FAMILIES[family][2][targets_idx]
    model = M.peft_model(family, targets, bias="lora_only" if targets_idx else "none")
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert report.patched and not report.skipped, str(report)
    assert all(e.kernel == f"lora_linear[{backend}]" for e in report.patched if not _is_head(e))
    assert_parity(model, patched, M.batch(family))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])  # PEFT allows one active adapter with a classifier head
def test_parity_two_active_adapters_lora_bias_rslora(family, backend):
    model = M.peft_model(family, M.FAMILIES[family][2][0], adapters=("task", "lang"), lora_bias=True, use_rslora=True)
    active = model.base_model.active_adapters
    assert sorted(active) == ["lang", "task"]
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert "task: r=8, lang: r=12" in report.patched[0].detail
    assert_parity(model, patched, M.batch(family))


def test_lora_changes_the_output_at_all():
    """Guards the parity tests: the adapters used there are not a no-op."""
    model = M.peft_model("llama")
    inputs = M.batch("llama")
    with model.disable_adapter():
        base = model(**inputs).logits
    assert not torch.allclose(model(**inputs).logits, base, atol=1e-3)


def test_unpatch_restores_bit_identical_outputs():
    model = M.peft_model("qwen2", dropout=0.1)
    model.eval()
    inputs = M.batch("qwen2")
    before = model(**inputs).logits
    classes = {n: type(m) for n, m in model.named_modules()}
    tunefast.patch(model)
    assert any(type(m) is not classes[n] for n, m in model.named_modules())
    tunefast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert torch.equal(model(**inputs).logits, before)
    assert tunefast.get_report(model) is None


def test_patch_twice_is_a_noop_and_other_backend_is_refused():
    model = M.peft_model("llama")
    first = tunefast.patch(model, backend="reference")
    classes = [type(m) for m in model.modules()]
    assert tunefast.patch(model, backend="reference") is first
    assert [type(m) for m in model.modules()] == classes
    with pytest.raises(ValueError, match="already patched"):
        tunefast.patch(model, backend="triton")


def test_report_lists_skipped_layers_with_reasons():
    model = M.peft_model("llama", ["q_proj", "v_proj", "embed_tokens"])
    report = tunefast.patch(model)
    # LoRA on nn.Embedding is patched since the low-rank family handlers (tunefast/patching/lowrank.py);
    # skip reasons are asserted in test_unsupported_variants_are_skipped_and_keep_peft_behaviour
    assert any(e.name.endswith("embed_tokens") and e.kernel.startswith("lora_embedding[") for e in report.patched)
    assert len(report.patched) == 6  # 5 LoRA layers + the fused LM head
    text = str(report)
    assert "patched" in text and "embed_tokens" in text and "lora_linear[" in text


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_dora_parity_with_peft(family, targets, backend):
    model = M.peft_model(family, targets, use_dora=True, bias="lora_only")
    with torch.no_grad():  # a trained magnitude, not the norm it was initialised to
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert report.patched and not report.skipped, str(report)
    assert all(e.kernel == f"dora_linear[{backend}]" for e in report.patched if not _is_head(e))
    assert_parity(model, patched, M.batch(family))


def test_dora_with_dropout_trains_through_peft_and_evaluates_fused():
    model = M.peft_model("llama", ["q_proj", "v_proj"], use_dora=True, dropout=0.1)
    patched = M.clone(model)
    report = tunefast.patch(patched, lm_head=False)  # bitwise loss: PEFT's head
    assert all("lora_dropout > 0" in e.detail for e in report.patched if not _is_head(e))
    inputs = M.batch("llama")
    model.train(), patched.train()
    torch.manual_seed(3)
    want = model(**inputs).loss
    torch.manual_seed(3)
    assert torch.equal(patched(**inputs).loss, want)  # PEFT's forward, same RNG stream: bit-identical
    model.eval(), patched.eval()
    assert_parity(model, patched, inputs)


def test_unsupported_variants_are_skipped_and_keep_peft_behaviour():
    model = M.peft_model("llama", ["q_proj", "v_proj"], use_dora=True, adapters=("a", "b"))
    patched = M.clone(model)
    report = tunefast.patch(patched)
    assert [e.name for e in report.patched] == ["base_model.model.lm_head"] and len(report.skipped) == 4  # the head
    assert all("single adapter" in e.reason for e in report.skipped)
    assert_parity(model, patched, M.batch("llama"))


def test_merged_disabled_and_mixed_batches_keep_peft_behaviour():
    model = M.peft_model("llama", ["q_proj", "v_proj"], adapters=("a", "b"))
    model.base_model.set_adapter("a")
    inputs = M.batch("llama")
    patched = M.clone(model)
    tunefast.patch(patched)
    model.eval(), patched.eval()
    # mixed-adapter batch: one adapter per row (the routed op on the patched model)
    names = ["a", "b"]
    want = model(input_ids=inputs["input_ids"], adapter_names=names).logits
    got = patched(input_ids=inputs["input_ids"], adapter_names=names).logits
    assert_rel_close(got, want, "mixed-batch logits")
    with model.disable_adapter(), patched.disable_adapter():
        assert torch.equal(patched(input_ids=inputs["input_ids"]).logits, model(input_ids=inputs["input_ids"]).logits)
    # merged before patching: reported, PEFT's forward runs, fused path resumes after unmerge
    merged = M.clone(model)
    merged.merge_adapter()
    report = tunefast.patch(merged)
    assert report.skipped and all("merged" in e.reason for e in report.skipped)
    torch.testing.assert_close(merged(input_ids=inputs["input_ids"]).logits, model(input_ids=inputs["input_ids"]).logits,
                               rtol=1e-4, atol=1e-4)
    merged.unmerge_adapter()
    assert_parity(model, merged, inputs)


def test_save_pretrained_writes_the_same_files(tmp_path):
    model = M.peft_model("gpt2", ["c_attn"])
    model.save_pretrained(tmp_path / "plain")
    tunefast.patch(model)
    model.save_pretrained(tmp_path / "patched")
    files = sorted(os.listdir(tmp_path / "plain"))
    assert files == sorted(os.listdir(tmp_path / "patched"))
    for f in files:
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "patched" / f).read_bytes(), f
    loaded = peft.PeftModel.from_pretrained(M.base_model("gpt2"), tmp_path / "patched")
    tunefast.patch(loaded)
    inputs = M.batch("gpt2")
    loaded.eval(), model.eval()
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_checkpointing_redraws_the_same_dropout_masks(backend):
    """With dropout, a checkpointed recompute must draw the masks of the original forward."""
    model = M.peft_model("llama", dropout=0.2)
    model.train()
    inputs = M.batch("llama")
    tunefast.patch(model, backend=backend)
    torch.manual_seed(5)
    _, loss0, grads0 = M.logits_loss_grads(model, inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(5)
    _, loss1, grads1 = M.logits_loss_grads(model, inputs)
    assert_rel_close(loss1, loss0, "loss")
    for n in grads0:
        assert_rel_close(grads1[n], grads0[n], n)


def test_autocast_matches_peft_under_autocast():
    model = M.peft_model("llama")
    patched = M.clone(model)
    tunefast.patch(patched, lm_head=False)  # compares training logits
    inputs = M.batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**inputs)
        got = patched(**inputs)
    assert got.logits.dtype == want.logits.dtype
    torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda m: tunefast.patch("gpt2"), TypeError, "model must be a torch.nn.Module"),
        (lambda m: tunefast.patch(m, backend="cuda"), ValueError, "backend must be one of"),
        (lambda m: tunefast.unpatch(42), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(M.peft_model("llama", ["q_proj"]))


def test_triton_unavailable_is_reported(monkeypatch):
    from tunefast import backend as bk

    monkeypatch.setattr(bk, "interpreter_on", lambda: False)
    with pytest.raises(bk.BackendUnavailableError, match="TRITON_INTERPRET"):
        tunefast.patch(M.peft_model("llama", ["q_proj"]), backend="triton")
    report = tunefast.patch(M.peft_model("llama", ["q_proj"]), backend="auto")
    # without Triton, auto runs the reference math with the native dropout kernels when built
    from tunefast import _native

    want = "lora_linear[native]" if _native.CPU_AVAILABLE else "lora_linear[reference]"
    assert all(e.kernel == want for e in report.patched if not _is_head(e))


def test_meta_weights_are_refused():
    with torch.device("meta"):
        base = M.FAMILIES["llama"][1](M.FAMILIES["llama"][0]())
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="meta"):
        tunefast.patch(model)


def test_model_without_peft_layers_warns():
    with pytest.warns(UserWarning, match="no PEFT layers"):
        report = tunefast.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    assert not report.patched and not report.skipped


def test_compile_patched_model():
    model = M.peft_model("llama", ["q_proj", "v_proj"])
    tunefast.patch(model, lm_head=False)  # compiled: PEFT's head; eager would fuse it
    inputs = M.batch("llama")
    eager = model(**inputs).logits
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs).logits, eager, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_patched_layer_inductor():
    model = M.peft_model("llama", ["q_proj"])
    tunefast.patch(model, backend="reference")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_adapter_batches_train_through_the_routed_op(backend):
    """PEFT's adapter_names batches, forward and backward: each adapter gets its own rows' gradients.
    (PEFT refuses adapter_names in training mode, so eval mode; gradients flow all the same.)"""
    model = M.peft_model("llama", "all-linear", adapters=("x", "y", "z"))
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    patched = M.clone(model)
    tunefast.patch(patched, backend=backend)
    inputs = M.batch("llama", bsz=4)
    names = ["y", "__base__", "x", "y"]
    results = []
    for m in (model, patched):
        m.zero_grad(set_to_none=True)
        out = m(**inputs, adapter_names=names)
        out.loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.loss.detach(), grads))
    (l0, loss0, g0), (l1, loss1, g1) = results
    assert_rel_close(l1, l0, "logits")
    assert_rel_close(loss1, loss0, "loss")
    assert g0.keys() == g1.keys() and any(".z." not in n for n in g0)
    for n in g0:
        assert_rel_close(g1[n], g0[n], n)


def test_route_per_token_equals_separate_runs():
    """tunefast.route: tokens of one sequence on different adapters, e.g. by modality."""
    model = M.peft_model("llama", ["q_proj", "v_proj", "down_proj"], adapters=("text", "image"))
    tunefast.patch(model)
    model.eval()
    ids = M.batch("llama")["input_ids"]
    modality = torch.zeros_like(ids)
    with tunefast.route(model, modality, adapters=["text", "image"]):
        routed_text = model(input_ids=ids).logits
    model.base_model.set_adapter("text")
    torch.testing.assert_close(routed_text, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    modality[:, 4:] = 1  # tokens 4.. are "image" tokens
    with tunefast.route(model, modality, adapters=["text", "image"]):
        mixed = model(input_ids=ids).logits
    assert not torch.allclose(mixed, routed_text, atol=1e-4)
    torch.testing.assert_close(mixed[:, :4], routed_text[:, :4], rtol=1e-5, atol=1e-5)  # causal: prefix unchanged


def test_route_bad_input():
    model = M.peft_model("llama", ["q_proj"], adapters=("a", "b"))
    ids = M.batch("llama")["input_ids"]
    with pytest.raises(ValueError, match="not patched"):
        with tunefast.route(model, torch.zeros_like(ids), adapters=["a"]):
            pass
    tunefast.patch(model)
    with pytest.raises(ValueError, match="unknown"):
        with tunefast.route(model, torch.zeros_like(ids), adapters=["a", "nope"]):
            pass
    with pytest.raises(ValueError, match=r"in \[-1, 2\)"):
        with tunefast.route(model, torch.full_like(ids, 2), adapters=["a", "b"]):
            pass
    with pytest.raises(ValueError, match="one id per token"):
        with tunefast.route(model, torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long), adapters=["a", "b"]):
            model(input_ids=ids)

"""tunefast.patch on PEFT AdaLoRA, VeRA, (IA)3 and LoRA-on-Embedding models: parity with unpatched PEFT,
AdaLoRA's rank allocation during training, merge/unmerge, unpatch, skips with reasons."""

import peft
import pytest
import torch

import tunefast
from tests import models as M
from tests.test_patch_lora import assert_rel_close

BACKENDS = ["triton", "reference"]
FAMILIES = ["llama", "gpt2", "bert"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
# family -> (attention k/v-type targets, feed-forward targets, embedding)
TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj"], ["down_proj"], "embed_tokens"),
    "gpt2": (["c_attn"], ["c_proj"], "wte"),
    "bert": (["query", "key", "value"], ["output.dense"], "word_embeddings"),
}


@pytest.fixture(autouse=True)
def _head_unfused(monkeypatch):
    """These tests compare the low-rank layers with PEFT's; the fused LM-head loss has its own tests
    (tests/test_patch_lm_head.py), so the head stays PEFT's here whatever patch()'s default for it is."""
    monkeypatch.setenv("TUNEFAST_FUSED_LM_HEAD", "0")


def _loss_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_parity(reference, patched, inputs):
    """Loss (1e-5 rel) and every trainable gradient (1e-5 rel; bias sums against 1% of the largest
    gradient, as tests/test_patch_lora.py) in the model's mode, and logits in eval mode (a patched causal
    LM may return no logits while training with labels: the fused LM-head loss)."""
    loss0, grads0 = _loss_grads(reference, inputs)
    loss1, grads1 = _loss_grads(patched, inputs)
    assert_rel_close(loss1, loss0, "loss")
    assert grads0.keys() == grads1.keys() and grads0
    floor = 0.01 * max(g.norm().item() for g in grads0.values())
    for name in grads0:
        assert_rel_close(grads1[name], grads0[name], name, floor if name.endswith("bias") else 0.0)
    modes = reference.training, patched.training
    reference.eval(), patched.eval()
    with torch.no_grad():
        assert_rel_close(patched(**inputs).logits, reference(**inputs).logits, "logits")
    reference.train(modes[0]), patched.train(modes[1])


def _randomize(model, prefixes, scale=0.3):
    """Trained-looking adapter values (PEFT initialises most of these to a no-op)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in prefixes):
                p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "ia3_l" in n else 0.0))


def adalora_model(family, dropout=0.0, total_step=20, **kw):
    attn = TARGETS[family][0]
    cfg = peft.AdaLoraConfig(init_r=6, target_r=3, tinit=2, tfinal=4, deltaT=2, total_step=total_step, lora_alpha=8,
                             lora_dropout=dropout, target_modules=attn + TARGETS[family][1], task_type=TASK[family],
                             fan_in_fan_out=family == "gpt2", **kw)
    model = peft.get_peft_model(M.base_model(family), cfg)
    _randomize(model, ["lora_A", "lora_B", "lora_E"])
    return model


def vera_model(family, adapters=("default",)):
    targets = TARGETS[family][0] + TARGETS[family][1]
    model = None
    for i, name in enumerate(adapters):
        cfg = peft.VeraConfig(r=8, target_modules=targets, task_type=TASK[family], fan_in_fan_out=family == "gpt2")
        if model is None:
            model = peft.get_peft_model(M.base_model(family), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    if len(adapters) > 1:
        model.base_model.set_adapter(list(adapters))
    _randomize(model, ["vera_lambda"])
    return model


def ia3_model(family, feedforward=False):
    attn, ff, _ = TARGETS[family]
    cfg = peft.IA3Config(target_modules=attn + (ff if feedforward else []), feedforward_modules=ff if feedforward else [],
                         task_type=TASK[family], fan_in_fan_out=family == "gpt2")
    model = peft.get_peft_model(M.base_model(family), cfg)
    _randomize(model, ["ia3_l"])
    return model


def embedding_model(family):
    targets = [TARGETS[family][2]] + TARGETS[family][0][:1]
    return M.peft_model(family, targets)


def tuner_names(model):
    """Names of the PEFT tuner layers in ``model`` (the modules this file's handlers decide on)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def ia3_ff_model(family):
    """(IA)3 on the k/v-type layers and the feed-forward layers together."""
    return ia3_model(family, feedforward=True)


BUILDERS = {"adalora": adalora_model, "vera": vera_model, "ia3": ia3_model, "ia3_ff": ia3_ff_model,
            "embedding": embedding_model}
METHODS = list(BUILDERS)


def expected_kernels(model, method, backend):
    """{kernel: count} the report must give for ``model``'s tuner layers (and, for the embedding case, the
    one LoRA q projection beside it, which LoRA's own handler patches)."""
    linear = f"lora_linear[{backend}]"
    tuner = tuner_names(model)
    if method == "embedding":
        return {f"lora_embedding[{backend}]": 1, linear: 2}
    if method == "ia3_ff":
        ff = len([n for n in tuner if model.get_submodule(n).is_feedforward])
        assert 0 < ff < len(tuner)
        return {linear: len(tuner) - ff, f"scaled_linear[{backend}]": ff}
    return {linear: len(tuner)}


PARITY = [(f, m, b) for f in FAMILIES for m in BUILDERS for b in BACKENDS]


@pytest.mark.parametrize("family,method,backend", PARITY, ids=["-".join(c) for c in PARITY])
def test_parity_with_peft(family, method, backend):
    model = BUILDERS[method](family)
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert not [e for e in report.skipped if e.name in tuner_names(patched)], str(report)
    mine = ("lora_", "scaled_linear")  # not other handlers' kernels (the LM head)
    kernels = {k: n for k, n in report.kernels().items() if k.startswith(mine)}
    assert kernels == expected_kernels(patched, method, backend), str(report)
    assert_parity(model, patched, M.batch(family))


@pytest.mark.parametrize("method", METHODS)
def test_method_changes_the_output_at_all(method):
    """Guards the parity tests: the adapters compared there are not a no-op."""
    model = BUILDERS[method]("llama")
    inputs = M.batch("llama")
    with model.disable_adapter():
        base = model(**inputs).logits
    assert not torch.allclose(model(**inputs).logits, base, atol=1e-3)


ALLOCATION = [("llama", "triton"), ("llama", "reference"), ("gpt2", "reference"), ("bert", "triton")]


@pytest.mark.parametrize("family,backend", ALLOCATION, ids=["-".join(c) for c in ALLOCATION])
def test_adalora_rank_allocation_during_training_matches_peft(family, backend):
    """update_and_allocate masks E in place between steps; every step's loss and the final adapter
    weights must follow PEFT's (the fused path reads E at every call)."""
    model = adalora_model(family, total_step=12)
    patched = M.clone(model)
    tunefast.patch(patched, backend=backend)
    inputs = M.batch(family)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (model, patched)]
    for step in range(12):
        losses = []
        for m, opt in zip((model, patched), opts):
            loss = m(**inputs).loss
            loss.backward()
            opt.step()
            m.base_model.update_and_allocate(step)
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert_rel_close(losses[1], losses[0], f"loss at step {step}")
    masked = [(p == 0).sum().item() for n, p in patched.named_parameters() if "lora_E" in n]
    assert sum(masked) > 0, "the schedule should have masked some singular values"
    want = dict(model.named_parameters())
    for n, p in patched.named_parameters():
        if "lora_E" in n:
            assert torch.equal(p == 0, want[n] == 0), n  # the same ranks were pruned
        if p.requires_grad:
            assert_rel_close(p.detach(), want[n].detach(), n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_and_disable_keep_peft_behaviour(method, family):
    model = BUILDERS[method](family)
    model.eval()
    patched = M.clone(model)
    tunefast.patch(patched)
    inputs = M.batch(family)
    want = model(**inputs).logits
    with patched.disable_adapter(), model.disable_adapter():
        assert torch.equal(patched(**inputs).logits, model(**inputs).logits)
    # merged: PEFT's forward on the merged weight. Compared with PEFT merged the same way (GPT-2 ties wte
    # to the LM head, so merging an embedding adapter changes the head too, in PEFT as here).
    patched.base_model.merge_adapter()
    model.base_model.merge_adapter()
    assert torch.equal(patched(**inputs).logits, model(**inputs).logits)
    patched.base_model.unmerge_adapter()  # the fused path resumes
    model.base_model.unmerge_adapter()
    atol = 1e-3 if method.startswith("ia3") else 1e-5  # PEFT warns: (IA)3 unmerge divides by l + 1e-8
    torch.testing.assert_close(patched(**inputs).logits, want, rtol=atol, atol=atol)
    torch.testing.assert_close(patched(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    merged = M.clone(model)
    merged.base_model.merge_adapter()
    report = tunefast.patch(merged)
    mine = [e for e in report.skipped if e.name in tuner_names(merged)]
    assert mine and all("merged" in e.reason for e in mine), str(report)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_unpatch_restores_bit_identical_outputs(method, family):
    """Outputs and gradients after unpatch equal PEFT's bit for bit (the classes are PEFT's again)."""
    model = BUILDERS[method](family)
    inputs = M.batch(family)
    _, loss0, grads0 = M.logits_loss_grads(model, inputs)
    model.eval()
    before = model(**inputs).logits
    classes = {n: type(m) for n, m in model.named_modules()}
    tunefast.patch(model)
    assert any(type(m) is not classes[n] for n, m in model.named_modules())
    model(**inputs)
    tunefast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert torch.equal(model(**inputs).logits, before)
    model.train()
    _, loss1, grads1 = M.logits_loss_grads(model, inputs)
    assert torch.equal(loss1, loss0) and all(torch.equal(grads1[n], grads0[n]) for n in grads0)


# not BERT: its SEQ_CLS classifier is a ModulesToSaveWrapper, which PEFT lets hold one active adapter only
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vera_two_adapters_share_projections(family):
    model = vera_model(family, adapters=("a", "b"))
    patched = M.clone(model)
    report = tunefast.patch(patched)
    assert any("a: r=8, b: r=8" in e.detail for e in report.patched), str(report)
    shared = {n: b.clone() for n, b in patched.named_buffers() if "vera_A" in n or "vera_B" in n}
    assert shared
    assert_parity(model, patched, M.batch(family))
    for n, b in patched.named_buffers():  # the shared projections stay frozen
        if n in shared:
            assert torch.equal(b, shared[n]), n


def _shared_storages(model, key):
    """Distinct storages behind the layers' ``key`` ("vera_A" / "vera_B") buffers: 1 when all layers share."""
    return {m.vera_A["default"].untyped_storage().data_ptr() if key == "vera_A" else
            m.vera_B["default"].untyped_storage().data_ptr() for m in model.modules() if hasattr(m, "vera_lambda_d")}


@pytest.mark.parametrize("family", FAMILIES)
def test_vera_trains_saves_and_loads_like_peft(family, tmp_path):
    """A few SGD steps on PEFT and on the patched model (the projections shared across layers throughout),
    then save_pretrained / from_pretrained + patch: the loaded model gives the trained model's numbers."""
    model = vera_model(family)
    patched = M.clone(model)
    tunefast.patch(patched)
    assert len(_shared_storages(patched, "vera_A")) == 1 and len(_shared_storages(patched, "vera_B")) == 1
    inputs = M.batch(family)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (model, patched)]
    for step in range(3):
        losses = []
        for m, opt in zip((model, patched), opts):
            loss = m(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        assert_rel_close(losses[1], losses[0], f"loss at step {step}")
    patched.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(M.base_model(family), tmp_path, is_trainable=True)
    report = tunefast.patch(loaded)
    assert len([e for e in report.patched if e.name in tuner_names(loaded)]) == len(tuner_names(loaded)), str(report)
    assert len(_shared_storages(loaded, "vera_A")) == 1
    for (n, p), (n2, q) in zip(patched.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n
    assert_parity(model, loaded, inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_feedforward_with_zero_entries_of_l_has_peft_gradients(family):
    """The feed-forward op's dl has no division by l: entries of l equal to 0 get PEFT's finite gradient."""
    model = ia3_model(family, feedforward=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n and p.shape[0] == 1:  # feed-forward vectors are (1, in_features)
                p[0, :3] = 0.0
    patched = M.clone(model)
    tunefast.patch(patched)
    assert_parity(model, patched, M.batch(family))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ia3_feedforward_bf16_base_with_fp32_vectors_trains_like_peft_and_keeps_x_once(backend):
    """PEFT's default: fp32 (IA)3 vectors on a bf16 base. The feed-forward op follows PEFT's casts (x * l in
    fp32, rounded to bf16) and keeps the bf16 x, where PEFT keeps an fp32 copy of it. The reference runs
    PEFT's operations in PEFT's order (bit for bit); the Triton kernels sum in another order (bf16 bound)."""
    from tunefast.profiling import SavedTensors

    ff = TARGETS["llama"][1]
    cfg = peft.IA3Config(target_modules=ff, feedforward_modules=ff, task_type="CAUSAL_LM")
    model = peft.get_peft_model(M.base_model("llama", dtype=torch.bfloat16), cfg)
    _randomize(model, ["ia3_l"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert report.kernels().get(f"scaled_linear[{backend}]") == 2, str(report)
    inputs = M.batch("llama")
    _, loss0, grads0 = M.logits_loss_grads(model, inputs)
    _, loss1, grads1 = M.logits_loss_grads(patched, inputs)
    for n in grads0:
        if backend == "reference":
            assert torch.equal(grads1[n], grads0[n]), n
        else:
            torch.testing.assert_close(grads1[n], grads0[n], rtol=0, atol=2e-2 * grads0[n].abs().max().item())
    if backend == "reference":
        assert torch.equal(loss1, loss0)
    else:
        torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=0)
    kept = {}
    for name, m in (("peft", model), ("tunefast", patched)):
        layer = m.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
        x = torch.randn(2, 9, layer.in_features, dtype=torch.bfloat16)
        with SavedTensors(exclude=list(m.parameters())) as saved:
            layer(x)
        kept[name] = saved.bytes
    assert kept["tunefast"] < 0.6 * kept["peft"], kept  # bf16 x (+ l) vs PEFT's fp32 copy of x


def test_adalora_dropout_eval_matches_and_train_draws_counter_based_masks():
    model = adalora_model("llama", dropout=0.3)
    patched = M.clone(model)
    tunefast.patch(patched)
    inputs = M.batch("llama")
    model.eval(), patched.eval()
    assert_parity(model, patched, inputs)
    patched.train()
    torch.manual_seed(1)
    a = patched(**inputs).loss
    torch.manual_seed(1)
    b = patched(**inputs).loss
    torch.manual_seed(2)
    c = patched(**inputs).loss
    assert torch.equal(a, b) and not torch.equal(a, c)  # masks follow torch's RNG, and dropout is on


def test_other_layer_types_are_reported():
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)),
                                peft.IA3Config(target_modules=["0"], feedforward_modules=[]))
    report = tunefast.patch(model)
    assert not report.patched and "Conv2d" in report.skipped[0].reason, str(report)


def test_dora_embedding_is_skipped_with_a_reason():
    model = M.peft_model("llama", ["embed_tokens", "q_proj"], use_dora=True)
    report = tunefast.patch(M.clone(model))
    skipped = {e.name: e.reason for e in report.skipped}
    assert any(n.endswith("embed_tokens") and "DoraEmbeddingVariant" in r for n, r in skipped.items()), str(report)


@pytest.mark.parametrize("method", ["adalora", "vera", "ia3"])
def test_bf16_base_with_fp32_adapters(method):
    """PEFT keeps these adapters in fp32 on a bf16 base; the fused path follows its promotions (x cast to
    the adapter dtype, one rounding to bf16 at the end); (IA)3 with an fp32 vector is left to PEFT."""
    attn = TARGETS["llama"][0]
    cfg = {"adalora": peft.AdaLoraConfig(init_r=6, target_r=3, total_step=20, lora_alpha=8, target_modules=attn),
           "vera": peft.VeraConfig(r=8, target_modules=attn),
           "ia3": peft.IA3Config(target_modules=attn, feedforward_modules=[])}[method]
    model = peft.get_peft_model(M.base_model("llama", dtype=torch.bfloat16), cfg)
    _randomize(model, ["lora_A", "lora_B", "lora_E", "vera_lambda", "ia3_l"])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.eval()
    patched = M.clone(model)
    report = tunefast.patch(patched)
    mine = tuner_names(patched)
    if method == "ia3":
        assert all("differs from the base weight" in e.reason for e in report.skipped if e.name in mine)
    else:
        assert len([e for e in report.patched if e.name in mine]) == len(mine), str(report)
    inputs = M.batch("llama")
    with torch.no_grad():
        want, got = model(**inputs).logits.float(), patched(**inputs).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_with_padding_idx_and_repeated_ids_matches_peft(backend):
    """A padding row gets no A^T gradient and repeated ids sum their tokens' gradients, as PEFT's F.embedding."""
    base = M.base_model("llama")
    base.get_input_embeddings().padding_idx = 0
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False,
                                                      task_type="CAUSAL_LM"))
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert report.kernels().get(f"lora_embedding[{backend}]") == 1, str(report)
    inputs = M.batch("llama")
    inputs["input_ids"][:, :3] = torch.tensor([0, 5, 5])  # padding id and a repeated id in every row
    assert_parity(model, patched, inputs)
    grad = dict(patched.named_parameters())["base_model.model.model.embed_tokens.lora_embedding_A.default"].grad
    assert grad is None or not grad[:, 0].any()


def test_adalora_loss_keeps_orthogonal_regularisation_with_the_fused_lm_head(monkeypatch):
    monkeypatch.setenv("TUNEFAST_FUSED_LM_HEAD", "1")
    model = adalora_model("llama")
    patched = M.clone(model)
    report = tunefast.patch(patched, backend="reference")
    head = [e for e in report.skipped if e.name.endswith("lm_head")]
    assert head and "AdaLoraModel.forward post-processes" in head[0].reason, str(report)
    inputs = M.batch("llama")
    assert_rel_close(patched(**inputs).loss, model(**inputs).loss, "loss")


def test_embedding_two_active_adapters_match_peft():
    """The first adapter runs in the fused op, the second adds its rows as PEFT computes them."""
    model = M.peft_model("llama", ["embed_tokens"], adapters=("a", "b"))
    patched = M.clone(model)
    report = tunefast.patch(patched)
    assert [e.detail.split(";")[0] for e in report.patched if e.name.endswith("embed_tokens")] == ["a: r=8, b: r=12"]
    assert_parity(model, patched, M.batch("llama"))

"""Lifecycle findings against PEFT, one regression test each: every patched path equals unpatched PEFT, or raises a
clear error / reports a skip. Backend "reference" (plain PyTorch) unless the item is about dispatch."""

import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import tunefast
from tests import models as M
from tests.test_patch_lora import assert_rel_close
from tunefast.methods import sparse


def _two(family="llama", **kw):
    model = M.peft_model(family, **kw)
    return model, M.clone(model)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def test_sparse_delta_under_lora_is_not_dropped():  # item 1
    model = M.peft_model("llama", ["q_proj", "v_proj"])
    q = "base_model.model.model.layers.{}.self_attn.q_proj.base_layer"  # the Linear inside the LoRA layer
    model = sparse.apply(model, sparse.SparseConfig(selection={q.format(i): [1, 70, 300, 4000] for i in range(2)}))
    with torch.no_grad():
        for layer in sparse.sparse_layers(model).values():
            for d in layer.deltas.values():
                d.values.normal_()  # a delta that changes the output
    patched = M.clone(model)
    report = tunefast.patch(patched, backend="reference")
    chained = [e for e in report.skipped if "SparseLinear" in e.reason]
    assert len(chained) == 2, str(report)  # q_proj of each layer: LoRA over the sparse op, described
    inputs = M.batch("llama")
    want, got = M.logits_loss_grads(model, inputs), M.logits_loss_grads(patched, inputs)
    assert_rel_close(got[0], want[0], "logits")
    assert want[2].keys() == got[2].keys() and any("values" in k for k in want[2])
    for k in want[2]:
        assert_rel_close(got[2][k], want[2][k], k)


def _route_pair():
    model = M.peft_model("llama", ["q_proj", "v_proj"], adapters=("a", "b"))
    model.base_model.set_adapter("a")
    patched = M.clone(model)
    tunefast.patch(patched, backend="reference")
    return model, patched


def test_route_is_owned_by_its_model():  # item 2
    _, student = _route_pair()
    teacher_peft, teacher = _route_pair()
    inputs = M.batch("llama")
    ids = torch.ones(2, 9, dtype=torch.long)
    want = _logits(teacher_peft, inputs)
    with tunefast.route(student, ids, ["a", "b"]):
        assert_rel_close(_logits(teacher, inputs), want, "teacher logits inside another model's route")


def test_route_is_owned_by_its_thread():  # item 3
    model, patched = _route_pair()
    inputs = M.batch("llama")
    want = _logits(model, inputs)
    entered, done, seen = threading.Event(), threading.Event(), {}

    def other():
        entered.wait()
        seen["logits"] = _logits(patched, inputs)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with tunefast.route(patched, torch.ones(2, 9, dtype=torch.long), ["a", "b"]):
        entered.set()
        done.wait(60)
    t.join()
    assert_rel_close(seen["logits"], want, "plain forward in another thread")


def test_route_refuses_layers_it_cannot_route():  # item 4
    model = M.peft_model("llama", ["q_proj", "v_proj"], adapters=("a", "b"), lora_bias=True)
    tunefast.patch(model, backend="reference")
    with pytest.raises(ValueError, match="lora_bias"):
        with tunefast.route(model, torch.zeros(2, 9, dtype=torch.long), ["a", "b"]):
            pass


@pytest.mark.parametrize("reentrant", [True, False])
def test_route_with_checkpointing_backward_after_the_block(reentrant):  # item 5
    model, patched = _route_pair()
    inputs = M.batch("llama")
    ids = torch.tensor([[0] * 9, [1] * 9])
    # PEFT's own per-sequence batch is the oracle for a per-sequence route
    model.eval()  # PEFT takes adapter_names in eval mode only; dropout is 0, so train and eval agree
    want = M.logits_loss_grads(model, {**inputs, "adapter_names": ["a", "b"]})
    patched.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    patched.train()
    patched.zero_grad(set_to_none=True)
    if reentrant:
        patched.enable_input_require_grads()
    with tunefast.route(patched, ids, ["a", "b"]):
        loss = patched(**inputs).loss
    loss.backward()  # recompute happens here, after the block
    grads = {n: p.grad for n, p in patched.named_parameters() if p.requires_grad}
    assert_rel_close(loss.detach(), want[1], "loss")
    for k, g in want[2].items():
        assert_rel_close(grads[k], g, k)


def test_patched_model_pickles_into_a_fresh_process(tmp_path):  # item 6
    model = M.peft_model("llama")
    tunefast.patch(model, backend="reference")
    inputs = M.batch("llama")
    want = _logits(model, inputs)
    torch.save(model, tmp_path / "m.pt")
    torch.save(inputs, tmp_path / "x.pt")
    code = (f"import torch; m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False); "
            f"x = torch.load({str(tmp_path / 'x.pt')!r}); x.pop('labels'); "
            f"torch.save(m(**x).logits.detach(), {str(tmp_path / 'y.pt')!r}); "
            "import tunefast; assert tunefast.get_report(m) is not None")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inplace_ops_on_patched_outputs_train_like_peft(backend):  # item 7
    model, patched = _two("gpt2", targets=["c_attn", "c_proj", "c_fc"])
    tunefast.patch(patched, backend=backend)
    for m in (model, patched):  # an in-place ReLU on every LoRA layer's output
        for layer in m.modules():
            if hasattr(layer, "lora_A") and isinstance(layer, nn.Module) and hasattr(layer, "base_layer"):
                layer.register_forward_hook(lambda mod, inp, out: out.add_(0.0).clamp_(min=-1e4))
    inputs = M.batch("gpt2")
    want, got = M.logits_loss_grads(model, inputs), M.logits_loss_grads(patched, inputs)
    assert_rel_close(got[1], want[1], "loss")
    for k in want[2]:
        assert_rel_close(got[2][k], want[2][k], k)


def test_sparse_merge_refuses_tied_weights_and_changes_nothing():  # item 8
    base = M.base_model("llama")
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = sparse.apply(base, sparse.SparseConfig(selection={"lm_head": [3, 70, 900]}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="tied"):
        sparse.merge(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hooks_on_lora_modules_fire_and_match_peft():  # item 9
    model, patched = _two()
    tunefast.patch(patched, backend="reference")
    calls = []
    for m in (model, patched):
        layer = m.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_B["default"].register_forward_hook(lambda mod, i, o: (calls.append(1), o * 0.5)[1])
    inputs = M.batch("llama")
    assert_rel_close(_logits(patched, inputs), _logits(model, inputs), "logits with a scaling hook")
    assert len(calls) == 2


def test_meta_device_forward_propagates_shapes():  # item 10
    model = M.peft_model("llama")
    tunefast.patch(model, backend="reference")
    meta = model.to("meta")
    out = meta(input_ids=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert out.logits.shape == (2, 5, M.VOCAB) and out.logits.is_meta


def test_nested_patch_unpatch_never_leaves_a_stale_report():  # item 11
    model = M.peft_model("llama")
    inner = model.base_model
    tunefast.patch(inner, backend="reference")
    tunefast.patch(model, backend="reference")
    tunefast.unpatch(model)
    assert tunefast.get_report(inner) is None
    report = tunefast.patch(inner, backend="reference")
    layer = inner.model.model.layers[0].self_attn.q_proj
    assert report.patched and "_tunefast_original_class" in type(layer).__dict__  # really patched again


def test_misleading_errors_now_name_the_cause():  # item 13
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match="lora_a must be a list"):
        tunefast.lora_linear(x, w, None, torch.randn(2, 8), torch.randn(4, 2), [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        sparse.SparseConfig(selection={"model.layers.0.self_attn.q_proj": [-1, 3]})


def test_fp16_base_with_lora_bias_matches_peft_and_repr_is_peft_s():  # item 15
    model = M.peft_model("llama", ["q_proj", "v_proj"], lora_bias=True, dtype=torch.float16)
    patched = M.clone(model)
    tunefast.patch(patched, backend="reference")
    inputs = M.batch("llama")
    assert torch.equal(_logits(patched, inputs), _logits(model, inputs))
    layer = patched.base_model.model.model.layers[0].self_attn.q_proj
    assert repr(layer).startswith("lora.Linear(")

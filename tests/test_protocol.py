"""Every method in tunefast.methods.METHODS follows the method protocol (tunefast/methods/protocol.py):
one parametrised test runs each through apply -> forward -> one optimizer step -> report -> save ->
load into a fresh base model -> remove, on tiny random Hugging Face models; plus the protocol's errors.

A new method adds one row to CASES (tests fail for a method in METHODS without one)."""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import tunefast
from tests import models as M
from tunefast.methods import METHODS, protocol
from tunefast.patching.report import PatchReport


def _layers(pattern: str, n: int = 2) -> set[str]:
    return {pattern.format(i=i) for i in range(n)}


@dataclass(frozen=True)
class Case:
    """One method on one tiny model. ``make``: the model apply is given; ``fresh``: the fresh base model
    load takes; ``touched``: the module names the report must list (``optional``: may list), with
    kernels matching ``kernel``.
    ``trains_given_model``: the trained weights are the given model's own (patched PEFT layers), so
    after remove the outputs are PEFT's on the trained weights, not those from before apply."""

    inputs: Callable
    make: Callable
    fresh: Callable
    config: Callable
    touched: set[str]
    kernel: str
    trains_given_model: bool = False
    optional: frozenset = frozenset()  # modules the report may also list (patch's LM head: on unless turned off)


def _patched_model():
    return M.peft_model("llama", ["q_proj", "v_proj"], r=4)


def _vit(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3)
    cfg._attn_implementation = "eager"
    return tf.ViTForImageClassification(cfg)


def _images():
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])}


CASES = {
    "adapters": Case(
        lambda: M.batch("gpt2"), lambda: M.base_model("gpt2"), lambda: M.base_model("gpt2"),
        lambda m: m.Config(bottleneck=8, placement="sequential", sublayers=("attention", "ffn")),
        _layers("transformer.h.{i}.attn.c_proj") | _layers("transformer.h.{i}.mlp.c_proj"),
        r"adapter\[reference\]"),
    "sparse": Case(
        lambda: M.batch("bert"), lambda: M.base_model("bert"), lambda: M.base_model("bert"),
        lambda m: m.Config(density=0.05, target_modules=["query", "value"]),
        _layers("bert.encoder.layer.{i}.attention.self.query") | _layers("bert.encoder.layer.{i}.attention.self.value"),
        r"sparse_linear\[(native|torch)\]"),
    "side": Case(
        lambda: M.batch("llama"), lambda: M.base_model("llama"), lambda: M.base_model("llama"),
        lambda m: m.Config(reduction_factor=8),
        {"side.rungs.0", "side.rungs.1", "head"},
        r"(ladder_merge|side_lm_loss)\[reference\]"),
    "patched": Case(
        lambda: M.batch("llama"), _patched_model, lambda: M.base_model("llama"),
        lambda m: m.Config(),
        _layers("base_model.model.model.layers.{i}.self_attn.q_proj")
        | _layers("base_model.model.model.layers.{i}.self_attn.v_proj"),
        r"(lora_linear|linear_cross_entropy)\[reference\]", trains_given_model=True,
        optional=frozenset({"base_model.model.lm_head"})),
    "prompt": Case(
        _images, _vit, _vit,
        lambda m: m.Config(num_tokens=4, deep=True),
        _layers("vit.layers.{i}.attention"),
        r"prefix_attention\[reference\]"),
}


def _outputs(model, inputs) -> torch.Tensor:
    """Logits without autograd and without labels (a fused LM-head loss returns no logits), in whatever
    train / eval mode the model is in (dropout is 0 in these configs; a side backbone is always in eval)."""
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _modes(model) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def test_methods_table():
    assert {"adapters", "patched", "side", "sparse"} <= set(METHODS)
    prompt_folder = Path(tunefast.__file__).parent / "methods" / "prompt" / "__init__.py"
    assert ("prompt" in METHODS) == prompt_folder.is_file()
    assert METHODS["sparse"] is tunefast.sparse and METHODS["side"] is tunefast.side
    assert METHODS["adapters"] is tunefast.adapters


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_follows_the_protocol(name, tmp_path):
    method = METHODS[name]
    protocol.check(method)
    assert name in CASES, f"method {name!r} has no row in tests/test_protocol.py CASES: add one"
    case = CASES[name]
    inputs = case.inputs()
    original = case.make()
    original.train()
    before, flags, modes = _outputs(original, inputs), _flags(original), _modes(original)

    # apply: the config's "auto" replaced by apply's backend; the returned model is the one to use
    model = method.apply(original, case.config(method), backend="reference")
    assert (model is original) == (name != "side")

    # trainable_parameters: non-empty, exactly the parameters that require grad
    params = method.trainable_parameters(model)
    assert params
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len({id(p) for p in params}) == len(params)

    # forward + one optimizer step: the weights leave their init and the outputs change
    opt = torch.optim.SGD(params, lr=0.5)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in params)
    opt.step()
    trained = _outputs(model, inputs)
    assert not torch.equal(trained, before)

    # report: every touched module, each with its kernel
    report = method.report(model)
    assert isinstance(report, PatchReport)
    listed = [e.name for e in report.patched] + [e.name for e in report.skipped]
    assert case.touched <= set(listed) <= case.touched | case.optional and len(listed) == len(set(listed))
    assert report.patched and all(re.fullmatch(case.kernel, e.kernel) for e in report.patched), report
    assert all(e.reason for e in report.skipped)

    # save, then load into a fresh base model: the same outputs, bit for bit
    folder = method.save(model, tmp_path / "ckpt")
    assert Path(folder).is_dir()
    loaded = method.load(case.fresh(), folder, backend="reference")
    loaded.train(model.training)
    assert torch.equal(_outputs(loaded, inputs), trained)

    # remove: the model apply was given, as it was (outputs, flags, train / eval modes)
    if case.trains_given_model:
        expected_model = case.make()
        expected_model.load_state_dict(model.state_dict())
        expected = _outputs(expected_model, inputs)
    else:
        expected = before
    removed = method.remove(model)
    assert removed is original
    assert torch.equal(_outputs(removed, inputs), expected)
    assert _flags(removed) == flags
    assert _modes(removed) == modes


# ---- backend in one place ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_apply_refuses_a_backend_that_contradicts_the_config(name):
    method, case = METHODS[name], CASES[name]
    config = dataclasses.replace(case.config(method), backend="reference")
    original = case.make()
    flags = _flags(original)
    with pytest.raises(ValueError, match=r"backend='triton' contradicts .*backend='reference'"):
        method.apply(original, config, backend="triton")
    assert _flags(original) == flags  # refused before anything changed
    model = method.apply(original, config, backend="reference")  # agreeing: fine
    assert method.report(model).backend == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        dataclasses.replace(case.config(method), backend="cuda")  # the config validates its backend


def test_resolve_backend():
    assert protocol.resolve_backend("reference", None) == "reference"
    assert protocol.resolve_backend("auto", "triton") == "triton"
    assert protocol.resolve_backend("triton", "triton") == "triton"
    with pytest.raises(ValueError, match=r"backend='reference' contradicts SparseConfig.backend='triton'"):
        protocol.resolve_backend("triton", "reference", what="SparseConfig")
    with pytest.raises(ValueError, match="backend must be one of"):
        protocol.resolve_backend("auto", "gpu")


def test_load_backend_replaces_the_saved_one(tmp_path):
    sparse = METHODS["sparse"]
    model = sparse.apply(M.base_model("llama"), sparse.Config(density=0.05, target_modules=["q_proj"],
                                                              backend="reference"))
    sparse.save(model, tmp_path)
    assert {l.backend for l in sparse.sparse_layers(sparse.load(M.base_model("llama"), tmp_path)).values()} \
        == {"reference"}  # the saved config's
    fresh = sparse.load(M.base_model("llama"), tmp_path, backend="auto")
    assert {l.backend for l in sparse.sparse_layers(fresh).values()} == {"auto"}


def test_patch_does_not_override_a_sparse_config_backend():
    sparse = METHODS["sparse"]
    model = sparse.apply(M.base_model("llama"), sparse.Config(density=0.05, target_modules=["q_proj"],
                                                              backend="reference"))
    report = tunefast.patch(model, backend="triton")  # the interpreter makes triton available on CPU
    try:
        entries = [e for e in report.patched if e.kernel.startswith("sparse_linear")]
        assert entries and {e.kernel for e in entries} <= {"sparse_linear[native]", "sparse_linear[torch]"}, report
        assert all("backend='reference' from its SparseConfig" in e.detail for e in entries)
    finally:
        tunefast.unpatch(model)


# ---- side: remove, and load that refuses ------------------------------------------------------------


def test_side_remove_and_refused_load_leave_the_model_as_given(tmp_path):
    side = METHODS["side"]
    base = M.base_model("llama")
    base.model.embed_tokens.weight.requires_grad_(False)
    base.train()
    flags, modes = _flags(base), _modes(base)
    sm = side.apply(base, side.Config(backend="reference"))
    assert not any(p.requires_grad for p in base.parameters()) and not base.training
    side.save(sm, tmp_path)
    assert side.remove(sm) is base and _flags(base) == flags and _modes(base) == modes
    with pytest.raises(ValueError, match="already removed"):
        side.remove(sm)
    with pytest.raises(TypeError, match="what tunefast.methods.side.apply returned"):
        side.remove(base)
    deeper = M.FAMILIES["llama"][0]()
    deeper.num_hidden_layers = 3
    other = type(base)(deeper)
    other.train()
    flags, modes = _flags(other), _modes(other)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        side.load(other, tmp_path)
    assert _flags(other) == flags and _modes(other) == modes


# ---- protocol.check ---------------------------------------------------------------------------------


def test_check_names_every_departure():
    @dataclass
    class NoBackend:
        rank: int = 4

    fake = types.ModuleType("fake_method")
    fake.Config = NoBackend
    fake.apply = lambda model, config, backend=None: model
    fake.remove = lambda m: m  # wrong parameter name
    fake.save = lambda model, path, name: path  # a required extra parameter
    fake.load = lambda model, path: model  # no backend
    fake.trainable_parameters = lambda model: []
    with pytest.raises(TypeError) as err:
        protocol.check(fake)
    msg = str(err.value)
    for part in ("Config has no backend field", "remove", "parameters ['name'] must have defaults",
                 "load", "no backend= parameter", "no function report()"):
        assert part in msg, part
    fake.Config = object
    with pytest.raises(TypeError, match="no Config dataclass"):
        protocol.check(fake)
    protocol.check(METHODS["adapters"])  # and a real one passes


def test_patched_refuses_what_peft_would_not_take(tmp_path):
    patched = METHODS["patched"]
    with pytest.raises(TypeError, match="peft.PeftModel"):
        patched.save(M.base_model("llama"), tmp_path)
    with pytest.raises(TypeError, match="plain base model"):
        patched.load(_patched_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        patched.load(M.base_model("llama"), tmp_path / "nothing")
    with pytest.raises(ValueError, match="not patched"):
        patched.report(_patched_model())
    with pytest.raises(ValueError, match="not patched"):
        patched.remove(_patched_model())

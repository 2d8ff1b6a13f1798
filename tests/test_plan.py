"""One eligibility decision per handler: ``plan(module, backend, x=None)`` gives the report's entry
(no x) and decides every forward (x). What the forward runs must be what plan says."""

from __future__ import annotations

import pytest
import torch

import tunefast
from tests import models as M
from tunefast.patching import lora as lora_handler
from tunefast.patching.registry import Patch, Skip


@pytest.fixture
def layer():
    model = M.peft_model("llama", ["q_proj"])
    tunefast.patch(model, backend="reference", lm_head=False)
    return model.base_model.model.model.layers[0].self_attn.q_proj


def _x(layer, dtype=torch.float32):
    return torch.randn(2, 3, layer.in_features, dtype=dtype)


def _ran_fused(layer, x, monkeypatch) -> bool:
    calls = []
    real = lora_handler.lora_linear
    monkeypatch.setattr(lora_handler, "lora_linear", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    layer(x)
    return bool(calls)


def test_report_entry_is_plan_without_input(layer):
    decision = lora_handler.plan(layer, "reference")
    assert isinstance(decision, Patch) and decision.kernel == "lora_linear[reference]" and decision.args is None
    assert "r=8" in decision.detail


@pytest.mark.parametrize("case", ["plain", "float64 layer", "hook on lora_A", "merged", "disabled",
                                  "trainable base"])
def test_forward_runs_what_plan_decides(layer, case, monkeypatch):
    x = _x(layer)
    if case == "float64 layer":
        layer.double()
        x = x.double()
    elif case == "hook on lora_A":
        layer.lora_A["default"].register_forward_hook(lambda m, i, o: o)
    elif case == "merged":
        layer.merge()
    elif case == "disabled":
        layer.enable_adapters(False)
    elif case == "trainable base":
        layer.get_base_layer().weight.requires_grad_(True)
    decision = lora_handler.plan(layer, "reference", x)
    if case == "plain":
        assert isinstance(decision, Patch) and decision.args is not None
    else:
        assert isinstance(decision, Skip) and decision.reason, case
    assert _ran_fused(layer, x, monkeypatch) == isinstance(decision, Patch)


def test_unmerge_resumes_the_fused_op(layer, monkeypatch):
    layer.merge()
    assert isinstance(lora_handler.plan(layer, "reference", _x(layer)), Skip)
    layer.unmerge()
    assert isinstance(lora_handler.plan(layer, "reference", _x(layer)), Patch)
    assert _ran_fused(layer, _x(layer), monkeypatch)

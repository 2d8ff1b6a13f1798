"""Bottleneck / parallel adapters (tunefast.methods.adapters): equal to a straightforward PyTorch
implementation written here, train on a tiny task, save/load, remove, report, config validation."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from tests import models as M
from tests.test_patch_lora import assert_rel_close
from tunefast.methods import adapters

BACKENDS = ["triton", "reference"]
ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def vit_model(seed=0):
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=3)
    cfg._attn_implementation = "eager"
    return tf.ViTForImageClassification(cfg)


def make(family, seed=0):
    return vit_model(seed) if family == "vit" else M.base_model(family, seed=seed)


def inputs(family):
    if family == "vit":
        g = torch.Generator().manual_seed(1)
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([0, 2])}
    return M.batch(family)


def _randomize(model):
    """Adapters as after training (a fresh one is the identity: up-projection zero)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def straightforward(model, adapted, config):
    """The same adapters on an unmodified copy, written with plain hooks and F.linear."""
    plain = copy.deepcopy(model)
    stash = {}
    for name, layer in adapters.adapter_layers(adapted).items():
        w = [t.detach().clone().requires_grad_() for t in (layer.down_weight, layer.down_bias, layer.up_weight,
                                                            layer.up_bias)]
        stash[name] = w
        block_name = next(b for b in _blocks(plain) if name.startswith(b + "."))
        site = adapters.BLOCKS[type(plain.get_submodule(block_name)).__name__]
        sub = next(s for s in site.values() if name == f"{block_name}.{s.output}")
        proj = plain.get_submodule(name)
        seen = {}
        if config.placement == "parallel":
            path, index, keyword = sub.input
            plain.get_submodule(f"{block_name}.{path}").register_forward_pre_hook(
                lambda m, a, kw, seen=seen, i=index, k=keyword: seen.update(x=a[i] if len(a) > i else kw[k]),
                with_kwargs=True)

        def hook(m, args, out, w=w, seen=seen):
            x = seen.pop("x") if config.placement == "parallel" else out
            branch = F.linear(ACT[config.activation](F.linear(x, w[0], w[1])), w[2], w[3])
            return out + config.scaling * branch

        proj.register_forward_hook(hook)
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain, stash


def _blocks(model):
    return [n for n, m in model.named_modules() if type(m).__name__ in adapters.BLOCKS]


CONFIGS = {
    "houlsby-relu": adapters.AdapterConfig.houlsby(bottleneck=8),
    "pfeiffer-gelu": adapters.AdapterConfig.pfeiffer(bottleneck=4, activation="gelu"),
    "parallel-silu": adapters.AdapterConfig.parallel(bottleneck=8, activation="silu"),
    "parallel-both": adapters.AdapterConfig(bottleneck=6, placement="parallel", sublayers=("attention", "ffn"),
                                            scaling=0.5),
}
CASES = [(f, c, b) for f in ["llama", "gpt2", "bert", "vit"] for c in CONFIGS for b in BACKENDS
         if b == "reference" or c in ("houlsby-relu", "parallel-both")]


@pytest.mark.parametrize("family,config,backend", CASES, ids=["-".join(c) for c in CASES])
def test_equals_straightforward_pytorch(family, config, backend):
    cfg = CONFIGS[config]
    base = make(family)
    model = adapters.apply(copy.deepcopy(base), cfg, backend=backend)
    _randomize(model)
    plain, stash = straightforward(base, model, cfg)
    batch = inputs(family)
    out = model(**batch)
    out.loss.backward()
    want = plain(**batch)
    want.loss.backward()
    assert_rel_close(out.logits.detach(), want.logits.detach(), "logits")
    assert_rel_close(out.loss.detach(), want.loss.detach(), "loss")
    n_sub = len(cfg.sublayers)
    assert len(stash) == 2 * n_sub  # two blocks per tiny model
    for name, layer in adapters.adapter_layers(model).items():
        for p, ref in zip((layer.down_weight, layer.down_bias, layer.up_weight, layer.up_bias), stash[name]):
            assert_rel_close(p.grad, ref.grad, f"{name} grad")
    with torch.no_grad():  # and the adapters change the model at all
        assert not torch.allclose(base(**batch).logits, out.logits, atol=1e-3)


@pytest.mark.parametrize("family,target", [("llama", 0.9), ("bert", 0.5)])
def test_trains_on_a_tiny_task(family, target):
    """Loss falls: an LM memorising 2 random sequences through adapters only (slow on a frozen random
    head: ~15% in 30 steps), and a classifier whose head trains with the adapters (as usual for encoders)."""
    model = adapters.apply(make(family), adapters.AdapterConfig.houlsby(bottleneck=8, dropout=0.1), backend="reference")
    params = adapters.trainable_parameters(model)
    if family == "bert":
        params += [p.requires_grad_() for p in model.classifier.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    batch = inputs(family)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < target * losses[0], losses
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("classifier" not in n and ("_weight" not in n and "_bias" not in n) for n in frozen)


def test_save_load_gives_identical_outputs(tmp_path):
    cfg = adapters.AdapterConfig.parallel(bottleneck=8, activation="gelu", sublayers=("attention", "ffn"))
    model = adapters.apply(make("gpt2"), cfg)
    _randomize(model)
    model.eval()
    batch = inputs("gpt2")
    want = model(**batch).logits
    adapters.save(model, tmp_path / "ad")
    fresh = adapters.load(make("gpt2"), tmp_path / "ad")
    fresh.eval()
    assert torch.equal(fresh(**batch).logits, want)
    assert adapters.config_of(fresh) == cfg
    with pytest.raises(ValueError, match="saved adapters are on"):
        adapters.load(make("llama"), tmp_path / "ad")


def test_remove_restores_the_model_exactly():
    base = make("bert")
    base.classifier.weight.requires_grad_(False)
    batch = inputs("bert")
    base.eval()
    before = base(**batch).logits
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    classes = {n: type(m) for n, m in base.named_modules()}
    model = adapters.apply(base, adapters.AdapterConfig.parallel(bottleneck=4, sublayers=("attention", "ffn")))
    _randomize(model)
    assert not torch.equal(model(**batch).logits, before)
    out = adapters.remove(model)
    assert out is base
    assert {n: type(m) for n, m in base.named_modules()} == classes
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert torch.equal(base(**batch).logits, before)
    with pytest.raises(ValueError, match="no adapters"):
        adapters.remove(base)


def test_report_lists_each_adapter_with_its_kernel():
    model = adapters.apply(make("llama"), adapters.AdapterConfig.houlsby(bottleneck=8), backend="reference")
    rep = adapters.report(model)
    assert [e.name for e in rep.patched] == [f"model.layers.{i}.{s}" for i in range(2)
                                             for s in ("self_attn.o_proj", "mlp.down_proj")]
    assert all(e.kernel == "adapter[reference]" and "r=8" in e.detail for e in rep.patched)
    assert "adapter[reference]" in str(rep)


def test_gradient_checkpointing_parallel_adapters():
    cfg = adapters.AdapterConfig.parallel(bottleneck=8, dropout=0.2, sublayers=("attention", "ffn"))
    model = adapters.apply(make("llama"), cfg, backend="reference")
    _randomize(model)
    model.train()
    batch = inputs("llama")
    torch.manual_seed(3)
    _, loss0, grads0 = M.logits_loss_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)
    _, loss1, grads1 = M.logits_loss_grads(model, batch)
    assert_rel_close(loss1, loss0, "loss")
    for n in grads0:
        assert_rel_close(grads1[n], grads0[n], n)


def test_autocast_bf16_matches_straightforward_under_autocast():
    """fp32 adapters on an fp32 model trained under bf16 autocast: the adapter runs in bf16, as nn.Linear
    adapters would."""
    cfg = adapters.AdapterConfig.houlsby(bottleneck=8, activation="gelu")
    base = make("llama")
    model = adapters.apply(copy.deepcopy(base), cfg, backend="reference")
    _randomize(model)
    plain, stash = straightforward(base, model, cfg)
    batch = inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(**batch), plain(**batch)
    got.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=0.05, atol=0.05)
    layer = adapters.adapter_layers(model)["model.layers.0.mlp.down_proj"]
    ref = stash["model.layers.0.mlp.down_proj"][2].grad
    assert layer.up_weight.grad.dtype == torch.float32
    assert (layer.up_weight.grad - ref).norm() <= 0.05 * ref.norm()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(bottleneck=0), ValueError, "bottleneck must be an int >= 1"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(placement="after"), ValueError, "placement must be one of"),
        (dict(sublayers=("ffn", "ffn")), ValueError, "sublayers must be distinct"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(scaling="2"), TypeError, "scaling must be a number"),
    ],
)
def test_config_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        adapters.AdapterConfig(**kwargs)


def test_apply_bad_input():
    with pytest.raises(ValueError, match="no transformer block of a known family"):
        adapters.apply(torch.nn.Sequential(torch.nn.Linear(4, 4)), adapters.AdapterConfig())
    model = adapters.apply(make("llama"), adapters.AdapterConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        adapters.apply(model, adapters.AdapterConfig())
    with pytest.raises(ValueError, match="backend must be one of"):
        adapters.apply(make("llama"), adapters.AdapterConfig(), backend="cuda")
    assert adapters.AdapterConfig.from_dict(adapters.AdapterConfig.pfeiffer().to_dict()) == adapters.AdapterConfig.pfeiffer()

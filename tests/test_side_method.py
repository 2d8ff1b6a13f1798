"""Side tuning on tiny Hugging Face models: the backbone gets no gradient and keeps nothing for backward,
fused equals unfused, an untrained side model equals its backbone, side models learn small tasks
(Llama, BERT, ViT), save/load round trips exactly, and bad input gets a clear error."""

import pytest
import torch
import transformers as tf

from tests import models as M
from tunefast.methods import side
from tunefast.methods.side.heads import causal_lm_loss
from tunefast.profiling import SavedTensors

MERGES = ["ladder", "unipt"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: on a shared 2-core box OpenMP's spin-waiting makes 2 threads ~10x slower than 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vit_model(seed=0):
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=16,
                       patch_size=4, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg)


def perturb_up(side_model, std=0.1, seed=5):
    """Untrained side models have up = 0 (no gradient reaches the side network): make it non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = side_model.head.up.weight
        w.copy_(torch.randn(w.shape, generator=g) * std)
    return side_model


def loss_and_grads(side_model, inputs):
    side_model.zero_grad(set_to_none=True)
    out = side_model(**inputs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in side_model.named_parameters() if p.requires_grad}


def train(side_model, batches, steps, lr=1e-2):
    opt = torch.optim.AdamW(side_model.trainable_parameters(), lr=lr)
    losses = []
    for i in range(steps):
        loss = side_model(**batches[i % len(batches)]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------------
# The backbone is frozen, runs without autograd, and keeps nothing
# ----------------------------------------------------------------------------------------------------


def _saved(side_model, inputs):
    with SavedTensors(exclude=[*side_model.parameters(), *side_model.buffers()]) as rec:
        out = side_model(**inputs)
    return out, rec


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("fused", [True, False])
def test_backbone_gets_no_gradient_and_keeps_no_activations(merge, fused):
    """Saved-tensor hooks see every tensor kept for backward: each belongs to the side network."""
    model = M.base_model("llama")
    inputs = M.batch("llama")
    sm = perturb_up(side.apply(model, side.SideConfig(merge=merge, fused=fused, backend="reference", layers=[0, 2])))
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        states = model.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  output_hidden_states=True).hidden_states
    selected = [states[0], states[2]]
    out, rec = _saved(sm, inputs)
    tokens, d, width = inputs["input_ids"].numel(), 64, 64 // 8
    full_width = []
    for t in rec.tensors:
        if t.dim() and t.shape[-1] == d and t.numel() >= tokens * d:
            full_width.append(t)  # must be a selected hidden state: what the down-projection's dW needs
        elif t.dim() and t.shape[-1] == M.VOCAB:
            assert not fused, "the fused LM-head loss keeps no logits"
        else:  # side-network widths (N, the MLP's 2N, one score per layer) or the up-projection's gradients
            assert t.numel() <= tokens * 2 * width or tuple(t.shape) in {(d, width), (d,)}, tuple(t.shape)
    assert len(full_width) == 2
    for h in selected:
        assert any(torch.equal(t.reshape(h.shape), h) for t in full_width)
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in sm.trainable_parameters())


@pytest.mark.parametrize("merge", MERGES)
def test_fused_keeps_less_than_unfused(merge):
    inputs = M.batch("llama")
    kept = {}
    for fused in (True, False):
        cfg = side.SideConfig(merge=merge, fused=fused, backend="reference")
        sm = perturb_up(side.apply(M.base_model("llama"), cfg))
        kept[fused] = _saved(sm, inputs)[1].bytes
    hidden_states = 2 * inputs["input_ids"].numel() * 64 * 4
    assert kept[True] - hidden_states < 0.5 * (kept[False] - hidden_states), kept


def test_unfreezing_the_backbone_is_refused():
    model = M.base_model("llama")
    sm = side.apply(model, side.SideConfig(backend="reference"))
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="up_proj.weight' requires grad"):
        sm(**M.batch("llama"))


def test_backbone_stays_in_eval_mode():
    model = M.base_model("bert")
    sm = side.apply(model, side.SideConfig(backend="reference"))
    sm.train()
    assert sm.training and sm.side.training and not model.training


# ----------------------------------------------------------------------------------------------------
# Numerics: untrained = backbone, fused = unfused, HF loss semantics
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_untrained_causal_lm_equals_its_backbone(fused):
    model = M.base_model("llama")
    inputs = M.batch("llama")
    sm = side.apply(model, side.SideConfig(fused=fused, backend="reference"))
    want = model(**inputs)
    out = sm(**inputs)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    if fused:
        assert out.logits is None  # training with labels: logits are never formed for backward
    sm.eval()
    with torch.no_grad():
        out = sm(**inputs)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_untrained_features_equal_the_backbone():
    base = M.base_model("bert").bert
    inputs = {k: v for k, v in M.batch("bert").items() if k != "labels"}
    sm = side.apply(base, side.SideConfig(backend="reference"))
    assert sm.plan.task == "features"
    out = sm(**inputs)
    want = base(**inputs).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, want)
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(out.pooler_output, (want * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fused_equals_unfused(merge, backend):
    """Same parameters, same batch: loss and every side gradient agree (Triton via the interpreter)."""
    inputs = M.batch("llama")
    cfg = side.SideConfig(merge=merge, fused=False, reduction_factor=4)
    unfused = perturb_up(side.apply(M.base_model("llama"), cfg))
    fused = side.apply(M.base_model("llama"), side.SideConfig(merge=merge, backend=backend, reduction_factor=4))
    fused.load_state_dict(unfused.state_dict())
    loss0, grads0 = loss_and_grads(unfused, inputs)
    loss1, grads1 = loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        err = (grads1[name] - grads0[name]).norm() / grads0[name].norm().clamp_min(1e-12)
        assert err < 1e-5, f"{name}: relative error {err:.3g}"


def test_loss_is_hugging_face_shifted_cross_entropy():
    model = M.base_model("llama")
    inputs = M.batch("llama")
    sm = perturb_up(side.apply(model, side.SideConfig(fused=False, backend="reference")))
    out = sm(**inputs)
    hf = model.loss_function(out.logits, inputs["labels"], vocab_size=M.VOCAB)
    torch.testing.assert_close(out.loss, hf)
    n_items = torch.tensor(11)
    hf_sum = model.loss_function(out.logits, inputs["labels"], vocab_size=M.VOCAB, num_items_in_batch=n_items)
    torch.testing.assert_close(sm(**inputs, num_items_in_batch=n_items).loss, hf_sum)
    fused = side.apply(model, side.SideConfig(backend="reference"))
    fused.load_state_dict(sm.state_dict())
    torch.testing.assert_close(fused(**inputs, num_items_in_batch=n_items).loss,
                               causal_lm_loss(out.logits, inputs["labels"], n_items))


def test_side_network_changes_the_output():
    sm = perturb_up(side.apply(M.base_model("bert"), side.SideConfig(backend="reference")))
    inputs = M.batch("bert")
    logits = sm(**inputs).logits
    with torch.no_grad():
        sm.head.up.weight.zero_()
    assert not torch.allclose(sm(**inputs).logits, logits)


# ----------------------------------------------------------------------------------------------------
# Learning small tasks
# ----------------------------------------------------------------------------------------------------


def _lm_batches():
    """Sequences that follow a fixed random permutation: token t + 1 = perm[token t]."""
    perm = torch.randperm(M.VOCAB, generator=torch.Generator().manual_seed(0))
    batches = []
    for seed in range(4):
        cols = [torch.randint(0, M.VOCAB, (8, 1), generator=torch.Generator().manual_seed(seed))]
        for _ in range(11):
            cols.append(perm[cols[-1]])
        ids = torch.cat(cols, 1)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def _bert_batches():
    """Label = first token id mod 3 (read at the first position)."""
    batches = []
    for seed in range(4):
        ids = torch.randint(3, M.VOCAB, (16, 8), generator=torch.Generator().manual_seed(seed))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3})
    return batches


def _vit_batches():
    """Label = the colour channel that is brighter."""
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 3, (16,), generator=g)
        pixels = torch.randn(16, 3, 16, 16, generator=g)
        pixels[torch.arange(16), labels] += 1.0
        batches.append({"pixel_values": pixels, "labels": labels})
    return batches


LEARN = [
    pytest.param(lambda: M.base_model("llama"), _lm_batches, dict(), 60, 0.3, id="llama"),
    pytest.param(lambda: M.base_model("bert"), _bert_batches, dict(pooling="first"), 40, 0.5, id="bert"),
    pytest.param(vit_model, _vit_batches, dict(), 25, 0.2, id="vit"),
]


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("make,batches,extra,steps,ratio", LEARN)
def test_learns_a_small_task(make, batches, extra, steps, ratio, merge):
    sm = side.apply(make(), side.SideConfig(reduction_factor=2, merge=merge, backend="reference", **extra))
    data = batches()
    losses = train(sm, data, steps)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < ratio * first, f"loss {first:.3f} -> {last:.3f}"


def test_vit_returns_image_classifier_output():
    sm = side.apply(vit_model(), side.SideConfig(backend="reference"))
    out = sm(**_vit_batches()[0])
    assert type(out).__name__ == "ImageClassifierOutput" and out.logits.shape == (16, 3) and out.loss is not None


# ----------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,merge", [("llama", "ladder"), ("bert", "unipt")])
def test_save_load_round_trip_is_exact(tmp_path, family, merge):
    sm = side.apply(M.base_model(family), side.SideConfig(merge=merge, norm="layernorm", backend="reference"))
    inputs = M.batch(family)
    train(sm, [inputs], 3)
    side.save(sm, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side_config.json", "side_model.safetensors"]
    loaded = side.load(M.base_model(family), tmp_path)
    resolved = ("task", "num_labels")  # save() writes what "auto" / None resolved to
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in resolved}  # noqa: E731
    assert strip(loaded.side_config) == strip(sm.side_config)
    assert loaded.plan == sm.plan
    for name, t in sm.side_state_dict().items():
        assert torch.equal(loaded.side_state_dict()[name], t), name
    sm.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = sm(**inputs), loaded(**inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    size = (tmp_path / "side_model.safetensors").stat().st_size
    assert size < 0.2 * sum(p.numel() * 4 for p in sm.backbone.parameters())  # side weights only


def test_load_onto_a_different_backbone_says_why(tmp_path):
    sm = side.apply(M.base_model("llama"), side.SideConfig(backend="reference"))
    side.save(sm, tmp_path)
    cfg = M.FAMILIES["llama"][0]()
    cfg.num_hidden_layers = 3
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        side.load(tf.LlamaForCausalLM(cfg), tmp_path)
    with pytest.raises(FileNotFoundError, match="side_config.json"):
        side.load(M.base_model("llama"), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="can be overridden"):
        side.load(M.base_model("llama"), tmp_path, reduction_factor=4)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(reduction_factor=0), ValueError, "reduction_factor must be >= 1"),
        (dict(reduction_factor=2.5), TypeError, "reduction_factor must be an int"),
        (dict(layers=[]), ValueError, "layers is empty"),
        (dict(layers="1,2"), TypeError, "layers must be a list"),
        (dict(layers=[1, 1.5]), TypeError, "layers must be an int"),
        (dict(merge="sum"), ValueError, "merge must be one of"),
        (dict(norm="batchnorm"), ValueError, "norm must be one of"),
        (dict(task="seq2seq"), ValueError, "task must be one of"),
        (dict(gate_temperature=0), ValueError, "gate_temperature must be > 0"),
        (dict(mlp_ratio=-1), ValueError, "mlp_ratio must be >= 0"),
        (dict(side_dtype="float64"), ValueError, "side_dtype must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(num_labels=0), ValueError, "num_labels must be >= 1"),
    ],
)
def test_bad_config_gets_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        side.SideConfig(**kwargs)


def test_config_help_and_json_round_trip():
    cfg = side.SideConfig(layers=[0, -1], merge="unipt")
    assert side.SideConfig.from_dict(cfg.to_dict()) == cfg
    assert "reduction_factor" in side.SideConfig.help()
    with pytest.raises(ValueError, match="unknown SideConfig field"):
        side.SideConfig.from_dict({**cfg.to_dict(), "rank": 4})


class _NoHiddenStatesConfig(tf.PretrainedConfig):
    model_type = "tunefast-test-no-hidden-states"

    def __init__(self, hidden_size=8, num_hidden_layers=1, **kw):
        super().__init__(**kw)
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers


class _Silent(tf.PreTrainedModel):
    """Takes output_hidden_states but returns none."""

    config_class = _NoHiddenStatesConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = torch.nn.Embedding(10, config.hidden_size)

    def forward(self, input_ids=None, **kwargs):
        return tf.modeling_outputs.BaseModelOutput(last_hidden_state=self.emb(input_ids))


class _NoKwargs(_Silent):
    """Cannot even be asked for hidden states."""

    def forward(self, input_ids=None):
        return super().forward(input_ids)


def test_bad_model_or_layers_get_clear_error():
    with pytest.raises(ValueError, match=r"reduction_factor=128 is larger than the model's hidden_size=64"):
        side.apply(M.base_model("llama"), side.SideConfig(reduction_factor=128))
    with pytest.raises(ValueError, match=r"layers: index 3 is out of range for a model with 2 blocks"):
        side.apply(M.base_model("llama"), side.SideConfig(layers=[1, 3]))
    with pytest.raises(ValueError, match=r"layers: index -4 is out of range"):
        side.apply(M.base_model("llama"), side.SideConfig(layers=[-4]))
    with pytest.raises(ValueError, match="name one hidden state twice"):
        side.apply(M.base_model("llama"), side.SideConfig(layers=[2, -1]))
    with pytest.raises(TypeError, match="must be a Hugging Face PreTrainedModel"):
        side.apply(torch.nn.Linear(4, 4))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        side.apply(M.base_model("t5"))
    with pytest.raises(TypeError, match="cannot return hidden states"):
        side.apply(_NoKwargs(_NoHiddenStatesConfig()))
    sm = side.apply(_Silent(_NoHiddenStatesConfig()), side.SideConfig(reduction_factor=2))
    with pytest.raises(RuntimeError, match="returned no hidden_states"):
        sm(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.gpu
@pytest.mark.parametrize("merge", MERGES)
def test_fused_equals_unfused_on_gpu(merge):
    """A bf16 Llama with an fp32 side network on CUDA: Triton rungs and the chunked loss vs plain PyTorch."""
    model = M.base_model("llama", dtype=torch.bfloat16).cuda()
    inputs = {k: v.cuda() for k, v in M.batch("llama", bsz=4, seq=33).items()}
    cfg = side.SideConfig(merge=merge, fused=False, reduction_factor=4)
    unfused = perturb_up(side.apply(model, cfg))
    fused = side.apply(model, side.SideConfig(merge=merge, backend="triton", reduction_factor=4, loss_chunk_tokens=16))
    fused.load_state_dict(unfused.state_dict())
    loss0, grads0 = loss_and_grads(unfused, inputs)
    loss1, grads1 = loss_and_grads(fused, inputs)
    torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-4)
    for name in grads0:
        err = (grads1[name] - grads0[name]).norm() / grads0[name].norm().clamp_min(1e-12)
        assert err < 1e-3, f"{name}: relative error {err:.3g}"

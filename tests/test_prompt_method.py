"""Visual prompt tuning (tunefast.methods.prompt) against a straightforward PyTorch VPT written here.

The oracle (``vpt_reference``) is VPT as its paper describes it, on an untouched copy of the model:
deep, layer i's prompts are concatenated after CLS, the layer runs on the longer sequence and its
outputs at the prompt positions are dropped; shallow, the prompts are concatenated once at the
embedding output and carried to the end. tunefast's deep path never builds those sequences (a prefix
K/V through prefix_attention); the two must agree in logits and in every trained gradient (fp32,
tests/tolerances.py). Tiny models: hidden 32, 2 layers, 32x32 images with 8x8 patches.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from tests.tolerances import assert_close_to_oracle
from tunefast.methods import prompt, protocol

B, N_TOK, LABELS = 3, 4, 5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
IMAGE = dict(image_size=32, patch_size=8, num_channels=3)

# family -> (model class, config class, extra config fields, special tokens before the patches)
FAMILIES = {
    "vit": (tf.ViTForImageClassification, tf.ViTConfig, IMAGE, 1),
    "deit": (tf.DeiTForImageClassification, tf.DeiTConfig, IMAGE, 2),
    "deit_teacher": (tf.DeiTForImageClassificationWithTeacher, tf.DeiTConfig, IMAGE, 2),
    "vit_msn": (tf.ViTMSNForImageClassification, tf.ViTMSNConfig, IMAGE, 1),
    "ijepa": (tf.IJepaForImageClassification, tf.IJepaConfig, IMAGE, 0),
    "dinov2": (tf.Dinov2ForImageClassification, tf.Dinov2Config, IMAGE, 1),
    "dinov2_reg": (tf.Dinov2WithRegistersForImageClassification, tf.Dinov2WithRegistersConfig,
                   dict(IMAGE, num_register_tokens=2), 3),
    "ast": (tf.ASTForAudioClassification, tf.ASTConfig,
            dict(patch_size=8, num_mel_bins=16, max_length=24, frequency_stride=8, time_stride=8), 2),
}
# heads that read fixed token positions, so a shallow reference that keeps its prompts to the end reads the
# same tokens (DINOv2 and I-JEPA average over patch positions, which the carried prompts would join)
POSITION_HEADS = ("vit", "deit", "deit_teacher", "vit_msn", "ast")


def make(family: str, seed: int = 0, **over):
    cls, cfg_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**TINY, **extra, "num_labels": LABELS, **over})
    return cls(cfg)


def inputs(family: str, batch: int = B, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "ast":
        return {"input_values": torch.randn(batch, 24, 16, generator=g)}
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def vpt_reference(model, family: str, prompts: list[torch.Tensor], deep: bool):
    """Hooks that turn ``model`` (untouched, frozen) into a straightforward VPT with ``prompts``
    ((N, hidden) each: one per layer when deep, one when shallow). Returns the hook handles."""
    layers = [m for m in model.modules() if type(m).__name__ in prompt.LAYERS]
    handles = []
    if deep:
        for layer, p in zip(layers, prompts, strict=True):
            def pre(mod, args, kwargs, p=p):
                h = args[0]  # after CLS (position 1) whatever the family: attention is permutation-equivariant
                return (torch.cat((h[:, :1], p.expand(h.shape[0], -1, -1), h[:, 1:]), 1), *args[1:]), kwargs

            def post(mod, args, out, n=p.shape[0]):
                return torch.cat((out[:, :1], out[:, 1 + n:]), 1)

            handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    else:
        (p,) = prompts
        lead = FAMILIES[family][3]
        emb = next(m for m in model.modules() if type(m).__name__ in prompt.EMBEDDINGS)

        def insert(mod, args, out):
            return torch.cat((out[:, :lead], p.expand(out.shape[0], -1, -1), out[:, lead:]), 1)

        handles.append(emb.register_forward_hook(insert))
    return handles


def step_grads(model, batch, params: dict, labels):
    """Logits and the gradients of a cross-entropy loss for ``params`` (name -> tensor)."""
    for p in params.values():
        p.grad = None
    logits = model(**batch).logits
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in params.items()}


def pair(family, *, deep, backend="reference", train_head=True, **cfg):
    """(tunefast model, reference model, reference leaf params by tunefast's names)."""
    base = make(family)
    ref = copy.deepcopy(base)
    model = prompt.apply(base, prompt.PromptConfig(num_tokens=N_TOK, deep=deep, train_head=train_head, **cfg),
                         backend=backend)
    with torch.no_grad():  # a non-zero head, so head gradients are not trivially equal
        for p in prompt.head_parameters(model).values():
            p.normal_(0.0, 0.5)
    for p in ref.parameters():
        p.requires_grad_(False)
    ref_params = {}
    ref_state = dict(ref.named_parameters())
    for n, p in prompt.head_parameters(model).items():
        ref_state[n].data.copy_(p.detach())
        ref_state[n].requires_grad_(True)
        ref_params[n] = ref_state[n]
    leaves = []
    for n, p in prompt.prompt_parameters(model).items():
        leaf = p.detach().clone().requires_grad_(True)
        ref_params[n] = leaf
        leaves.append(leaf)
    vpt_reference(ref, family, leaves, deep)
    return model, ref, ref_params


def assert_parity(model, ref, ref_params, family, batch=None):
    batch = batch or inputs(family)
    labels = torch.arange(B) % LABELS
    got, got_g = step_grads(model, batch, {**prompt.prompt_parameters(model), **prompt.head_parameters(model)}, labels)
    want, want_g = step_grads(ref, batch, ref_params, labels)
    assert_close_to_oracle(got, want, name="logits")
    assert set(got_g) == set(want_g)
    for n in want_g:
        assert want_g[n].abs().max() > 0, f"{n}: zero reference gradient, the comparison would prove nothing"
        assert_close_to_oracle(got_g[n], want_g[n], name=f"grad {n}")


def test_follows_the_method_protocol():
    protocol.check(prompt)
    assert prompt.Config is prompt.PromptConfig


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deep_matches_straightforward_vpt(family):
    model, ref, ref_params = pair(family, deep=True)
    assert_parity(model, ref, ref_params, family)


@pytest.mark.parametrize("family", POSITION_HEADS)
def test_shallow_matches_straightforward_vpt(family):
    model, ref, ref_params = pair(family, deep=False)
    assert_parity(model, ref, ref_params, family)


@pytest.mark.parametrize("family", ["dinov2_reg", "ijepa"])
def test_shallow_pooling_heads_read_only_the_original_tokens(family):
    """Mean-pooling heads: the prompts leave after the last layer, so the head averages the patches it
    averaged before; the reference takes the prompt rows out of the last hidden state itself."""
    model, ref, ref_params = pair(family, deep=False)
    batch = inputs(family)
    lead = FAMILIES[family][3]
    final_norm = next(m for n, m in ref.named_modules() if n.endswith("layernorm"))
    final_norm.register_forward_pre_hook(
        lambda mod, args: (torch.cat((args[0][:, :lead], args[0][:, lead + N_TOK:]), 1),))
    want = ref(**batch).logits.detach()
    assert_close_to_oracle(model(**batch).logits.detach(), want, name="logits")


@pytest.mark.parametrize("family", ["vit", "deit_teacher"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing(family, deep, reentrant):
    model, ref, ref_params = pair(family, deep=deep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable's rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    assert_parity(model, ref, ref_params, family)


def test_deep_bf16_within_twice_torchs_own_error():
    """bf16 (the op's reference on CPU): error against an fp64 straightforward VPT at most twice that of
    the straightforward VPT run in bf16 itself (tests/tolerances.py's rule)."""
    model, ref, _ = pair("vit", deep=True)
    model.eval()
    ref.eval()
    prompts = [p.detach() for p in prompt.prompt_parameters(model).values()]
    x = inputs("vit")["pixel_values"]
    oracle_model, torch_bf16 = copy.deepcopy(make("vit")).double().eval(), copy.deepcopy(make("vit")).bfloat16().eval()
    for m, dt in ((oracle_model, torch.float64), (torch_bf16, torch.bfloat16)):
        m.classifier.load_state_dict(ref.classifier.state_dict())
        m.to(dt)
        vpt_reference(m, "vit", [p.to(dt) for p in prompts], deep=True)
    with torch.no_grad():
        oracle = oracle_model(pixel_values=x.double()).logits
        theirs = torch_bf16(pixel_values=x.bfloat16()).logits
        ours = model.bfloat16()(pixel_values=x.bfloat16()).logits
    assert_close_to_oracle(ours, oracle, torch_same_dtype=theirs, name="bf16 logits")


def test_eval_and_no_grad():
    model, ref, _ = pair("deit", deep=True)
    model.eval()
    ref.eval()
    with torch.no_grad():
        got, want = model(**inputs("deit")).logits, ref(**inputs("deit")).logits
    assert_close_to_oracle(got, want, name="logits")


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompts_change_the_output(deep):
    base = make("vit")
    want = base(**inputs("vit")).logits.detach()
    model = prompt.apply(base, prompt.PromptConfig(num_tokens=N_TOK, deep=deep, init="normal", init_std=1.0),
                         backend="reference")
    got = model(**inputs("vit")).logits.detach()
    assert not torch.allclose(got, want, atol=1e-4)


def test_triton_kernel_under_the_interpreter():
    model, ref, ref_params = pair("vit", deep=True, backend="triton")
    assert prompt.report(model).kernels() == {"prefix_attention[triton]": 2}
    assert_parity(model, ref, ref_params, "vit")


def synthetic_task(n=12, seed=3):
    """Label = which colour channel is brighter: global information, which even a random backbone's CLS keeps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 3
    x[torch.arange(n), y] += 1.0
    return x, y


@pytest.mark.parametrize("train_head", [True, False], ids=["prompts+head", "prompts-only"])
def test_loss_falls_on_a_small_task(train_head):
    # initializer_range 0.2 instead of 0.02: with near-zero random weights the frozen head barely reacts to
    # its input and prompts alone cannot move the loss (1.084 -> 1.082 in 30 steps, measured); at 0.2 they can
    base = make("vit", num_labels=3, initializer_range=0.2)
    model = prompt.apply(base, prompt.PromptConfig(num_tokens=N_TOK, train_head=train_head), backend="reference")
    x, y = synthetic_task()
    opt = torch.optim.AdamW(prompt.trainable_parameters(model), lr=1e-2 if train_head else 1e-1)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "tunefast_prompt" not in n]
    assert trainable == (["classifier.weight", "classifier.bias"] if train_head else [])
    assert losses[-1] < 0.25 * losses[0], losses


def trained(family="vit", deep=True, **cfg):
    base = make(family)
    model = prompt.apply(base, prompt.PromptConfig(num_tokens=N_TOK, deep=deep, **cfg), backend="reference")
    with torch.no_grad():  # stand-in for training: every trained tensor moved
        for p in prompt.trainable_parameters(model):
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_save_load_gives_identical_logits(tmp_path, deep):
    model = trained("deit_teacher", deep=deep)
    model.eval()
    want = model(**inputs("deit_teacher")).logits
    folder = prompt.save(model, tmp_path / "vpt")
    assert sorted(p.name for p in folder.iterdir()) == ["prompt_config.json", "prompts.safetensors"]
    fresh = prompt.load(make("deit_teacher"), folder, backend="reference")  # saved: "auto", as given
    fresh.eval()
    assert torch.equal(fresh(**inputs("deit_teacher")).logits, want)
    assert prompt.config_of(fresh) == dataclasses.replace(prompt.config_of(model), backend="reference")


def test_load_refuses_a_mismatch_and_changes_nothing(tmp_path):
    folder = prompt.save(trained("vit"), tmp_path / "vpt")
    for other in (make("vit", num_hidden_layers=3), make("vit", hidden_size=48), make("vit", num_labels=7)):
        before = {n: p.clone() for n, p in other.state_dict().items()}
        impl = other.config._attn_implementation
        with pytest.raises(ValueError, match="do not fit"):
            prompt.load(other, folder)
        assert "_tunefast_prompt" not in other.__dict__
        assert other.config._attn_implementation == impl
        after = other.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FileNotFoundError, match="prompt.save"):
        prompt.load(make("vit"), tmp_path / "nothing")


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_remove_restores_the_model_bit_for_bit(deep):
    base = make("vit")
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    state = {n: t.clone() for n, t in base.state_dict().items()}
    want = base(**inputs("vit")).logits
    model = trained("vit", deep=deep)  # same seed: the same base weights
    assert torch.equal(model.vit.embeddings.cls_token, base.vit.embeddings.cls_token)
    model(**inputs("vit")).logits.sum().backward()
    from tunefast.patching import prefix_interface

    holds = dict(prefix_interface._holds)  # deep prompts hold the global attention registration
    prompt.remove(model)
    assert sum(holds.values()) - sum(prefix_interface._holds.values()) == (1 if deep else 0)
    assert torch.equal(model(**inputs("vit")).logits, want)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)  # the trained head is restored too
    assert model.config._attn_implementation == base.config._attn_implementation
    with pytest.raises(ValueError, match="no visual prompts"):
        prompt.remove(model)


def test_report():
    deep = prompt.report(prompt.apply(make("deit"), prompt.PromptConfig(num_tokens=2), backend="reference"))
    assert [e.name for e in deep.patched] == ["deit.layers.0.attention", "deit.layers.1.attention"]
    assert deep.kernels() == {"prefix_attention[reference]": 2} and not deep.skipped
    shallow = prompt.report(prompt.apply(make("deit"), prompt.PromptConfig(num_tokens=2, deep=False)))
    assert not shallow.patched
    assert [e.name for e in shallow.skipped] == ["deit.embeddings", *(f"deit.layers.{i}.attention" for i in (0, 1))]
    assert "after the first 2 token(s)" in shallow.skipped[0].reason
    assert all("own attention" in e.reason for e in shallow.skipped[1:])


def test_unsupported_models_are_refused_with_the_reason():
    swin = tf.SwinForImageClassification(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                       num_heads=[2, 2], window_size=4, num_labels=3))
    with pytest.raises(ValueError, match="SwinLayer.*local windows"):
        prompt.apply(swin, prompt.PromptConfig())
    bert = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=50))
    with pytest.raises(ValueError, match="no ViT-style layer.*ViTLayer"):
        prompt.apply(bert, prompt.PromptConfig())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prompt.apply("vit", prompt.PromptConfig())
    with pytest.raises(TypeError, match="PromptConfig"):
        prompt.apply(make("vit"), {"num_tokens": 3})
    ast = make("ast")
    object.__setattr__(ast.config, "patch_size", None)  # a config without the patch size VPT's init needs
    before = {n: (p.requires_grad, p.clone()) for n, p in ast.named_parameters()}
    with pytest.raises(ValueError, match="patch size.*init='normal'"):
        prompt.apply(ast, prompt.PromptConfig(init="uniform"))
    assert "_tunefast_prompt" not in ast.__dict__ and ast.config._attn_implementation == "sdpa"
    assert all(p.requires_grad == before[n][0] and torch.equal(p, before[n][1]) for n, p in ast.named_parameters())
    model = prompt.apply(make("vit"), prompt.PromptConfig(), backend="reference")
    with pytest.raises(ValueError, match="already has visual prompts"):
        prompt.apply(model, prompt.PromptConfig())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_tokens=0), ValueError, "num_tokens"),
    (dict(num_tokens=2.0), ValueError, "num_tokens"),
    (dict(deep="yes"), TypeError, "deep"),
    (dict(train_head=1), TypeError, "train_head"),
    (dict(init="xavier"), ValueError, "init must be one of"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(init_std=-1.0), ValueError, "init_std"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_configs(kwargs, error, match):
    with pytest.raises(error, match=match):
        prompt.PromptConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown PromptConfig field"):
        prompt.PromptConfig.from_dict({"num_tokens": 3, "depth": 2})


def test_backend_conflict_and_switched_attention_are_errors():
    with pytest.raises(ValueError, match="contradicts"):
        prompt.apply(make("vit"), prompt.PromptConfig(backend="reference"), backend="triton")
    model = prompt.apply(make("vit"), prompt.PromptConfig(), backend="reference")
    model.set_attn_implementation("eager")  # would silently ignore the prompts
    with pytest.raises(RuntimeError, match="attention implementation is 'eager'"):
        model(**inputs("vit"))


def test_shallow_refuses_a_padding_mask():
    model = prompt.apply(make("vit"), prompt.PromptConfig(deep=False), backend="reference")
    mask = torch.ones(B, 17, dtype=torch.long)
    want = model(**inputs("vit")).logits
    assert torch.equal(model(**inputs("vit"), attention_mask=mask).logits, want)  # all ones: transformers drops it
    mask[0, 5] = 0
    with pytest.raises(NotImplementedError, match="does not cover the inserted prompt tokens"):
        model(**inputs("vit"), attention_mask=mask)


def test_deep_takes_a_padding_mask():
    """Deep prompts are keys every query sees; masked patches stay masked. The reference widens the
    model's own 4-D mask by N visible columns (and rows, whose outputs are dropped)."""
    model, ref, ref_params = pair("vit", deep=True)
    layers = [m for m in ref.modules() if type(m).__name__ == "ViTLayer"]

    def widen(mod, args, kwargs):
        mask = args[1]
        assert mask is not None and mask.dim() == 4
        fill = True if mask.dtype == torch.bool else 0.0
        cols = torch.full((*mask.shape[:3], N_TOK), fill, dtype=mask.dtype)
        mask = torch.cat((mask[..., :1], cols, mask[..., 1:]), -1)
        rows = torch.full((mask.shape[0], mask.shape[1], N_TOK, mask.shape[3]), fill, dtype=mask.dtype)
        return (args[0], torch.cat((mask[:, :, :1], rows, mask[:, :, 1:]), 2), *args[2:]), kwargs

    for layer in layers:  # registered after the prompt-inserting hooks: sees the longer sequence
        layer.register_forward_pre_hook(widen, with_kwargs=True)
    mask = torch.ones(B, 17, dtype=torch.long)
    mask[0, 3:9] = 0
    mask[2, 16] = 0
    batch = {**inputs("vit"), "attention_mask": mask}
    assert_parity(model, ref, ref_params, "vit", batch=batch)
    assert not torch.allclose(model(**batch).logits, model(**inputs("vit")).logits, atol=1e-6)


def test_prompt_dropout_is_one_mask_per_layer_and_off_in_eval():
    model = prompt.apply(make("vit"), prompt.PromptConfig(num_tokens=N_TOK, dropout=0.5), backend="reference")
    x = inputs("vit")
    model.eval()
    a, b = model(**x).logits, model(**x).logits
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(5)
    c = model(**x).logits
    torch.manual_seed(5)
    assert torch.equal(model(**x).logits, c)  # the mask follows torch's generator
    assert not torch.allclose(c, a)

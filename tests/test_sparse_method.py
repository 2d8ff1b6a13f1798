"""Sparse fine-tuning on tiny Hugging Face models: config checks, selection, training, merge / unmerge,
save / load, composing and removing deltas, and tunefast.patch's report."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tunefast
from tests import models
from tunefast.methods import sparse
from tunefast.methods.sparse.layer import weight_nk


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are all thread synchronisation: on this 2-core box, shared with other test runs, 30
    steps of the tiny Llama took 0.17 s with one torch thread and 6-17 s with two (dense fine-tuning:
    20 s). The kernels' threading is tested in test_sparse_op.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**kw):
    """Model tests run the native C++ kernels: "auto" would interpret Triton here (TRITON_INTERPRET=1),
    ~2 s per training step of the tiny model. test_patch... runs Triton on one forward."""
    kw.setdefault("backend", "reference")
    return sparse.SparseConfig(**kw)


def _llama():
    return models.base_model("llama"), models.batch("llama")


def _bits(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_bits(a: dict, b: dict) -> bool:
    """Equal bit patterns (-0.0 != 0.0), tensor by tensor."""
    raw = lambda t: t.view(torch.uint8) if t.dtype.is_floating_point else t  # noqa: E731
    return a.keys() == b.keys() and all(torch.equal(raw(a[k]), raw(b[k])) for k in a)


def _randomise(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sparse.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _dense_equivalent(original, model, names=None):
    """A copy of ``original`` whose weights hold W + the deltas (dense, fp32), for the oracle."""
    dense = copy.deepcopy(original)
    for layer_name, layer in sparse.sparse_layers(model).items():
        target = dense.get_submodule(layer_name)
        w = weight_nk(target)
        for n, d in layer.deltas.items():
            if names is not None and n not in names:
                continue
            with torch.no_grad():
                r, c = d.indices // w.shape[1], d.indices % w.shape[1]
                w[r, c] += d.values.detach().to(w.dtype)
                if d.bias is not None:
                    target.bias += d.bias.detach().to(target.bias.dtype)
    return dense


# ---- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(density=0.0), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=1.5), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=-0.1), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=float("nan")), ValueError, r"density must be in \(0, 1\]"),
        (dict(density=None), TypeError, "density must be a number"),
        (dict(selection="fisher"), ValueError, "selection must be one of"),
        (dict(target_modules=[]), ValueError, "target_modules must be non-empty"),
        (dict(target_modules=3), TypeError, "target_modules must be"),
        (dict(dtype="float64"), ValueError, "dtype must be one of"),
        (dict(train_bias="yes"), TypeError, "train_bias must be a bool"),
        (dict(gradient_chunk_layers=0), ValueError, "gradient_chunk_layers"),
        (dict(selection={"q": [3, 1]}), ValueError, "not sorted"),
        (dict(selection={"q": [1, 1]}), ValueError, "duplicated"),
        (dict(selection={"q": [-2]}), ValueError, "must be non-negative"),
        (dict(selection={"q": [0.5]}), TypeError, "integers"),
        (dict(selection={}), ValueError, "empty mapping"),
        (dict(selection={"q": [1]}, target_modules=["k"]), ValueError, "mapping's keys"),
    ],
)
def test_config_rejects_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sparse.SparseConfig(**kwargs)


def test_apply_rejects_bad_targets():
    model, _ = _llama()
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        sparse.apply(model, _cfg(target_modules=["query_proj"]))
    with pytest.raises(ValueError, match="non-linear module.*LlamaMLP"):
        sparse.apply(model, _cfg(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="non-linear module"):
        sparse.apply(model, _cfg(target_modules=r".*layers\.0\.self_attn.*"))
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="out of range: 4096 >= 4096"):
        sparse.apply(model, _cfg(selection={name: [1, 4096]}))
    with pytest.raises(ValueError, match="does not have"):
        sparse.apply(model, _cfg(selection={"model.layers.0.q": [1]}))
    with pytest.raises(ValueError, match="needs batches"):
        sparse.apply(model, _cfg(selection="gradient"))
    assert not sparse.sparse_layers(model)  # nothing was changed by the failed calls
    sparse.apply(model, _cfg(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has a delta named 'default'"):
        sparse.apply(model, _cfg(target_modules=["q_proj"]))


# ---- apply: what is trainable, what runs -------------------------------------------------------------


def test_apply_freezes_everything_but_the_values():
    model, inputs = _llama()
    original = copy.deepcopy(model)
    before = model(**inputs).logits
    sparse.apply(model, _cfg(density=0.01))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".values") for n in trainable)
    layers = sparse.sparse_layers(model)
    assert len(layers) == 14 and "lm_head" not in layers  # all-linear: 7 per block, not the output head
    for name, layer in layers.items():
        n, k = layer.out_features, layer.in_features
        d = layer.deltas["default"]
        assert d.nnz == max(1, round(0.01 * n * k)) and d.values.dtype == torch.float32
        assert torch.all(d.indices[1:] > d.indices[:-1])
        assert layer.base_layer is not original.get_submodule(name) and isinstance(layer.base_layer, nn.Linear)
        assert layer.weight is layer.base_layer.weight and not layer.weight.requires_grad
    torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)  # zero deltas: same function
    assert sum(p.numel() for p in trainable.values()) == sum(d.nnz for l in layers.values() for d in l.deltas.values())


@pytest.mark.parametrize("family,targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc", "c_proj"]),
                                            ("bert", ["query", "value", "dense"])])
def test_forward_and_gradients_equal_the_dense_model(family, targets):
    model = models.base_model(family)
    inputs = models.batch(family)
    original = copy.deepcopy(model)
    sparse.apply(model, _cfg(density=0.05, target_modules=targets, train_bias=family == "gpt2"))
    _randomise(model)
    dense = _dense_equivalent(original, model)
    out, want = model(**inputs), dense(**inputs)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for p in dense.parameters():
        p.requires_grad_(True)
    dense(**inputs).loss.backward()
    for layer_name, layer in sparse.sparse_layers(model).items():
        d = layer.deltas["default"]
        w = weight_nk(dense.get_submodule(layer_name))
        grad = (w.grad if w.grad is not None else dense.get_submodule(layer_name).weight.grad.t()).reshape(-1)
        torch.testing.assert_close(d.values.grad, grad[d.indices], rtol=1e-4, atol=1e-6)
        if d.bias is not None:
            torch.testing.assert_close(d.bias.grad, dense.get_submodule(layer_name).bias.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


class _DenseShapes(TorchDispatchMode):
    """Records the shape of every tensor any op creates, and the most fp32 storages of a shape in
    ``shapes`` alive at once (the storages of ``params``, e.g. views of the weights, excluded)."""

    def __init__(self, shapes, params=()):
        super().__init__()
        self.shapes, self.seen, self.alive, self.max_alive = set(shapes), set(), {}, 0
        self.skip = {p.untyped_storage().data_ptr() for p in params}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
                ptr = t.untyped_storage().data_ptr()
                if tuple(t.shape) in self.shapes and t.dtype == torch.float32 and ptr not in self.skip:
                    self.alive = {p: r for p, r in self.alive.items() if r() is not None}
                    self.alive.setdefault(ptr, weakref.ref(t))
                    self.max_alive = max(self.max_alive, len(self.alive))
        return out


def test_training_step_forms_no_dense_weight_gradient():
    model, inputs = _llama()
    sparse.apply(model, _cfg(density=0.01))
    shapes = {tuple(l.weight_nk().shape) for l in sparse.sparse_layers(model).values()}
    shapes |= {s[::-1] for s in shapes}
    out = model(**inputs)
    with _DenseShapes(shapes) as rec:
        out.loss.backward()
    assert not rec.seen & shapes, rec.seen & shapes
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_tiny_model_trained_at_one_percent_lowers_its_loss():
    model, inputs = _llama()
    sparse.apply(model, _cfg(density=0.01))
    opt = torch.optim.Adam(sparse.trainable_parameters(model), lr=3e-2)
    losses = []
    for _ in range(30):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(b <= a + 1e-3 for a, b in zip(losses[:5], losses[1:6])), losses  # it descends from the start


def test_bf16_model_trains_with_fp32_values():
    model = models.base_model("llama", dtype=torch.bfloat16)
    inputs = models.batch("llama")
    sparse.apply(model, _cfg(density=0.02))
    opt = torch.optim.Adam(sparse.trainable_parameters(model), lr=3e-2)
    first = None
    for _ in range(10):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first or loss.item()
    assert loss.item() < first
    assert all(p.dtype == torch.float32 for p in sparse.trainable_parameters(model))


# ---- selection ---------------------------------------------------------------------------------------


def test_random_selection_is_seeded():
    a, b, c = (_llama()[0] for _ in range(3))
    for m, seed in ((a, 1), (b, 1), (c, 2)):
        sparse.apply(m, _cfg(density=0.05, seed=seed))
    idx = lambda m: torch.cat([l.deltas["default"].indices for l in sparse.sparse_layers(m).values()])  # noqa: E731
    assert torch.equal(idx(a), idx(b)) and not torch.equal(idx(a), idx(c))


def test_magnitude_selection_takes_the_largest_entries():
    model = models.base_model("gpt2")  # Conv1D: indices address the logical (out, in) weight
    sparse.apply(model, _cfg(density=0.02, selection="magnitude", target_modules=["c_fc"]))
    for layer in sparse.sparse_layers(model).values():
        d = layer.deltas["default"]
        mag = layer.weight_nk().abs().reshape(-1)
        chosen = torch.zeros_like(mag, dtype=torch.bool)
        chosen[d.indices] = True
        assert mag[chosen].min() >= mag[~chosen].max()


def _full_gradient_top(model, batches, density):
    """The oracle: ordinary dense gradients of every targeted weight, summed over the batches."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    for b in batches:
        m(**b).loss.backward()
    out = {}
    for n, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and n != "lm_head":
            g = mod.weight.grad.abs().reshape(-1)
            out[n] = torch.topk(g, max(1, round(density * g.numel()))).indices.sort().values
    return out


def test_gradient_selection_matches_dense_gradients_one_layer_at_a_time():
    model, _ = _llama()
    batches = [models.batch("llama", seed=s) for s in (1, 2)]
    want = _full_gradient_top(model, batches, 0.05)
    shapes = {tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with _DenseShapes(shapes, model.parameters()) as rec:
        sparse.apply(model, _cfg(density=0.05, selection="gradient"), batches=batches)
    assert rec.max_alive <= 1  # one layer's dense (out, in) score at a time, never every gradient
    got = {n: l.deltas["default"].indices for n, l in sparse.sparse_layers(model).items()}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    chunked, _ = _llama()
    sparse.apply(chunked, _cfg(density=0.05, selection="gradient", gradient_chunk_layers=5),
                 batches=batches)
    for n, l in sparse.sparse_layers(chunked).items():
        assert torch.equal(l.deltas["default"].indices, got[n])


def test_gradient_selection_with_a_custom_loss():
    model, inputs = _llama()
    loss_fn = lambda m, b: m(input_ids=b).logits.float().pow(2).mean()  # noqa: E731
    sparse.apply(model, _cfg(density=0.05, selection="gradient", target_modules=["v_proj"]),
                 batches=[inputs["input_ids"]], loss_fn=loss_fn)
    assert len(sparse.sparse_layers(model)) == 2


def test_explicit_indices():
    model, inputs = _llama()
    name = "model.layers.1.mlp.down_proj"  # (64, 96)
    sparse.apply(model, _cfg(selection={name: [0, 95, 96, 6143]}))
    layers = sparse.sparse_layers(model)
    assert list(layers) == [name]
    assert layers[name].deltas["default"].indices.tolist() == [0, 95, 96, 6143]


# ---- merge / unmerge, save / load, compose / remove ------------------------------------------------


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_merge_unmerge_round_trip_is_exact(family, dtype):
    model = models.base_model(family, dtype=dtype)
    inputs = models.batch(family)
    base_bits = _bits(model)
    sparse.apply(model, _cfg(density=0.05, train_bias=True, target_modules="all-linear"))
    _randomise(model)
    unmerged = model(**inputs).logits
    sparse.merge(model)
    assert all(d.merged for l in sparse.sparse_layers(model).values() for d in l.deltas.values())
    merged = model(**inputs).logits
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
    base = {k.replace("base_layer.", ""): v for k, v in _bits(model).items() if "deltas." not in k}
    assert not _same_bits(base, base_bits)  # the weights changed
    sparse.unmerge(model)
    base = {k.replace("base_layer.", ""): v for k, v in _bits(model).items() if "deltas." not in k}
    assert _same_bits(base, base_bits)
    torch.testing.assert_close(model(**inputs).logits, unmerged, rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    model, inputs = _llama()
    fresh = copy.deepcopy(model)
    sparse.apply(model, _cfg(density=0.03, target_modules=["q_proj", "up_proj"], dtype="bfloat16"))
    _randomise(model)
    want = model(**inputs).logits
    sparse.save(model, tmp_path / "delta")
    sparse.load(fresh, tmp_path / "delta", backend="reference")
    assert not any(p.requires_grad for p in sparse.sparse_layers(fresh)["model.layers.0.self_attn.q_proj"].parameters()
                   if p.dim() == 1 and p.dtype == torch.bfloat16)
    for n, layer in sparse.sparse_layers(model).items():
        a, b = layer.deltas["default"], sparse.sparse_layers(fresh)[n].deltas["default"]
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        assert b.values.dtype == torch.bfloat16
    torch.testing.assert_close(fresh(**inputs).logits, want, rtol=0, atol=0)
    other = models.base_model("gpt2")
    with pytest.raises(ValueError, match="the saved delta has layer 'model.layers.0.*not found"):
        sparse.load(other, tmp_path / "delta")
    with pytest.raises(ValueError, match="already has a delta named 'default'"):
        sparse.load(fresh, tmp_path / "delta")
    with pytest.raises(FileNotFoundError):
        sparse.load(fresh, tmp_path / "nothing")


def test_compose_two_deltas_then_remove_them(tmp_path):
    model, inputs = _llama()
    original = copy.deepcopy(model)
    original_bits, original_q = _bits(model), model.model.layers[0].self_attn.q_proj
    # A "language" delta and a "task" delta with overlapping entries, trained and saved separately.
    for i, name in enumerate(("lang", "task")):
        m = copy.deepcopy(original)
        sparse.apply(m, _cfg(density=0.3, seed=i, train_bias=False))
        _randomise(m, seed=i)
        sparse.save(m, tmp_path / name)
    sparse.load(model, tmp_path / "lang", name="lang", backend="reference")
    sparse.load(model, tmp_path / "task", name="task", backend="reference")
    assert sparse.delta_names(model) == ["lang", "task"]
    composed = model(**inputs).logits
    torch.testing.assert_close(composed, _dense_equivalent(original, model)(**inputs).logits, rtol=1e-5, atol=1e-5)
    sparse.merge(model, "lang")  # the language delta folded into the weights, the task delta still sparse
    torch.testing.assert_close(model(**inputs).logits, composed, rtol=1e-5, atol=1e-5)
    sparse.merge(model)
    torch.testing.assert_close(model(**inputs).logits, composed, rtol=1e-5, atol=1e-5)
    sparse.remove(model, "lang")  # unmerges both, removes lang, merges task again
    task_only = _dense_equivalent(original, model)(**inputs).logits
    torch.testing.assert_close(model(**inputs).logits, task_only, rtol=1e-5, atol=1e-5)
    sparse.remove(model)
    assert not sparse.sparse_layers(model)
    assert model.model.layers[0].self_attn.q_proj is original_q
    assert _same_bits(_bits(model), original_bits)


# ---- tunefast.patch reports sparse layers -----------------------------------------------------------


def test_patch_reports_sparse_layers_with_their_kernel():
    model, inputs = _llama()
    sparse.apply(model, _cfg(density=0.01, target_modules=["q_proj", "v_proj"]))
    _randomise(model)
    want = model(**inputs).logits
    report = tunefast.patch(model, backend="reference")
    assert len(report.patched) == 5 and not report.skipped  # 4 sparse layers + the fused LM head
    head = {"linear_cross_entropy[reference]": 1}
    assert report.kernels() == {"sparse_linear[torch]": 4, **head}  # "reference" is plain PyTorch
    assert "nnz=41" in report.patched[0].detail
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}  # training + labels: the fused head keeps no logits
    torch.testing.assert_close(model(**no_labels).logits, want, rtol=1e-6, atol=1e-6)
    tunefast.unpatch(model)
    sparse.merge(model)
    report = tunefast.patch(model, backend="triton")
    assert len(report.skipped) == 4 and "resumes after unmerge" in report.skipped[0].reason
    sparse.unmerge(model)
    assert report.skipped and tunefast.get_report(model) is report
    torch.testing.assert_close(model(**no_labels).logits, want, rtol=1e-5, atol=1e-5)  # triton now runs
    tunefast.unpatch(model)


def test_state_dict_round_trip_rebuilds_the_index_structure():
    """load_state_dict with other indices (same counts): the kernels' CSR / column order follow them."""
    a, inputs = _llama()
    b = copy.deepcopy(a)
    sparse.apply(a, _cfg(density=0.05, seed=1, target_modules=["o_proj"]))
    sparse.apply(b, _cfg(density=0.05, seed=2, target_modules=["o_proj"]))
    _randomise(a)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(**inputs).logits, a(**inputs).logits, rtol=0, atol=0)

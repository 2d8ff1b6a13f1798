"""Convergence: patched and unpatched PEFT models trained side by side give the same loss curve."""

import pytest
import torch

import tunefast
from tests import models as M


def _progressions(bsz=4, seq=12, seed=0):
    """A learnable language: arithmetic progressions mod the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, M.VOCAB, (bsz, 1), generator=g) + torch.randint(1, 4, (bsz, 1), generator=g)
           * torch.arange(seq)) % M.VOCAB
    return {"input_ids": ids, "labels": ids}


def _train(model, batches, steps=20, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_curves_match_peft(family):
    model = M.peft_model(family, "all-linear" if family == "llama" else ["c_attn", "c_fc"])
    patched = M.clone(model)
    tunefast.patch(patched, backend="reference")
    batches = [_progressions(seed=s) for s in range(2)]
    want = _train(model, batches)
    got = _train(patched, batches)
    assert want[0] - want[-1] > 0.2, "the loss must move for this comparison to mean anything"
    for step, (a, b) in enumerate(zip(want, got)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: PEFT {a:.6f} vs tunefast {b:.6f}"


def test_dropout_training_is_reproducible_across_backends():
    """With dropout, triton (interpreter) and reference draw the same masks from the same seeds."""
    curves = []
    for backend in ("reference", "triton"):
        model = M.peft_model("llama", ["q_proj", "v_proj"], dropout=0.2)
        tunefast.patch(model, backend=backend)
        torch.manual_seed(7)
        curves.append(_train(model, [M.batch("llama", bsz=2, seq=8, seed=s) for s in range(2)], steps=6))
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-4 * abs(a)

"""Prefix tuning on more encoder-decoder families (mT5, mBART): rows of patching/prefix.py's
SEQ2SEQ_PREFIX table, checked against unpatched PEFT (training loss, logits, gradients, generate)."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf

import tunefast
from tests import models as M
from tests import prefix_models as PM
from tests.test_patch_prefix import assert_parity, attention_entries


def _mt5():
    cfg = tf.MT5Config(vocab_size=M.VOCAB, d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4,
                       dropout_rate=0.0, decoder_start_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return tf.MT5ForConditionalGeneration(cfg)


def _mbart():
    cfg = tf.MBartConfig(vocab_size=M.VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.MBartForConditionalGeneration(cfg)


FAMILIES = {"mt5": _mt5, "mbart": _mbart}


def _prefix_model(family, projection):
    pcfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=PM.N_VIRTUAL,
                                   prefix_projection=projection, encoder_hidden_size=32)
    base = FAMILIES[family]()
    torch.manual_seed(200)
    return peft.get_peft_model(base, pcfg)


CASES = [("mt5", False, "reference"), ("mt5", True, "triton"), ("mbart", False, "triton"), ("mbart", True, "reference")]


@pytest.mark.parametrize("family,projection,backend", CASES,
                         ids=[f"{f}-{'proj' if p else 'emb'}-{b}" for f, p, b in CASES])
def test_prefix_parity_with_peft(family, projection, backend):
    model = _prefix_model(family, projection)
    patched = copy.deepcopy(model)
    entries, skipped = attention_entries(tunefast.patch(patched, backend=backend))
    assert len(entries) == 6 and not skipped, (entries, skipped)  # encoder self, decoder self, cross x 2 layers
    assert sum(f"prefix {PM.N_VIRTUAL}" in e.detail for e in entries) == 2, entries  # decoder self-attention only
    inputs = PM.seq2seq_batch()
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_checkpointing_and_generate_match_peft(family):
    model = _prefix_model(family, projection=True)
    patched = copy.deepcopy(model)
    tunefast.patch(patched, backend="reference")
    patched.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(), patched.train()
    inputs = PM.seq2seq_batch()
    assert_parity(PM.logits_loss_grads(model, inputs), PM.logits_loss_grads(patched, inputs))
    model.eval(), patched.eval()
    PM.assert_same_greedy(model, patched, inputs)

"""PEFT prompt-learning models on the tiny configs of tests/models.py, and PEFT-semantics oracles."""

from __future__ import annotations

import peft
import torch
import transformers as tf

from tests import models as M

N_VIRTUAL = 5
PREFIX_FAMILIES = ("llama", "qwen2", "gpt2", "bert")


def task_type(family: str) -> str:
    return "SEQ_CLS" if family == "bert" else "CAUSAL_LM"


def prefix_model(family: str, *, projection: bool = False, n_virtual: int = N_VIRTUAL, seed: int = 0, base=None):
    """PREFIX_TUNING (projection=True: P-Tuning v2's MLP reparametrisation)."""
    base = M.base_model(family, seed=seed) if base is None else base
    cfg = peft.PrefixTuningConfig(task_type=task_type(family), num_virtual_tokens=n_virtual,
                                  prefix_projection=projection, encoder_hidden_size=32)
    torch.manual_seed(seed + 200)
    return peft.get_peft_model(base, cfg)


def prompt_model(family: str, kind: str, *, n_virtual: int = N_VIRTUAL, seed: int = 0):
    """kind "prompt": PROMPT_TUNING; "p": P_TUNING (MLP prompt encoder)."""
    base = M.base_model(family, seed=seed)
    if kind == "prompt":
        cfg = peft.PromptTuningConfig(task_type=task_type(family), num_virtual_tokens=n_virtual)
    else:
        cfg = peft.PromptEncoderConfig(task_type=task_type(family), num_virtual_tokens=n_virtual, encoder_hidden_size=32)
    torch.manual_seed(seed + 300)
    return peft.get_peft_model(base, cfg)


def roberta_prefix_model():
    """RoBERTa: padding-aware positions (offset by the prefix length, as its embeddings do with a cache)."""
    cfg = tf.RobertaConfig(vocab_size=M.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           max_position_embeddings=64, num_labels=3, pad_token_id=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return prefix_model("bert", base=tf.RobertaForSequenceClassification(cfg))


SLIDING_FAMILIES = ("mistral", "qwen2-sliding", "gemma2", "gemma3")


def sliding_window_base(family: str, window: int, **extra):
    """Tiny decoders with sliding-window layers (head dim 16 = hidden / heads, as PEFT's prefix assumes).

    mistral: every layer windowed; qwen2-sliding: layer 1 windowed (use_sliding_window, max_window_layers=1);
    gemma2 / gemma3: alternating local / global layers (Gemma 2 without its logit soft-capping unless
    ``extra`` sets it)."""
    common = dict(vocab_size=M.VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, sliding_window=window)
    if family == "mistral":
        cfg, cls = tf.MistralConfig(**common, **extra), tf.MistralForCausalLM
    elif family == "qwen2-sliding":
        cfg, cls = tf.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1, **extra), tf.Qwen2ForCausalLM
    elif family == "gemma2":
        extra = {"attn_logit_softcapping": None, **extra}
        cfg, cls = tf.Gemma2Config(**common, head_dim=16, **extra), tf.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, layer_types=["sliding_attention", "full_attention"], **extra)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown sliding-window family {family!r}; expected one of {SLIDING_FAMILIES}")
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg)


def sliding_window_prefix_model(family: str = "mistral", window: int = 16, *, projection: bool = False, **extra):
    return prefix_model("llama", base=sliding_window_base(family, window, **extra), projection=projection)


def peft_prefix_encoder_outputs(model, inputs):
    """PEFT's prefix-tuning semantics on BERT / RoBERTa, which PEFT itself refuses ("Model does not
    support past key values"): its own prefix cache (get_prompt), the mask extended by P ones, through
    the encoder backbone (whose embeddings then shift positions by P), the classifier, cross-entropy."""
    head = model.base_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = model.get_prompt(ids.shape[0])
    full_mask = torch.cat([mask.new_ones(ids.shape[0], model.active_peft_config.num_virtual_tokens), mask], dim=1)
    if hasattr(head, "bert"):
        out = head.bert(input_ids=ids, attention_mask=full_mask, past_key_values=cache)
        logits = head.classifier(head.dropout(out.pooler_output))
    else:  # RoBERTa's head reads the first token of the last hidden state
        out = head.roberta(input_ids=ids, attention_mask=full_mask, past_key_values=cache)
        logits = head.classifier(out.last_hidden_state)
    return logits, torch.nn.functional.cross_entropy(logits, inputs["labels"])


def logits_loss_grads(model, inputs, forward=None):
    """Forward + backward; (logits, loss, {trainable name: grad}). ``forward`` overrides model(**inputs)."""
    model.zero_grad(set_to_none=True)
    if forward is None:
        out = model(**inputs)
        logits, loss = out.logits, out.loss
        if logits is None:  # a fused LM-head loss (tunefast's lm_head handler) keeps no logits: ask without labels
            with torch.no_grad():
                logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    else:
        logits, loss = forward(model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), loss.detach(), grads


def bart_prefix_model(*, projection: bool = False, n_virtual: int = N_VIRTUAL):
    """A tiny BART (no dropout) with PEFT prefix tuning (SEQ_2_SEQ_LM: the prefix on decoder self-attention)."""
    cfg = tf.BartConfig(vocab_size=M.VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    base = tf.BartForConditionalGeneration(cfg)
    pcfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n_virtual,
                                   prefix_projection=projection, encoder_hidden_size=32)
    torch.manual_seed(200)
    return peft.get_peft_model(base, pcfg)


def seq2seq_batch(bsz=2, src=9, tgt=6, seed=1):
    """Padded source and target (decoder) sequences with labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, M.VOCAB, (bsz, src), generator=g)
    mask = torch.ones(bsz, src, dtype=torch.long)
    mask[0, -3:] = 0
    labels = torch.randint(3, M.VOCAB, (bsz, tgt), generator=g)
    labels[1, -2:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def t5_prefix_model(*, projection: bool = False, n_virtual: int = N_VIRTUAL):
    """The tiny T5 of tests/models.py (no dropout) with PEFT prefix tuning."""
    base = M.base_model("t5")
    pcfg = peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n_virtual,
                                   prefix_projection=projection, encoder_hidden_size=32)
    torch.manual_seed(200)
    return peft.get_peft_model(base, pcfg)


def assert_same_greedy(model, patched, inputs, max_new_tokens=4):
    """Greedy generate() of both: the same tokens, and every step's scores within 1e-5."""
    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
              do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True)
    want, got = model.generate(**kw), patched.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

"""Tiny Hugging Face models built from configs (no download), and PEFT wrappers for tests."""

from __future__ import annotations

import copy

import torch
import transformers as tf

VOCAB = 128

# family -> (config factory, model class, LoRA target module sets to test). Dropouts are 0 so train and
# eval mode compute the same function.
FAMILIES = {
    "llama": (
        lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        tf.LlamaForCausalLM,
        ["all-linear", ["q_proj", "v_proj"]],
    ),
    "qwen2": (
        lambda: tf.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
        tf.Qwen2ForCausalLM,
        [["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]],
    ),
    "gpt2": (
        lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        tf.GPT2LMHeadModel,
        [["c_attn"], ["c_attn", "c_proj", "c_fc"]],
    ),
    "bert": (
        lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              max_position_embeddings=64, num_labels=3),
        tf.BertForSequenceClassification,
        [["query", "value"], ["query", "key", "value", "dense"]],
    ),
    "t5": (
        lambda: tf.T5Config(vocab_size=VOCAB, d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4,
                            dropout_rate=0.0, decoder_start_token_id=0),
        tf.T5ForConditionalGeneration,
        [["q", "v"], ["q", "k", "v", "o", "wi", "wo"]],
    ),
}


def base_model(family: str, dtype=torch.float32, seed: int = 0):
    make_config, cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = make_config()
    cfg._attn_implementation = "eager"
    return cls(cfg).to(dtype)


def peft_model(family: str, targets="all-linear", *, r=8, dropout=0.0, bias="none", lora_bias=False,
               adapters=("default",), use_dora=False, use_rslora=False, dtype=torch.float32, seed=0, **extra):
    """A PEFT LoRA model whose B matrices are random (init_lora_weights=False) so LoRA changes outputs."""
    import peft

    model = base_model(family, dtype, seed)
    task = "SEQ_CLS" if family == "bert" else ("SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM")
    fan_in_fan_out = family == "gpt2"
    for i, name in enumerate(adapters):
        cfg = peft.LoraConfig(r=r + 4 * i, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                              bias=bias, lora_bias=lora_bias, init_lora_weights=False, task_type=task,
                              fan_in_fan_out=fan_in_fan_out, use_dora=use_dora, use_rslora=use_rslora, **extra)
        torch.manual_seed(seed + 100 + i)
        if i == 0:
            model = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    if len(adapters) > 1:
        model.base_model.set_adapter(list(adapters))
    return model


def batch(family: str, bsz=2, seq=9, seed=1):
    """A padded batch with labels for the family's head."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[0, -3:] = 0  # padding in the first row
    out = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        out["labels"] = torch.randint(0, 3, (bsz,), generator=g)
    elif family == "t5":
        out["labels"] = torch.randint(3, VOCAB, (bsz, 5), generator=g)
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def clone(model):
    return copy.deepcopy(model)


def logits_loss_grads(model, inputs):
    """Run forward + backward; return (logits, loss, {trainable param name: grad})."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    logits = out.logits
    if logits is None:  # the fused LM-head loss keeps no logits in training with labels: ask without labels
        with torch.no_grad():
            logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return logits.detach(), out.loss.detach(), grads

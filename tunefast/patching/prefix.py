"""PEFT prompt learning -> prefix attention.

PREFIX_TUNING (with or without P-Tuning v2's projection MLP): PEFT copies the prefix into every batch
element at every layer through the KV cache (``past_key_values``). Patched, the PeftModel's forward
evaluates the prompt encoder once (batch 1), keeps the prefix as one (L, 2, Hkv, P, D) view and hands it
to the model as the ``tunefast_prefix`` keyword; transformers passes it to every attention call, where
prefix_interface.py runs the shared-prefix kernel. No cache is involved, so gradient checkpointing
works and encoders (BERT, RoBERTa) take prefixes although PEFT refuses them. Real tokens keep PEFT's
positions P .. P+T-1 (PEFT's cache has length P). ``generate`` keeps PEFT's own path (prefix injected
into the KV cache once at prefill); the attention still runs through the kernel, with P = 0.

PROMPT_TUNING and P_TUNING (virtual tokens prepended to the input embeddings): PEFT evaluates the
encoder once and broadcasts it (``repeat``), then one ``cat``; neither keeps anything for backward, so
the patched path would be the same computation: PEFT's path stays, with a report entry saying so.

Encoder-decoders (BART, T5; SEQ2SEQ_PREFIX): PEFT's EncoderDecoderCache gives the prefix to decoder
self-attention only (its encoder runs without a cache and it empties the cross-attention cache), so the
patched forward (seq2seq_prefix_forward) does the same: encoder self-attention and cross-attention run
the kernel with P = 0. BART's decoder positions are shifted by P as PEFT's cache shifts them; T5's
relative position bias reaches the kernel as one (H, T, P + T) bias shared by the batch.

Sliding-window layers (Mistral, Qwen2 with use_sliding_window, Gemma 2/3 local layers) run the kernel
with the model's window, which counts the prefix's positions exactly as PEFT's cache + transformers'
masks do (prefix_interface.py); Gemma 2's logit soft-capping, chunked attention (Llama 4) and
bidirectional windows are skipped with a reason.

The whole model is patched or not at all (a layer left on the cache path would lose its prefix):
every attention module must call transformers' attention interface. Facts that differ between
families live in the tables below, not in code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import warnings

import torch
from torch import nn

from .. import backend as _backend
from . import prefix_interface
from .registry import swap_in
from .report import PatchedEntry, SkippedEntry

_STATE = "_tunefast_prefix_state"  # in the PeftModel's __dict__ while patched

# Attribute names under which attention modules keep their facts, across transformers families.
HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")  # Llama, Qwen2, Mistral, GPT-2 | BERT, RoBERTa, ViT
DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout")  # a float (Llama) or nn.Dropout (GPT-2, BERT)
# Config fields of attention patterns the kernel does not implement (chunked attention: Llama 4).
UNSUPPORTED_ATTENTION_FIELDS = ("attention_chunk_size",)
# Per-layer attention types (config.layer_types) the kernel runs: sliding layers take the model's
# sliding_window as a local window that counts the prefix's positions, as PEFT's cache does.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# Config fields whose non-None value changes the attention math in a way the kernel does not do.
UNSUPPORTED_WHEN_SET = {
    "attn_logit_softcapping": "attention logit soft-capping",  # Gemma 2 (default 50.0)
}
# Config flags that make a decoder's sliding windows bidirectional (Gemma 3 embedding variants).
BIDIRECTIONAL_FLAGS = ("use_bidirectional_attention",)
# Model types for which PEFT lays out or injects the prefix specially (post-processing, shared-KV layers).
# Gemma 2 / 3 are not here: PEFT builds a sliding-window cache for them, which keeps only the last
# W - 1 prefix tokens of a local layer; those are exactly the prefix keys the window lets any query see.
SPECIAL_PREFIX_LAYOUT = ("bloom", "gpt_bigcode", "gemma4", "gemma4_text")
# Task types whose PeftModel forward is a plain "prefix, then base_model(**kwargs)"; SEQ_2_SEQ_LM has its
# own forward (seq2seq_prefix_forward) and a table entry per family (SEQ2SEQ_PREFIX).
SUPPORTED_TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")
# Encoder-decoders, per model type: PEFT's EncoderDecoderCache holds the prefix for decoder
# self-attention only (the encoder runs without a cache; PEFT empties the cross-attention cache), so
# ``prefix_modules`` (a regex over module names) says which attention modules take it; every other one
# runs with P = 0. ``positions``: the decoder's learned-position module, whose positions PEFT's cache
# shifts by P (None: relative positions only). ``bias_source``: the module whose compute_bias gives the
# relative position bias of the prefix keys (T5: PEFT's cache puts them at positions 0 .. P-1, before
# the decoder tokens at P .. P+T-1, and layer 0 biases all P + T keys).
_BART = dict(prefix_modules=r"decoder\.layers\.\d+\.self_attn$", positions=r"decoder\.embed_positions$")
_T5 = dict(prefix_modules=r"decoder\.block\.\d+\.layer\.0\.SelfAttention$",
           bias_source=r"decoder\.block\.0\.layer\.0\.SelfAttention$")
SEQ2SEQ_PREFIX = {
    "bart": _BART,
    "mbart": _BART,  # same module layout and learned positions (offset 2); pre-norm layers change nothing here
    "t5": _T5,
    "mt5": _T5,  # T5's modules under other class names (Flan-T5 is model type "t5")
}
BIAS_SOURCE = "_tunefast_bias_source"  # in an attention module's __dict__: where its prefix bias comes from
PREFIX_LAYER = "_tunefast_prefix_layer"  # in an attention module's __dict__: its layer of the prefix

INPUT_LEVEL_REASON = (
    "{kind} prepends virtual tokens to the input embeddings; PEFT evaluates the prompt encoder once, "
    "broadcasts it and concatenates, keeping nothing extra for backward: PEFT's path is kept"
)


def _calls_attention_interface(cls: type) -> bool:
    forward = inspect.unwrap(cls.forward)  # past decorators such as deprecate_kwarg
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _first_attr(module, names):
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    return None


def _dropout_p(module) -> float:
    d = _first_attr(module, DROPOUT_ATTRS)
    return float(d.p if isinstance(d, nn.Dropout) else (d or 0.0))


def _model_blocker(cfg, base) -> str | None:
    """Why the whole model cannot be patched, or None."""
    if cfg.task_type not in SUPPORTED_TASKS:
        return f"task type {cfg.task_type} (encoder-decoder prefixes) is not accelerated yet"
    text_cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    model_type = getattr(text_cfg, "model_type", "")
    if getattr(cfg, "num_transformer_submodules", 1) != 1 or cfg.task_type == "SEQ_2_SEQ_LM":
        if model_type not in SEQ2SEQ_PREFIX:
            return f"encoder-decoder prefix tuning of {model_type or type(base).__name__} models is not accelerated yet"
    if model_type in SPECIAL_PREFIX_LAYOUT:
        return f"PEFT lays out the prefix of {model_type} models specially"
    layer_types = list(getattr(text_cfg, "layer_types", None) or ())
    other = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if other:
        return f"attention layer types {other} (layer_types={layer_types}) are not implemented by the kernel"
    for name in UNSUPPORTED_ATTENTION_FIELDS:
        value = getattr(text_cfg, name, None)
        if value is not None:
            return f"chunked local attention ({name}={value}) is not implemented by the kernel"
    for name, what in UNSUPPORTED_WHEN_SET.items():
        value = getattr(text_cfg, name, None)
        if value is not None:
            return f"{what} ({name}={value}) is not implemented by the kernel"
    windowed = getattr(text_cfg, "sliding_window", None) is not None
    if windowed and (not getattr(text_cfg, "is_causal", True) or any(getattr(text_cfg, f, False) for f in BIDIRECTIONAL_FLAGS)):
        return "bidirectional sliding windows are not implemented by the kernel"
    if not getattr(base, "_can_set_attn_implementation", lambda: True)():
        return f"{type(base).__name__} cannot switch its attention implementation (it does not use the attention interface)"
    return None


def _takes_prefix(name, m, family) -> bool:
    """Whether PEFT gives this attention module the prefix (``family``: the SEQ2SEQ_PREFIX entry or None)."""
    if family is not None:
        return re.search(family["prefix_modules"], name) is not None
    return not getattr(m, "is_cross_attention", False)


def _module_detail(name, m, cfg, family=None):
    """(detail for a patched entry, None) or (None, the reason this attention module cannot be patched)."""
    head_dim = cfg.token_dim // cfg.num_attention_heads
    idx, mhd = getattr(m, "layer_idx", None), _first_attr(m, HEAD_DIM_ATTRS)
    if not _takes_prefix(name, m, family):
        what = "cross-attention" if getattr(m, "is_cross_attention", False) or family is None else "no prefix in PEFT"
        return f"{what}: P = 0", None
    if not isinstance(idx, int) or not 0 <= idx < cfg.num_layers:
        return None, f"{name}: layer_idx={idx!r} does not index the prefix's {cfg.num_layers} layers"
    if mhd is not None and int(mhd) != head_dim:
        return None, f"{name}: head dim {mhd} differs from the prefix's {head_dim}"
    p = _dropout_p(m)
    drop = f"; attention dropout {p:g} in the kernel (counter-based mask) in training" if p > 0 else ""
    mode = "causal" if getattr(m, "is_causal", True) else "bidirectional"
    window = _module_window(m)
    if window is not None:
        mode += f", sliding window {window} (counting the prefix's positions, as PEFT's cache does)"
    return f"layer {idx}: prefix {cfg.num_virtual_tokens} x {cfg.num_attention_heads} heads x {head_dim}, {mode}{drop}", None


def _module_window(m):
    """The sliding window an attention module passes to the attention function, or None (for the report).
    Qwen2 / Gemma keep it per layer (None on full layers); Mistral reads it from the config in every layer."""
    if hasattr(m, "sliding_window"):
        return m.sliding_window
    return getattr(getattr(m, "config", None), "sliding_window", None)


def _plan(model, backend):
    """(entries, ok): an entry per attention module; ok is False when anything blocks the model, and
    then every entry is a skip (a layer left on the cache path would silently lose its prefix)."""
    cfg, base = model.active_peft_config, model.base_model
    modules = dict(base.named_modules())
    attn = [n for n, m in modules.items() if _calls_attention_interface(type(m))]
    # attention-like modules neither calling the interface nor containing one that does
    other = [n for n, m in modules.items() if n and n not in attn and re.search(r"(Attention|Attn)$", type(m).__name__)
             and not any(a.startswith(n + ".") for a in attn)]
    details, problems = {}, [f"{n} ({type(modules[n]).__name__}) does not call transformers' attention interface" for n in other]
    if not attn:
        problems.append("no attention module calling transformers' attention interface was found")
    family = _seq2seq_family(base)
    for n in attn:
        details[n], problem = _module_detail(n, modules[n], cfg, family)
        problems += [problem] if problem else []
    reason = _model_blocker(cfg, base) or (problems[0] if problems else None)
    if reason is not None:
        entries = [SkippedEntry(f"base_model.{n}", reason) for n in attn]
        entries += [SkippedEntry(f"base_model.{n}", "does not call transformers' attention interface") for n in other]
        return entries or [SkippedEntry("base_model", reason)], False
    kernel = f"prefix_attention[{_backend.resolve(backend, _device(model))}]"
    return [PatchedEntry(f"base_model.{n}", kernel, details[n]) for n in attn], True


def _seq2seq_family(base):
    """The SEQ2SEQ_PREFIX entry of an encoder-decoder base model, or None."""
    if not getattr(base.config, "is_encoder_decoder", False):
        return None
    return SEQ2SEQ_PREFIX.get(getattr(base.config, "model_type", ""))


def _mark_prefix_layers(base, family) -> None:
    """Record in each attention module that takes the prefix which layer of it it reads (and, for T5,
    which module computes the prefix's position bias; kept in __dict__, not as a submodule)."""
    modules = dict(base.named_modules())
    source = None
    if family is not None and family.get("bias_source"):
        source = next(m for n, m in modules.items() if re.search(family["bias_source"], n))
    for name, m in modules.items():
        if _calls_attention_interface(type(m)) and _takes_prefix(name, m, family):
            m.__dict__[PREFIX_LAYER] = m.layer_idx
            if source is not None:
                m.__dict__[BIAS_SOURCE] = source


def _device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply(model, backend: str):
    """Model handler: patch a PEFT prompt-learning model; None for any other model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(model, PeftModel) or not model.active_peft_config.is_prompt_learning:
        return None
    cfg = model.active_peft_config
    kind = getattr(cfg.peft_type, "value", str(cfg.peft_type))
    encoder_name = f"prompt_encoder.{model.active_adapter}"
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        return [SkippedEntry(encoder_name, INPUT_LEVEL_REASON.format(kind=kind))]
    if kind != "PREFIX_TUNING":
        return [SkippedEntry(encoder_name, f"{kind} is not accelerated yet")]
    for p in model.parameters():
        if p.is_meta:
            raise ValueError(
                "the model has meta-device weights (shape only, no data): load or materialise them before "
                "tunefast.patch (e.g. from_pretrained without device_map='meta', or model.to_empty())"
            )
    entries, ok = _plan(model, backend)
    if not ok:
        return entries
    base = model.base_model
    previous = base.config._attn_implementation
    family = _seq2seq_family(base)
    hold = prefix_interface.Hold(backend)
    base.set_attn_implementation(hold.name)
    _mark_prefix_layers(base, family)
    swap_in(model, prefix_forward if family is None else seq2seq_prefix_forward, backend)
    model.__dict__[_STATE] = dict(attn_implementation=previous, hold=hold, positions=_position_source(base),
                                  decoder_positions=_decoder_positions(base, family))
    return entries


def undo(model) -> None:
    """Model handler: restore the attention implementation (the class swap is undone by unpatch)."""
    state = model.__dict__.pop(_STATE, None)
    if state is not None:
        model.base_model.set_attn_implementation(state["attn_implementation"])
        state["hold"].release()
        for m in model.base_model.modules():
            m.__dict__.pop(PREFIX_LAYER, None)
            m.__dict__.pop(BIAS_SOURCE, None)


def register_handlers() -> None:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    from . import registry

    registry.register_model(PeftModel, apply, undo)


# ----------------------------------------------------------------------------------------------------
# The patched PeftModel forward
# ----------------------------------------------------------------------------------------------------


def _position_source(base):
    """Embeddings that derive positions from padding (RoBERTa family), or None: positions are arange."""
    for m in base.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and hasattr(m, "padding_idx"):
            return m
    return None


def _positions(state, input_ids, inputs_embeds, n_prefix, position_ids):
    """PEFT's positions for the real tokens: shifted by the P prefix tokens of its cache."""
    if position_ids is not None:
        return position_ids + n_prefix
    embed = state["positions"]
    if embed is not None:  # RoBERTa: padding-aware positions, offset by the cache length when ids are given
        if input_ids is not None:
            return embed.create_position_ids_from_input_ids(input_ids, embed.padding_idx, n_prefix)
        return embed.create_position_ids_from_inputs_embeds(inputs_embeds, embed.padding_idx)
    ref = input_ids if input_ids is not None else inputs_embeds
    return torch.arange(n_prefix, n_prefix + ref.shape[1], device=ref.device).unsqueeze(0)


def layer_prefix(model):
    """The active adapter's prefix as an (L, 2, Hkv, P, D) view: the prompt encoder run once, not per
    batch element (PEFT runs it on B identical rows); its parameters get the batch-summed gradient."""
    cfg = model.active_peft_config
    adapter = model.active_adapter
    encoder = model.prompt_encoder[adapter]
    n = cfg.num_virtual_tokens
    if cfg.inference_mode:
        kv = encoder.embedding.weight
    else:
        tokens = model.prompt_tokens[adapter][:n].unsqueeze(0).to(encoder.embedding.weight.device)
        kv = encoder(tokens)[0]
    dtype = model.base_model_torch_dtype
    if dtype is not None:
        kv = kv.to(dtype)
    heads, layers = cfg.num_attention_heads, cfg.num_layers
    if getattr(cfg, "num_transformer_submodules", 1) == 1:
        return kv.view(n, layers, 2, heads, cfg.token_dim // heads).permute(1, 2, 3, 0, 4)
    # Encoder-decoders: PEFT duplicates the 2L rows (key, value per layer) to 4L and hands layer i rows
    # 4i .. 4i+3 as (self key, self value, cross key, cross value), then empties the cross cache: decoder
    # layer i reads rows 4i and 4i + 1 of the duplicated list, i.e. rows 4i mod 2L and 4i + 1 mod 2L.
    rows = kv.view(n, 2 * layers, heads, cfg.token_dim // heads).permute(1, 2, 0, 3)  # (2L, H, P, D)
    first = (4 * torch.arange(layers, device=rows.device)) % (2 * layers)
    return torch.stack([rows[first], rows[first + 1]], dim=1)  # (L, 2, H, P, D)


def _reentrant_checkpointing(base) -> bool:
    """Whether a layer will checkpoint with use_reentrant=True (torch's default when unspecified)."""
    for m in base.modules():
        func = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(m, "gradient_checkpointing", False) is True and isinstance(func, functools.partial):
            if func.keywords.get("use_reentrant", True):
                return True
    return False


def prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, *args, **kwargs):
    """Forward of a patched prefix-tuning PeftModel (see the module docstring); PEFT's forward runs for
    positional extras, task ids or another active method."""
    state = self.__dict__.get(_STATE)
    cfg = self.active_peft_config
    kind = getattr(cfg.peft_type, "value", str(cfg.peft_type))
    if args or state is None or kind != "PREFIX_TUNING" or kwargs.get("task_ids") is not None:
        return self._tunefast_original_class.forward(self, input_ids, attention_mask, inputs_embeds, *args, **kwargs)
    kwargs.pop("task_ids", None)
    for name in ("past_key_values", "cache"):  # PEFT replaces any cache by the prefix: no cache here
        kwargs.pop(name, None)
    if cfg.task_type == "CAUSAL_LM" and kwargs.get("token_type_ids") is not None:
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None
    if self.training and torch.is_grad_enabled() and _reentrant_checkpointing(self.base_model):
        raise ValueError(
            "the patched prefix reaches every layer as a keyword argument, which reentrant gradient checkpointing "
            "cannot differentiate through; enable it with gradient_checkpointing_kwargs={'use_reentrant': False} "
            "(transformers' default; torch's default when unspecified is reentrant)"
        )
    n = cfg.num_virtual_tokens
    kwargs["position_ids"] = _positions(state, input_ids, inputs_embeds, n, kwargs.get("position_ids"))
    return self.base_model(
        input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
        tunefast_prefix=layer_prefix(self), **kwargs,
    )


def _decoder_positions(base, family):
    """The decoder's learned-position module named by the family table, or None."""
    if family is None or family.get("positions") is None:
        return None
    for name, m in base.named_modules():
        if re.search(family["positions"], name):
            return m
    return None


@contextlib.contextmanager
def _positions_shifted(module, n_prefix):
    """Shift the positions a learned-position module embeds by P, as PEFT's cache of length P does."""
    if module is None:
        yield
        return

    def shift(_, args, kwargs):
        # BART's decoder calls embed_positions(input_ids, cache_length, position_ids=...) with positions
        # arange(T) + cache_length (0 here: no cache)
        if kwargs.get("position_ids") is None:
            raise NotImplementedError(f"{type(module).__name__} was called without position_ids; cannot shift them by P")
        return args, {**kwargs, "position_ids": kwargs["position_ids"] + n_prefix}

    handle = module.register_forward_pre_hook(shift, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def seq2seq_prefix_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                           decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, *args, **kwargs):
    """Forward of a patched encoder-decoder prefix-tuning PeftModel: the prefix reaches the decoder's
    self-attention through the kernel (no cache, so checkpointing works); PEFT's forward otherwise."""
    state = self.__dict__.get(_STATE)
    kind = getattr(self.active_peft_config.peft_type, "value", "")
    if args or state is None or kind != "PREFIX_TUNING" or kwargs.get("task_ids") is not None:
        return self._tunefast_original_class.forward(self, input_ids, attention_mask, inputs_embeds, decoder_input_ids,
                                                     decoder_attention_mask, decoder_inputs_embeds, labels, *args, **kwargs)
    kwargs.pop("task_ids", None)
    for name in ("past_key_values", "cache"):
        kwargs.pop(name, None)
    if self.training and torch.is_grad_enabled() and _reentrant_checkpointing(self.base_model):
        raise ValueError(
            "the patched prefix reaches every layer as a keyword argument, which reentrant gradient checkpointing "
            "cannot differentiate through; enable it with gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    with _positions_shifted(state["decoder_positions"], self.active_peft_config.num_virtual_tokens):
        return self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
            decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, tunefast_prefix=layer_prefix(self), **kwargs,
        )

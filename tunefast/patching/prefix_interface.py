"""The transformers attention-interface function and mask function that run prefix attention.

Registered under one name per backend ("tunefast_prefix_auto", ...) in BOTH registries:
``AttentionInterface`` (the attention itself) and ``AttentionMaskInterface`` (the mask). Without the
mask registration transformers treats the name as a mask-less backend and passes attention_mask=None,
silently dropping padding.

The attention function receives, from any model whose attention modules call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``:
  q (B, Hq, T, D), k / v (B, Hkv, S, D) (not repeated for GQA), the mask built by :func:`padding_mask`
  ((B, S) bool or None), ``scaling``, ``dropout``, the module (``layer_idx``, ``is_causal``) and every
  keyword the model's forward was called with: the prefix arrives as ``tunefast_prefix``, a
  (L, 2, Hkv, P, D) tensor (layer, key/value), from the patched PeftModel forward (prefix.py).

Why a keyword argument rather than a global or a module attribute: transformers forwards the model's
``**kwargs`` to every attention call, and its gradient-checkpointing wrapper captures them
(``partial(forward, **kwargs)``), so the recompute in backward sees the very same prefix tensor; nothing
outlives the call, two models (or threads) never share state, and torch.compile traces it as an input.

Without ``tunefast_prefix`` (``generate`` through PEFT's own cache path, where the prefix sits in the
KV cache; a disabled adapter; cross-attention) it is plain flash attention (P = 0) over k / v.
"""

from __future__ import annotations

import functools

import torch

from ..ops.prefix_attention import prefix_attention
from ..reference import prefix_attention as ref

NAME_PREFIX = "tunefast_prefix_"


def interface_name(backend: str) -> str:
    return NAME_PREFIX + backend


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, tunefast_prefix=None, *,
              backend: str, **kwargs):
    """transformers attention function: returns ((B, T, Hq, D) output, None)."""
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} uses sliding-window attention, which tunefast's prefix attention does not "
            "implement; tunefast.patch should have skipped this model: please report it"
        )
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"tunefast prefix attention takes a (B, S) key-padding mask, got a {attention_mask.dim()}-D mask "
            f"{tuple(attention_mask.shape)} (a custom 4-D mask passed to the model?); unpatch to use it"
        )
    if tunefast_prefix is not None and not getattr(module, "is_cross_attention", False):
        prefix_k, prefix_v = tunefast_prefix[module.layer_idx].unbind(0)
    else:
        prefix_k = prefix_v = key.new_empty((key.shape[1], 0, key.shape[3]))
    # Under autocast q/k/v arrive in the autocast dtype while the prefix keeps the model's: the op takes
    # one dtype, so the (small) prefix follows q, and autocast stays out of the op's own math.
    key, value = key.to(query.dtype), value.to(query.dtype)
    prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    with torch.autocast(query.device.type, enabled=False):
        if dropout and module.training:
            # The kernel has no attention dropout: PyTorch's path (probabilities materialised), as eager.
            out = ref.concat_attention(query, key, value, prefix_k, prefix_v, causal, attention_mask, scaling, dropout)
        else:
            out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal,
                                   key_padding_mask=attention_mask, scale=scaling, backend=backend)
    return out.transpose(1, 2), None


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers mask function: the (B, kv_length) bool key-padding mask (True = real key) or None.

    Causality is not encoded here: the attention function takes it from the module, as transformers'
    flash-attention integration does. Mask patterns a (B, S) mask cannot express are refused.
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is not None and mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise NotImplementedError(
            "tunefast prefix attention supports causal or bidirectional attention with key padding; this model "
            "builds another mask pattern (packed sequences, sliding window, chunked or image-token masks)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] < kv_offset + kv_length:  # a static cache longer than the mask: the rest is empty
        mask = torch.nn.functional.pad(mask, (0, kv_offset + kv_length - mask.shape[-1]), value=False)
    return mask[:, kv_offset : kv_offset + kv_length]


def register(backend: str) -> str:
    """Register the attention and mask functions for ``backend`` (idempotent); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = interface_name(backend)
    AttentionInterface.register(name, functools.partial(attention, backend=backend))
    AttentionMaskInterface.register(name, padding_mask)
    return name

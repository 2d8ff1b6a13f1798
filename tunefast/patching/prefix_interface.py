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

Sliding-window layers (Mistral, Qwen2 with use_sliding_window, Gemma 2/3 local layers) pass
``sliding_window=W`` to the attention function; transformers' mask for them is "kv <= q and kv > q - W"
over the positions of the whole KV cache, so with PEFT's cache the P prefix tokens are positions
0 .. P-1 and count against the window: query t (position P + t) sees prefix key j only while
P + t - j < W. The kernel runs that as window (W - 1, 0) with ``window_counts_prefix=True``; the mask
function checks that the model really asked for that pattern (:func:`padding_mask`).
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from ..ops.prefix_attention import prefix_attention

NAME_PREFIX = "tunefast_prefix_"


def interface_name(backend: str) -> str:
    return NAME_PREFIX + backend


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, tunefast_prefix=None, *,
              backend: str, **kwargs):
    """transformers attention function: returns ((B, T, Hq, D) output, None)."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(
            f"{type(module).__name__} caps attention logits (softcap={kwargs['softcap']}), which tunefast's prefix "
            "attention does not implement; tunefast.patch should have skipped this model: please report it"
        )
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = None
    if kwargs.get("sliding_window") is not None:
        if not causal:
            raise NotImplementedError(
                f"{type(module).__name__}: bidirectional sliding windows are not implemented by tunefast's prefix "
                "attention (transformers' models disagree on whether the distance W itself is inside)"
            )
        window = (int(kwargs["sliding_window"]) - 1, 0)  # transformers: kv > q - W, i.e. q - kv <= W - 1
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(
            f"tunefast prefix attention takes a (B, S) key-padding mask, got a {attention_mask.dim()}-D mask "
            f"{tuple(attention_mask.shape)} (a custom 4-D mask passed to the model?); unpatch to use it"
        )
    layer = module.__dict__.get("_tunefast_prefix_layer")  # set by prefix.py on modules PEFT gives the prefix
    if tunefast_prefix is not None and layer is not None:
        prefix_k, prefix_v = tunefast_prefix[layer].unbind(0)
    else:
        prefix_k = prefix_v = key.new_empty((key.shape[1], 0, key.shape[3]))
    bias = _score_bias(module, kwargs.get("position_bias"), query.shape[2], prefix_k.shape[1])
    # Under autocast q/k/v arrive in the autocast dtype while the prefix keeps the model's: the op takes
    # one dtype, so the (small) prefix follows q, and autocast stays out of the op's own math.
    key, value = key.to(query.dtype), value.to(query.dtype)
    prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    # Attention dropout in training: the kernel's counter-based mask, seeded from torch's generator, so
    # torch.manual_seed repeats it and non-reentrant checkpointing (which restores the RNG state) recomputes
    # the very same mask. Not PyTorch's dropout mask: the same distribution, not the same draws.
    dropout_p = float(dropout) if dropout and module.training else 0.0
    with torch.autocast(query.device.type, enabled=False):
        out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, key_padding_mask=attention_mask,
                               scale=scaling, window=window, bias=bias, dropout_p=dropout_p, backend=backend)
    return out.transpose(1, 2), None


def _score_bias(module, position_bias, t_len: int, p_len: int):
    """T5's (1, H, T, S) relative position bias -> the op's (H, T, P + S) float32 bias, or None.

    The prefix columns are what PEFT's cache gives: prefix key j at position j, query t at P + t, so
    bias = compute_bias over relative positions j - (P + t) of the module named by prefix.py's table."""
    if position_bias is None:
        return None
    if position_bias.dim() != 4 or position_bias.shape[0] != 1:
        raise NotImplementedError(
            f"{type(module).__name__}: a position bias of shape {tuple(position_bias.shape)} (expected (1, H, T, S), "
            "shared by the batch) is not supported by tunefast's prefix attention"
        )
    if position_bias.requires_grad and position_bias.grad_fn is None:
        # T5 makes its all-zero bias of layers without relative positions a leaf that requires grad under
        # gradient checkpointing; nothing reads that gradient. A bias computed from trainable weights keeps
        # its graph, and the op refuses it rather than dropping its gradient.
        position_bias = position_bias.detach()
    bias = position_bias[0].float()
    if p_len > 0:
        source = module.__dict__.get("_tunefast_bias_source")
        if source is None:
            raise NotImplementedError(f"{type(module).__name__}: no module to compute the prefix's position bias")
        prefix_bias = source.compute_bias(t_len, p_len, device=bias.device, past_seen_tokens=p_len)[0]
        bias = torch.cat([prefix_bias.float(), bias], dim=-1)
    return bias


def _pattern_is_supported(mask_function, local_size) -> bool:
    """Whether ``mask_function`` (transformers' index-based mask pattern) is causal, bidirectional or
    causal sliding window ``kv > q - local_size``: the patterns the attention function reproduces from
    the module's ``is_causal`` / ``sliding_window``. Checked on the rows where they differ."""
    w = int(local_size) if local_size else 4
    q = torch.tensor([0, 1, 2, w - 1, w, w + 1, 2 * w + 3])[:, None]
    kv = torch.arange(2 * w + 5)[None, :]
    try:
        got = mask_function(torch.tensor(0), torch.tensor(0), q, kv).expand(q.shape[0], kv.shape[1])
    except (IndexError, RuntimeError):  # patterns that index per-token data (packed sequences, image tokens)
        return False
    candidates = [kv <= q, torch.ones_like(got)]
    if local_size:
        candidates.append((kv <= q) & (kv > q - w))
    return any(torch.equal(got, c.expand_as(got)) for c in candidates)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, local_size=None, **kwargs):
    """transformers mask function: the (B, kv_length) bool key-padding mask (True = real key) or None.

    Causality and sliding windows are not encoded here: the attention function takes them from the
    module (``is_causal``, ``sliding_window``), as transformers' flash-attention integration does. Mask
    patterns a (B, S) mask plus those cannot express are refused.
    """
    if mask_function is not None and not _pattern_is_supported(mask_function, local_size):
        raise NotImplementedError(
            "tunefast prefix attention supports causal, bidirectional or causal sliding-window attention with key "
            "padding; this model builds another mask pattern (packed sequences, chunked or image-token masks)"
        )
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] < kv_offset + kv_length:  # a static cache longer than the mask: the rest is empty
        mask = torch.nn.functional.pad(mask, (0, kv_offset + kv_length - mask.shape[-1]), value=False)
    return mask[:, kv_offset : kv_offset + kv_length]


def _register(backend: str) -> str:
    """Register the attention and mask functions for ``backend`` (idempotent); return the name. Called by
    :class:`Hold` only, which also removes them when the last model using them is unpatched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = interface_name(backend)
    AttentionInterface.register(name, functools.partial(attention, backend=backend))
    AttentionMaskInterface.register(name, padding_mask)
    return name


def _unregister(name: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # GeneralInterface has register() but no unregister(): its class-wide mapping is a plain dict
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(name, None)


_holds: dict[str, int] = {}  # name -> live holds; the registration exists while this is > 0
_holds_lock = threading.Lock()


def _drop(name: str) -> None:
    with _holds_lock:
        _holds[name] -= 1
        if _holds[name] == 0:
            del _holds[name]
            _unregister(name)


class Hold:
    """A patched model's use of the global registration of ``backend``'s functions (transformers looks
    attention functions up by name in a process-wide table, so the registration cannot live on the
    model). Kept in the model's patch state; :meth:`release` (unpatch) or the model being garbage
    collected drops it, and the last drop removes the registration. A deep copy or an unpickled copy of
    a patched model gets a hold of its own, so unpatching the original leaves the copy working."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = interface_name(backend)
        with _holds_lock:  # counted before registering: a finalizer of a dead hold cannot unregister it
            _holds[self.name] = _holds.get(self.name, 0) + 1
        self._finalizer = weakref.finalize(self, _drop, self.name)
        _register(backend)

    def release(self) -> None:
        self._finalizer()  # runs _drop at most once (not again at garbage collection)

    def __deepcopy__(self, memo) -> "Hold":
        return Hold(self.backend)

    def __reduce__(self):
        return (Hold, (self.backend,))

    def __repr__(self) -> str:
        return f"Hold({self.name!r}, released={not self._finalizer.alive})"

"""PromptTokens (the learnable prompts of one layer, or of the input) and the hooks that use them.

Deep (VPT-deep): layer i's prompts P_i (N, hidden) only ever act on the sequence through attention: the
layer's outputs at prompt positions are thrown away (replaced by P_{i+1}), so their queries, attention
rows, MLP and residual are never needed. What the sequence sees are the keys and values
K_i = LN_i(P_i) W_k + b_k, V_i = LN_i(P_i) W_v + b_v, computed with the layer's own frozen layernorm and
projections. A forward pre-hook on the layer's attention module computes them once per call (N rows,
not B x N) and hands them to the attention interface as the ``tunefast_prefix`` keyword, where
tunefast/patching/prefix_interface.py runs the shared-prefix prefix_attention op. The hook runs inside
the layer's forward, so under gradient checkpointing the (N, hidden) projections are recomputed, not kept.

Shallow (VPT-shallow): a forward hook on the embeddings module inserts the prompts after the leading
special tokens; a forward hook on the last layer takes them out again, so the output has the original
length and every head (CLS, distillation token, mean over patches) reads what it read before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PromptTokens(nn.Module):
    """``tokens``: (num_tokens, hidden) learnable prompts; called, returns them after prompt dropout."""

    def __init__(self, num_tokens: int, hidden: int, *, dropout: float, dtype, device):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, hidden, dtype=dtype, device=device))
        self.dropout = dropout

    def forward(self) -> torch.Tensor:
        # One mask for the whole batch (the prompts are held once): see PromptConfig.dropout.
        return F.dropout(self.tokens, self.dropout, self.training) if self.dropout else self.tokens

    def extra_repr(self) -> str:
        return f"num_tokens={self.tokens.shape[0]}, hidden={self.tokens.shape[1]}, p={self.dropout:g}"


def prefix_kv(prompt: PromptTokens, norm: nn.Module, key: nn.Module, value: nn.Module, head_dim: int) -> torch.Tensor:
    """(1, 2, H, N, D): the layer's prefix keys and values from its prompts (the op's (L, 2, Hkv, P, D) with L = 1)."""
    x = norm(prompt())                                                  # (N, hidden)
    n = x.shape[0]
    k = key(x).view(n, -1, head_dim).transpose(0, 1)                    # (H, N, D)
    v = value(x).view(n, -1, head_dim).transpose(0, 1)
    return torch.stack((k, v))[None]


def deep_attention_hook(prompt, norm, key, value, head_dim: int, config, interface: str):
    """Forward pre-hook (with kwargs) for an attention module: adds ``tunefast_prefix``."""

    def hook(module, args, kwargs):
        if config._attn_implementation != interface:
            # Any other attention function would ignore tunefast_prefix and drop the prompts without a word.
            raise RuntimeError(
                f"{type(module).__name__}: the model's attention implementation is {config._attn_implementation!r}, "
                f"but deep prompts need {interface!r} (set by prompt.apply); call prompt.remove(model) before "
                "changing the attention implementation")
        kwargs["tunefast_prefix"] = prefix_kv(prompt, norm, key, value, head_dim)
        return args, kwargs

    return hook


def checkpoint_input_hook(layer: nn.Module):
    """Forward pre-hook for the first prompted layer: under *reentrant* gradient checkpointing a layer
    whose inputs need no gradient returns an output that needs none, and the prompts used inside it
    would get no gradient. The frozen embeddings' output is such an input, so it is made a leaf that
    requires grad (what transformers' enable_input_require_grads does for PEFT); only when the layer
    checkpoints, so that plain training computes no gradient for it."""

    def hook(module, args, kwargs):
        if not (getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()):
            return None
        if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return None

    return hook


def insert_hook(prompt: PromptTokens, leading: int):
    """Forward hook for the embeddings module: (B, T, hidden) -> (B, leading + N + T - leading, hidden)."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        p = prompt().to(h.dtype).expand(h.shape[0], -1, -1)
        h = torch.cat((h[:, :leading], p, h[:, leading:]), dim=1)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


def strip_hook(num_tokens: int, leading: int):
    """Forward hook for the last layer: drops the N prompt positions again."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = torch.cat((h[:, :leading], h[:, leading + num_tokens:]), dim=1)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


def refuse_mask_hook():
    """Forward pre-hook for the first layer in shallow mode: a padding mask would be one prompt row short."""

    def hook(module, args, kwargs):
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:
            raise NotImplementedError(
                "shallow prompts with an attention_mask: the mask does not cover the inserted prompt tokens; "
                "pass attention_mask=None or use deep prompts (PromptConfig(deep=True)), which take it")
        return None

    return hook

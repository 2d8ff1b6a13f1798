"""Visual prompt tuning (VPT, Jia et al. 2022) on Hugging Face ViT-style classifiers, deep or shallow.

    from tunefast.methods import prompt
    model = prompt.apply(vit, prompt.PromptConfig(num_tokens=10, deep=True))
    opt = torch.optim.AdamW(prompt.trainable_parameters(model), lr=1e-2)   # prompts + classifier head
    print(prompt.report(model))          # deep: every layer with prefix_attention[triton|reference]
    prompt.save(model, "vpt/")
    fresh = prompt.load(fresh_vit, "vpt/")
    prompt.remove(model)                 # prompts and hooks gone, attention and head restored

Deep prompts never run as tokens: a layer's prompts only reach the sequence through its attention, as
keys and values from the layer's own frozen layernorm and k/v projections, so they are a prefix K/V
computed once per layer per step (N rows, not B x N) and attended through the shared-prefix
prefix_attention op. No per-image copy, no queries, MLP or outputs for prompt positions. Shallow prompts
are real tokens (inserted after CLS / distillation / register tokens, dropped after the last layer).

Files: config.py (PromptConfig), layer.py (PromptTokens and the hooks), model.py (the LAYERS / EMBEDDINGS
tables, apply, remove, report), io.py (save, load). Families: ViT, DeiT (with or without teacher), ViT-MSN,
I-JEPA, AST, DINOv2 (with registers); Swin and BEiT are refused with the reason.
"""

from .config import PromptConfig
from .io import load, save
from .layer import PromptTokens
from .model import (
    EMBEDDINGS,
    LAYERS,
    UNSUPPORTED,
    apply,
    config_of,
    head_parameters,
    plan,
    prompt_parameters,
    remove,
    report,
    trainable_parameters,
)

Config = PromptConfig

__all__ = [
    "Config",
    "EMBEDDINGS",
    "LAYERS",
    "PromptConfig",
    "PromptTokens",
    "UNSUPPORTED",
    "apply",
    "config_of",
    "head_parameters",
    "load",
    "plan",
    "prompt_parameters",
    "remove",
    "report",
    "save",
    "trainable_parameters",
]

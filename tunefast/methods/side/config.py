"""SideConfig: what a side network looks like and how it runs. Validated on construction; the checks
that need the model (reduction factor vs hidden size, layer indices vs depth) run in ``apply``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ...backend import BACKENDS
from ..protocol import ConfigMixin

MERGES = ("ladder", "unipt")
NORMS = ("rmsnorm", "layernorm")
TASKS = ("auto", "causal_lm", "classification", "features")
POOLINGS = ("mean", "first", "last")
SIDE_DTYPES = ("float32", "bfloat16", "float16", "backbone")


@dataclass
class SideConfig(ConfigMixin):
    reduction_factor: int = field(default=8, metadata={
        "help": "Side width N = hidden_size // reduction_factor (LST uses 8). Must be 1..hidden_size."})
    layers: Optional[list[int]] = field(default=None, metadata={
        "help": "Backbone hidden states the side network reads, as indices into the model's "
                "`hidden_states` output: 0 is the embedding output, i (1..num_hidden_layers) the output of "
                "block i; negative indices count from the end. None: every block, 1..num_hidden_layers."})
    merge: str = field(default="ladder", metadata={
        "help": "'ladder' (LST): s_i = block(norm(g_i * down_i(h_i) + (1 - g_i) * s_{i-1})), g_i = "
                "sigmoid(alpha_i / gate_temperature). 'unipt' (UniPT-style): every down-projected layer "
                "is aggregated per token by attention over layers, queried by the last selected layer."})
    norm: str = field(default="rmsnorm", metadata={
        "help": "Normalisation after each merge, over the side width: 'rmsnorm' or 'layernorm'."})
    mlp_ratio: float = field(default=2.0, metadata={
        "help": "Hidden width of each side block's MLP, as a multiple of the side width; 0 disables the "
                "blocks (the side network is then the ladder of merges alone)."})
    gate_temperature: float = field(default=0.1, metadata={
        "help": "T in g = sigmoid(alpha / T) (LST: 0.1); alpha starts at gate_init."})
    gate_init: float = field(default=0.0, metadata={"help": "Initial alpha of every ladder gate (0: g = 0.5)."})
    task: str = field(default="auto", metadata={
        "help": "Output head. 'causal_lm': logits through the frozen backbone LM head of "
                "last_hidden_state + up(s), loss = shifted cross-entropy. 'classification': a trainable "
                "linear classifier on pooled last_hidden_state + up(s), num_labels outputs. 'features': "
                "last_hidden_state + up(s) and its pooled vector. 'auto': causal_lm for *ForCausalLM "
                "models, classification for sequence/image classifiers, else features."})
    num_labels: Optional[int] = field(default=None, metadata={
        "help": "Classifier outputs (task 'classification'); None: the model config's num_labels."})
    pooling: str = field(default="mean", metadata={
        "help": "Pooling over tokens for classification / features: 'mean' (over attention_mask when "
                "given), 'first' (CLS token: BERT, ViT) or 'last' (last non-padding token: decoders)."})
    side_dtype: str = field(default="float32", metadata={
        "help": "dtype of the side network's parameters and states: 'float32' (default, like PEFT's "
                "fp32 adapters on a bf16 base), 'bfloat16', 'float16' or 'backbone' (the backbone's dtype)."})
    eps: float = field(default=1e-6, metadata={"help": "Epsilon of the side network's norms."})
    fused: bool = field(default=True, metadata={
        "help": "True: ladder merges through tunefast's fused op, side blocks recomputed in backward, and "
                "the LM-head loss chunked with its gradients formed in the forward (no logits kept). "
                "False: the same math and parameters as plain PyTorch modules (the unfused baseline)."})
    backend: str = field(default="auto", metadata={
        "help": "Kernel backend of the fused ops: 'auto', 'triton', 'native' or 'reference' (see tunefast.backend); "
                "apply's backend= replaces 'auto' only."})
    loss_chunk_tokens: Optional[int] = field(default=None, metadata={
        "help": "Tokens per chunk of the fused LM-head loss (None: ~16M logits per chunk)."})

    def __post_init__(self):
        _check_int("reduction_factor", self.reduction_factor, minimum=1)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise TypeError(f"layers must be a list of ints or None, got {type(self.layers).__name__}")
            self.layers = list(self.layers)
            if not self.layers:
                raise ValueError("layers is empty: select at least one hidden state (or None for all blocks)")
            for i in self.layers:
                _check_int("layers", i)
        for name, choices in (("merge", MERGES), ("norm", NORMS), ("task", TASKS), ("pooling", POOLINGS),
                              ("side_dtype", SIDE_DTYPES), ("backend", BACKENDS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        _check_number("mlp_ratio", self.mlp_ratio, minimum=0.0)
        _check_number("gate_temperature", self.gate_temperature, minimum=0.0, strict=True)
        _check_number("gate_init", self.gate_init)
        _check_number("eps", self.eps, minimum=0.0, strict=True)
        if self.num_labels is not None:
            _check_int("num_labels", self.num_labels, minimum=1)
        if self.loss_chunk_tokens is not None:
            _check_int("loss_chunk_tokens", self.loss_chunk_tokens, minimum=1)
        if not isinstance(self.fused, bool):
            raise TypeError(f"fused must be a bool, got {type(self.fused).__name__}")




def _check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")

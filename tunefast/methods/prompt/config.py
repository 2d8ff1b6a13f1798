"""PromptConfig: visual prompt tuning (VPT, Jia et al. 2022), deep or shallow. Validated on
construction; what needs the model (its layer family, patch size) is checked in ``apply``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...backend import BACKENDS
from ..protocol import ConfigMixin, as_floats, check_choice, check_count

INITS = ("uniform", "normal")


@dataclass
class PromptConfig(ConfigMixin):
    num_tokens: int = field(default=10, metadata={
        "help": "Prompt tokens per layer (deep) or in total (shallow); VPT uses 1 to 200, 10 and 50 most often."})
    deep: bool = field(default=True, metadata={
        "help": "True (VPT-deep): every transformer layer gets its own prompts, attended as a prefix K/V shared by "
                "the batch through the prefix_attention op; the layer's outputs at prompt positions are never "
                "computed. False (VPT-shallow): prompts inserted after the leading special tokens (CLS, "
                "distillation / register tokens) at the embedding output and carried through every layer as "
                "ordinary tokens, dropped again after the last layer (the head reads the original positions)."})
    init: str = field(default="uniform", metadata={
        "help": "'uniform': VPT's init, U(-a, a) with a = sqrt(6 / (3 * patch_h * patch_w + hidden)) (Xavier "
                "uniform of a patch projection); 'normal': N(0, init_std)."})
    init_std: float = field(default=0.02, metadata={"help": "Std of the 'normal' init (unused for 'uniform')."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the prompt tokens in training, in [0, 1) (VPT's prompt dropout, 0.1 in its configs). "
                "One mask per layer per step shared by the whole batch, because the prompts are held once and "
                "not copied per image; VPT's own code draws one mask per image (same distribution, correlated "
                "across the batch)."})
    train_head: bool = field(default=True, metadata={
        "help": "Also train the classifier head (every parameter outside the backbone that holds the layers), as "
                "VPT does; False: only the prompts train. remove() restores the head's original weights."})
    backend: str = field(default="auto", metadata={
        "help": "Kernel backend of the prefix_attention op that deep prompts run through (see tunefast.backend); "
                "apply's backend= may replace 'auto' only."})

    def __post_init__(self):
        check_count("num_tokens", self.num_tokens)
        for name in ("deep", "train_head"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_choice("backend", self.backend, BACKENDS)
        check_choice("init", self.init, INITS)
        as_floats(self, "init_std", "dropout")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std >= 0.0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")

"""AdapterConfig: where bottleneck / parallel adapters go and what they compute. Validated on
construction; what needs the model (its block types, hidden size) is checked in ``apply``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ...backend import BACKENDS
from ..protocol import ConfigMixin, as_floats, check_choice, check_count

ACTIVATIONS = ("relu", "gelu", "silu")
PLACEMENTS = ("sequential", "parallel")
SUBLAYERS = ("attention", "ffn")


@dataclass
class AdapterConfig(ConfigMixin):
    bottleneck: int = field(default=16, metadata={
        "help": "Bottleneck size r: the down-projection maps the hidden size to r, the up-projection back."})
    activation: str = field(default="relu", metadata={
        "help": "Nonlinearity between the projections: 'relu', 'gelu' (exact erf) or 'silu'."})
    placement: str = field(default="sequential", metadata={
        "help": "'sequential': the adapter reads a sublayer's output h and adds to it, h + adapter(h) "
                "(Houlsby / Pfeiffer); 'parallel': it reads the sublayer's input x and adds to its output, "
                "sublayer(x) + adapter(x) (He et al. 2022). Both act before the block's residual add."})
    sublayers: tuple = field(default=("attention", "ffn"), metadata={
        "help": "Which sublayers of every transformer block get an adapter: 'attention' and/or 'ffn'. "
                "Houlsby: both; Pfeiffer: ('ffn',); He et al.'s parallel adapter: ('ffn',)."})
    scaling: float = field(default=1.0, metadata={
        "help": "s in sublayer + s * (act(x A^T + a) B^T + b) (He et al. use 4 for the parallel adapter)."})
    dropout: float = field(default=0.0, metadata={
        "help": "Dropout probability on the adapter's input, in [0, 1) (counter-based, redrawn in backward)."})
    init_std: float = field(default=1e-2, metadata={
        "help": "Std of the down-projection's normal init; the up-projection starts at zero, so a fresh "
                "adapter is the identity (Houlsby's near-identity init)."})
    backend: str = field(default="auto", metadata={
        "help": "Kernel backend of the adapter op (see tunefast.backend); apply's backend= may replace "
                "'auto' only."})

    def __post_init__(self):
        check_count("bottleneck", self.bottleneck)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("placement", self.placement, PLACEMENTS)
        subs = (self.sublayers,) if isinstance(self.sublayers, str) else tuple(self.sublayers)
        if not subs or any(s not in SUBLAYERS for s in subs) or len(set(subs)) != len(subs):
            raise ValueError(f"sublayers must be distinct entries of {SUBLAYERS}, got {self.sublayers!r}")
        self.sublayers = subs
        as_floats(self, "scaling", "dropout", "init_std")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init_std < 0.0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        check_choice("backend", self.backend, BACKENDS)

    @classmethod
    def houlsby(cls, **kw) -> "AdapterConfig":
        """Sequential adapters after the attention and the feed-forward sublayers (Houlsby et al. 2019)."""
        return cls(**{"placement": "sequential", "sublayers": ("attention", "ffn"), **kw})

    @classmethod
    def pfeiffer(cls, **kw) -> "AdapterConfig":
        """One sequential adapter after the feed-forward sublayer (Pfeiffer et al. 2021)."""
        return cls(**{"placement": "sequential", "sublayers": ("ffn",), **kw})

    @classmethod
    def parallel(cls, **kw) -> "AdapterConfig":
        """He et al. (2022)'s scaled parallel adapter beside the feed-forward sublayer (s = 4)."""
        return cls(**{"placement": "parallel", "sublayers": ("ffn",), "scaling": 4.0, **kw})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sublayers"] = list(self.sublayers)
        return out

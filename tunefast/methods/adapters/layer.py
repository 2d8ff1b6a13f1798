"""AdapterLayer: a sublayer's output projection with a bottleneck adapter on its output.

The wrapped projection (nn.Linear or GPT-2 Conv1D) runs unchanged; the adapter adds
``s * (act(drop(x) A^T + a) B^T + b)`` to its output h through the fused adapter op, with x = h
(sequential: Houlsby / Pfeiffer) or x = the sublayer's input (parallel: He et al.), which a forward
pre-hook on the sublayer hands over just before the sublayer runs.
"""

from __future__ import annotations


import torch
from torch import nn

from ...ops.adapter import adapter as adapter_op


class AdapterLayer(nn.Module):
    """Wraps ``base`` (its output (*, hidden)); parameters down (r, hidden) + (r,), up (hidden, r) + (hidden,)."""

    def __init__(self, base: nn.Module, hidden: int, config, *, backend: str, dtype, device):
        super().__init__()
        self.base = base
        r = config.bottleneck
        self.down_weight = nn.Parameter(torch.empty(r, hidden, dtype=dtype, device=device))
        self.down_bias = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.up_weight = nn.Parameter(torch.zeros(hidden, r, dtype=dtype, device=device))
        self.up_bias = nn.Parameter(torch.zeros(hidden, dtype=dtype, device=device))
        with torch.no_grad():
            self.down_weight.normal_(0.0, config.init_std)
        self.parallel = config.placement == "parallel"
        self.activation, self.scaling, self.dropout = config.activation, config.scaling, config.dropout
        self.backend = backend
        self._hook = None  # the parallel input's pre-hook handle, removed with the adapter

    def take_input(self, x: torch.Tensor) -> None:
        """Parallel placement: the sublayer's input, for the next call."""
        self.__dict__["_pending_input"] = x

    def forward(self, *args, **kwargs):
        h = self.base(*args, **kwargs)
        if self.parallel:
            x = self.__dict__.pop("_pending_input", None)
            if x is None:
                raise RuntimeError("parallel adapter: the sublayer's input was not captured (the output projection "
                                   "ran outside its sublayer's forward)")
        else:
            x = h
        params = (self.down_weight, self.down_bias, self.up_weight, self.up_bias)
        device = h.device.type
        if torch.is_autocast_enabled(device):
            # what autocast does to nn.Linear adapters: every operand in its dtype (grads flow through .to)
            dt = torch.get_autocast_dtype(device)
            x, h, params = x.to(dt), h.to(dt), tuple(p.to(dt) for p in params)
        with torch.autocast(device, enabled=False):
            return adapter_op(x, h, *params, scale=self.scaling, activation=self.activation, dropout_p=self.dropout,
                              training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return (f"{kind}, r={self.down_weight.shape[0]}, act={self.activation}, s={self.scaling:g}, "
                f"p={self.dropout:g}")

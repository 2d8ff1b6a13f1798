"""The side networks, over the selected backbone hidden states h_1..h_n (each (*, D)); width N = D // r.

Ladder (Ladder Side-Tuning, Sung et al. 2022):
    s_1 = block_1(norm_1(down_1(h_1)))
    s_i = block_i(norm_i(g_i * down_i(h_i) + (1 - g_i) * s_{i-1})),   g_i = sigmoid(alpha_i / T)
UniPT-style (Diao et al. 2024), per token, so it is causal for decoders and needs no attention mask:
    f_i = norm_i(down_i(h_i));  w = softmax_i(<Wq f_n, Wk f_i> / sqrt(N));  s = block(sum_i w_i f_i)

Every down-projection + merge + norm is one ``tunefast.ops.side.ladder_merge`` call when fused, or the
same math as nn.Linear / nn.RMSNorm (or nn.LayerNorm) modules when not; both hold the same parameters
under the same names, so a state dict moves between them. A block is a token-wise residual MLP
s + fc2(silu(fc1(s))); fused, it keeps only its input for backward and recomputes the rest.
Token mixing comes from the backbone's own attention, read at every rung: the side network itself
has none (LST's side blocks are transformer layers; here no per-model masks or caches are needed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import side as side_ops


class _RecomputedMLP(torch.autograd.Function):
    """fc2(silu(fc1(s))) keeping only s for backward (its (*, hidden) intermediates are recomputed)."""

    @staticmethod
    def forward(ctx, s, w1, b1, w2, b2):
        ctx.save_for_backward(s, w1, b1, w2, b2)
        return F.linear(F.silu(F.linear(s, w1, b1)), w2, b2)

    @staticmethod
    def backward(ctx, dy):
        s, w1, b1, w2, b2 = ctx.saved_tensors
        s2, dy2 = s.reshape(-1, s.shape[-1]), dy.reshape(-1, dy.shape[-1])
        a = F.linear(s2, w1, b1)
        sig = torch.sigmoid(a)
        u = a * sig
        du = dy2 @ w2
        da = du * (sig * (1.0 + a * (1.0 - sig)))  # silu'(a)
        ds = (da @ w1).view(s.shape) if ctx.needs_input_grad[0] else None
        db1 = da.sum(0) if b1 is not None else None
        db2 = dy2.sum(0) if b2 is not None else None
        return ds, da.t() @ s2, db1, dy2.t() @ u, db2


class SideBlock(nn.Module):
    def __init__(self, width: int, hidden: int, dtype, device):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, dtype=dtype, device=device)
        self.fc2 = nn.Linear(hidden, width, dtype=dtype, device=device)

    def forward(self, s: torch.Tensor, fused: bool) -> torch.Tensor:
        if fused and torch.is_grad_enabled():
            return s + _RecomputedMLP.apply(s, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return s + self.fc2(F.silu(self.fc1(s)))


class Rung(nn.Module):
    """down-projection (+ gate, when a side state comes in) + norm (+ block)."""

    def __init__(self, hidden: int, width: int, *, gated: bool, block: bool, config, dtype, device):
        super().__init__()
        self.down = nn.Linear(hidden, width, dtype=dtype, device=device)
        alpha = torch.full((1,), float(config.gate_init), dtype=torch.float32, device=device)
        self.gate = nn.Parameter(alpha) if gated else None  # g = sigmoid(alpha / T), one per rung (1-D: FSDP2 shards no 0-D parameter)
        norm_cls = nn.RMSNorm if config.norm == "rmsnorm" else nn.LayerNorm
        self.norm = norm_cls(width, eps=config.eps, dtype=dtype, device=device)
        mlp = int(round(config.mlp_ratio * width))
        self.block = SideBlock(width, mlp, dtype, device) if block and mlp > 0 else None
        self._temperature = float(config.gate_temperature)
        self._norm_kind, self._backend = config.norm, config.backend

    def forward(self, h: torch.Tensor, side: torch.Tensor | None, fused: bool) -> torch.Tensor:
        g = torch.sigmoid(self.gate / self._temperature) if side is not None else None
        if fused:
            y = side_ops.ladder_merge(h, self.down.weight, self.down.bias, side, g, self.norm.weight,
                                      getattr(self.norm, "bias", None), eps=self.norm.eps, norm=self._norm_kind,
                                      backend=self._backend)
        else:
            p = self.down(h.to(self.down.weight.dtype))
            y = self.norm(p if side is None else g.to(p.dtype) * p + (1 - g.to(p.dtype)) * side)
        return self.block(y, fused) if self.block is not None else y


class LadderNetwork(nn.Module):
    def __init__(self, n_layers: int, hidden: int, width: int, config, dtype, device):
        super().__init__()
        self.rungs = nn.ModuleList(
            Rung(hidden, width, gated=i > 0, block=True, config=config, dtype=dtype, device=device)
            for i in range(n_layers)
        )

    def forward(self, states: list[torch.Tensor], fused: bool) -> torch.Tensor:
        s = None
        for rung, h in zip(self.rungs, states):
            s = rung(h, s, fused)
        return s


class UniPTNetwork(nn.Module):
    def __init__(self, n_layers: int, hidden: int, width: int, config, dtype, device):
        super().__init__()
        self.rungs = nn.ModuleList(
            Rung(hidden, width, gated=False, block=False, config=config, dtype=dtype, device=device)
            for _ in range(n_layers)
        )
        self.query = nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        self.key = nn.Linear(width, width, bias=False, dtype=dtype, device=device)
        mlp = int(round(config.mlp_ratio * width))
        self.block = SideBlock(width, mlp, dtype, device) if mlp > 0 else None

    def forward(self, states: list[torch.Tensor], fused: bool) -> torch.Tensor:
        feats = [rung(h, None, fused) for rung, h in zip(self.rungs, states)]
        stacked = torch.stack(feats, dim=-2)  # (*, n, N)
        q = F.linear(self.query(feats[-1]), self.key.weight.t())  # Wk^T Wq f_n: one (*, N) vector per token
        scores = (stacked @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])  # (*, n)
        s = (torch.softmax(scores, dim=-1).unsqueeze(-2) @ stacked).squeeze(-2)
        return self.block(s, fused) if self.block is not None else s


NETWORKS = {"ladder": LadderNetwork, "unipt": UniPTNetwork}

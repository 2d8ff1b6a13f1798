"""DoRA's detached weight norm, plain PyTorch, without forming B A.

    ||W_o + s (BA)_o||^2 = ||W_o||^2 + 2 s <B_o, (W A^T)_o> + s^2 <B_o, (B (A A^T))_o>

Only (N, r) and (r, r) products are formed. The expansion can lose digits when ||W_o + s (BA)_o|| is
much smaller than ||W_o|| (cancellation); DoRA's magnitude is initialised to this norm, so in practice
the two are of the same size.
"""

import torch


def lowrank_row_norm(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms (N,) in fp32 of w (N, K) + scale * b (N, r) @ a (r, K)."""
    w32, a32, b32 = w.float(), a.float(), b.float()
    sq = torch.linalg.vector_norm(w32, dim=1).square()
    sq += 2 * scale * (b32 * (w32 @ a32.t())).sum(1)
    sq += scale * scale * (b32 * (b32 @ (a32 @ a32.t()))).sum(1)
    return sq.clamp_min(0).sqrt()

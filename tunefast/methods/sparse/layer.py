"""The modules of sparse fine-tuning: ``SparseDelta`` (one delta of one layer) and ``SparseLinear`` (a
frozen linear layer with its deltas, run by the sparse op).

A targeted ``nn.Linear`` / GPT-2 ``Conv1D`` is wrapped as ``SparseLinear(base_layer)``, as PEFT wraps
its tuner layers: the base module object itself is kept (``base_layer``) and put back when the last
delta is removed. Indices always address the logical (out_features, in_features) weight; how a base
type stores its weight is a fact in ``LAYOUTS``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops._checks import SUPPORTED_DTYPES
from ...ops.sparse import SparseStructure, implementation, sparse_linear, sparse_structure
from ...patching.registry import Patch, Skip

try:  # GPT-2 style Conv1D: weight stored (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

# base layer type -> True when its weight is stored (in_features, out_features), i.e. transposed.
LAYOUTS: dict[type, bool] = {nn.Linear: False}
if Conv1D is not None:
    LAYOUTS[Conv1D] = True

_STRUCTURE = ("row_ptr", "col_ptr", "t_rows", "t_perm")


def transposed_storage(module: nn.Module) -> bool | None:
    """True / False for a supported linear layer (Conv1D / nn.Linear), None for anything else."""
    for cls, transposed in LAYOUTS.items():
        if isinstance(module, cls):
            return transposed
    return None


def weight_nk(layer: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) view of a supported layer's weight (no copy)."""
    return layer.weight.t() if transposed_storage(layer) else layer.weight


class SparseDelta(nn.Module):
    """One sparse delta of an (N, K) weight: ``indices`` (nnz,) int64 buffer (strictly increasing flat
    r * K + c), ``values`` (nnz,) parameter and, with bias training, ``bias`` (N,) parameter. The
    index structure of the kernels (CSR row pointers, column order) is derived, never saved."""

    def __init__(self, indices, shape: tuple[int, int], values: torch.Tensor, bias: torch.Tensor | None = None,
                 trainable: bool = True):
        super().__init__()
        st = sparse_structure(indices.to(values.device), shape)
        if values.dim() != 1 or values.numel() != st.indices.numel():
            raise ValueError(f"values must be 1-D with one entry per index ({st.indices.numel()}), "
                             f"got shape {tuple(values.shape)}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.register_buffer("indices", st.indices)
        for name in _STRUCTURE:
            self.register_buffer(name, getattr(st, name), persistent=False)
        self.values = nn.Parameter(values, requires_grad=trainable)
        self.bias = nn.Parameter(bias, requires_grad=trainable) if bias is not None else None
        self.merged = False
        self.register_buffer("saved_weight", None, persistent=False)  # original entries while merged
        self.register_buffer("saved_bias", None, persistent=False)

    @property
    def structure(self) -> SparseStructure:
        return SparseStructure(self.indices, *(getattr(self, n) for n in _STRUCTURE))

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        st = sparse_structure(self.indices, self.shape)  # new indices: re-derive (and re-check) the structure
        for name in _STRUCTURE:
            setattr(self, name, getattr(st, name))

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.shape[0] * self.shape[1])
        return (f"shape={self.shape}, nnz={self.nnz} ({100 * density:.3g} %), values={self.values.dtype}, "
                f"bias={self.bias is not None}, trainable={self.values.requires_grad}, merged={self.merged}")


class SparseLinear(nn.Module):
    """``base_layer`` plus named sparse deltas: y = x (W + sum of unmerged deltas)^T + b (+ bias deltas)."""

    def __init__(self, base_layer: nn.Module, backend: str = "auto"):
        super().__init__()
        transposed = transposed_storage(base_layer)
        if transposed is None:
            raise TypeError(f"sparse deltas go on nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.transposed = transposed
        self.deltas = nn.ModuleDict()
        self.backend = backend
        self.merge_order: list[str] = []  # names in the order they were merged (unmerge pops from the end)
        self.out_features, self.in_features = self.weight_nk().shape

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as stored (model code reads ``layer.weight.dtype`` and such)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def weight_nk(self) -> torch.Tensor:
        return weight_nk(self.base_layer)

    def backend_for(self, requested: str | None) -> str:
        """The backend this layer runs when ``requested`` (e.g. ``tunefast.patch``'s) is asked for: the
        layer's own (the SparseConfig's) unless that is "auto". One rule, so a config's backend is never
        silently overridden."""
        return self.backend if requested is None or self.backend != "auto" else requested

    def plan(self, requested: str | None = None) -> Patch | Skip:
        """The one eligibility decision for this layer, read by the report (``sparse.report``, and
        ``tunefast.patch`` through tunefast/patching/sparse.py): the sparse op with the implementation
        that runs it (``sparse_linear[triton | native | torch]``), or why the base layer runs instead."""
        weight = self.weight_nk()
        if weight.is_meta:
            raise ValueError("the model has meta-device weights (shape only, no data): load or materialise them "
                             "first")
        if weight.dtype not in SUPPORTED_DTYPES:
            return Skip(f"base weight dtype {weight.dtype} (the sparse op takes float32, float16, bfloat16)")
        backend = self.backend_for(requested)
        kernel = f"sparse_linear[{implementation(backend, weight.device)}]"
        numel = self.out_features * self.in_features
        detail = ", ".join(f"{n}: nnz={d.nnz} ({100 * d.nnz / numel:.3g} %)" + (", merged" if d.merged else "")
                           for n, d in self.deltas.items())
        if requested is not None and backend != requested:
            detail += f"; backend={backend!r} from its SparseConfig, not the requested {requested!r}"
        if not self.active_deltas():
            return Skip(f"every delta is merged into the base weight ({detail}); {kernel} resumes after unmerge",
                        resumes=True)
        return Patch(kernel, detail)

    def active_deltas(self) -> list[SparseDelta]:
        return [d for d in self.deltas.values() if not d.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse_forward(x, self.backend)

    def sparse_forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        active = self.active_deltas()
        if not active:
            return self.base_layer(x)
        weight, bias = self.weight_nk(), self.base_layer.bias
        for d in active:
            if d.bias is not None:
                bias = bias + d.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):  # what autocast does to nn.Linear's F.linear
            dt = torch.get_autocast_dtype(device)
            x, weight = x.to(dt), weight.to(dt)
        if bias is not None:
            bias = bias.to(x.dtype)
        with torch.autocast(device, enabled=False):
            return sparse_linear(x, weight, bias, [d.values for d in active], [d.structure for d in active],
                                 backend=backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend!r}"

"""Sparse fine-tuning: train a chosen subset of weight entries as sparse deltas whose time and memory
scale with the entries trained (diff pruning, Composable Sparse Fine-Tuning, SpIEL, SHiRA; BitFit via
``train_bias``).

    from tunefast.methods import sparse
    model = sparse.apply(model, sparse.SparseConfig(density=0.01, target_modules="all-linear"))
    opt = torch.optim.AdamW(sparse.trainable_parameters(model), lr=1e-4)   # nnz values per layer
    model(**batch).loss.backward()                                        # SDDMM: no dense weight gradient
    sparse.save(model, "task_sft/")
    sparse.merge(model); sparse.unmerge(model)                            # bit for bit
    sparse.load(model, "lang_sft/", name="lang")                          # compose a second delta
    print(sparse.report(model))                                           # each layer with its kernel
    sparse.remove(model)                                                  # original modules back

Files: config.py (SparseConfig), layer.py (SparseDelta, SparseLinear, the base-layer layout table),
selection.py (random / magnitude / gradient), model.py (apply, merge, unmerge, remove), io.py (save,
load). The op is tunefast/ops/sparse.py, its Triton kernels kernels/sparse.py, its C++/CUDA kernels
csrc/sparse_*.{cpp,cu}, its plain-PyTorch math tunefast/reference/sparse.py.
"""

from .config import SparseConfig
from .io import load, save
from .layer import SparseDelta, SparseLinear
from .model import apply, delta_names, merge, remove, report, sparse_layers, trainable_parameters, unmerge

Config = SparseConfig  # the method protocol's name (tunefast/methods/protocol.py)

__all__ = [
    "Config",
    "SparseConfig",
    "SparseDelta",
    "SparseLinear",
    "apply",
    "delta_names",
    "load",
    "merge",
    "remove",
    "report",
    "save",
    "sparse_layers",
    "trainable_parameters",
    "unmerge",
]

"""Bottleneck and parallel adapters (Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2022) on the
fused adapter op: the base model frozen, a small bottleneck MLP beside or after its sublayers.

    from tunefast.methods import adapters
    model = adapters.apply(model, adapters.AdapterConfig.houlsby(bottleneck=16))
    opt = torch.optim.AdamW(adapters.trainable_parameters(model), lr=1e-3)
    print(adapters.report(model))                         # each adapter with its kernel
    adapters.save(model, "task_adapters/")
    fresh = adapters.load(fresh_base_model, "task_adapters/")
    adapters.remove(model)                                # original projections, flags restored

Files: config.py (AdapterConfig and the Houlsby / Pfeiffer / parallel presets), layer.py (AdapterLayer),
model.py (the per-family BLOCKS table, apply, remove, report), io.py (save, load). The op is
tunefast/ops/adapter.py (its plain-PyTorch math tunefast/reference/adapter.py). No merge: an adapter with
a nonlinearity between its projections cannot be folded into the base weights.
"""

from .config import AdapterConfig
from .io import load, save
from .layer import AdapterLayer
from .model import BLOCKS, adapter_layers, apply, config_of, remove, report, trainable_parameters

Config = AdapterConfig  # the method protocol's name (tunefast/methods/protocol.py)

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "BLOCKS",
    "Config",
    "adapter_layers",
    "apply",
    "config_of",
    "load",
    "remove",
    "report",
    "save",
    "trainable_parameters",
]

"""tunefast: fused Triton/CUDA kernels for parameter-efficient fine-tuning, patched into Hugging Face
and PEFT models.

    model = peft.get_peft_model(base, peft.LoraConfig(...))
    report = tunefast.patch(model)   # same numbers, faster, less memory
    print(report)                    # what was patched, with which kernel; what was skipped, and why
    tunefast.unpatch(model)          # back to PEFT's own modules, bit for bit

Layout: kernels/ (Triton, installed as tunefast.kernels) -> tunefast/ops (torch.library ops with fake,
autograd and dispatch) -> tunefast/patching (one walk, handlers by module type); tunefast/reference
holds the plain-PyTorch math every kernel is tested against; csrc/ the native C++/CUDA kernels.
"""

from .backend import BACKENDS, BackendUnavailableError
from .ops.lora import lora_linear
from .ops.prefix_attention import prefix_attention
from .ops.routed_lora import routed_lora_linear
from .patching import get_report, patch, unpatch
from .patching.report import PatchedEntry, PatchReport, SkippedEntry
from .routing import route
from .methods import adapters  # bottleneck / parallel adapters: tunefast.adapters.AdapterConfig / apply / ...
from .methods import prompt  # visual prompt tuning (VPT deep / shallow) on ViT-style classifiers
from .methods import side  # memory-saving side tuning: tunefast.side.SideConfig / apply / save / load
from .methods import sparse  # sparse fine-tuning: tunefast.sparse.SparseConfig / apply / save / load / merge
from .ops.adapter import adapter
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.sparse import sparse_linear

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "PatchReport",
    "PatchedEntry",
    "adapter",
    "adapters",
    "SkippedEntry",
    "get_report",
    "linear_cross_entropy",
    "lora_linear",
    "patch",
    "prefix_attention",
    "prompt",
    "route",
    "routed_lora_linear",
    "side",
    "sparse",
    "sparse_linear",
    "unpatch",
]

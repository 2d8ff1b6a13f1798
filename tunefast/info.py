"""``tunefast info``: versions, and which backends can run here — and, for each that cannot, why."""

from __future__ import annotations

import importlib.metadata as md
import platform

import torch

from . import backend as _backend


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything ``tunefast info`` prints, as a dict (also used by the benchmarks' result rows)."""
    from . import __version__, _native

    gpu = torch.cuda.is_available()
    tri_ok, tri_why = _backend.triton_import()
    native = _native.status() if hasattr(_native, "status") else {}
    cuda_ok, cuda_why = _native.cuda_usable()
    return {
        "versions": {
            "tunefast": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "bitsandbytes": _version("bitsandbytes"),
        },
        "backends": {
            "reference (plain PyTorch)": (True, None),
            "native CPU kernels (tunefast._C)": (_native.CPU_AVAILABLE, _native.CPU_ERROR),
            "native CUDA kernels built (tunefast._C_cuda)": (_native.CUDA_BUILT, _native.CUDA_ERROR),
            "native CUDA kernels usable": (cuda_ok, cuda_why),
            "GPU present": (
                gpu,
                None if gpu else f"torch.cuda.is_available() is False (torch {torch.__version__}"
                + (", a CPU-only build)" if torch.version.cuda is None else ", no driver or no device)"),
            ),
            "Triton importable": (tri_ok, tri_why),
            "Triton kernels on GPU": (
                tri_ok and gpu,
                tri_why if not tri_ok else (None if gpu else "no GPU"),
            ),
            "Triton interpreter on (kernels on CPU tensors)": (
                _backend.interpreter_on(),
                None if _backend.interpreter_on() else "TRITON_INTERPRET=1 not set at start-up (tests set it)",
            ),
        },
        "auto backend": {
            "cpu": _backend.resolve("auto", torch.device("cpu")),
            **({"cuda": _backend.resolve("auto", torch.device("cuda"))} if gpu else {}),
        },
        "native": native,
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "lora path": _lora_path_lines(),
    }


def _lora_path_lines() -> list[str]:
    """The LoRA op's GPU path selection (tunefast/ops/lora_path.py): mode, rule, cached choices with times."""
    from .ops import lora_path

    return lora_path.describe()


def render(info: dict) -> str:
    lines = ["tunefast info", "", "versions:"]
    lines += [f"  {k:14} {v}" for k, v in info["versions"].items()]
    lines += ["", f"device: {info['device']}", "", "backends:"]
    for name, (ok, why) in info["backends"].items():
        lines.append(f"  [{'yes' if ok else ' no'}] {name}" + (f"\n        why not: {why}" if not ok and why else ""))
    lines += ["", "backend='auto' runs: " + ", ".join(f"{d} tensors -> {b}" for d, b in info["auto backend"].items())]
    lines += ["", "LoRA GPU path (fused Triton GEMM or cuBLAS + low-rank epilogue, per shape class):"]
    lines += [f"  {line}" for line in info["lora path"]]
    if info["native"]:
        lines += ["", "native build:"] + [f"  {k}: {v}" for k, v in info["native"].items()]
    return "\n".join(lines)


def main() -> int:
    print(render(collect()))
    return 0

"""Test configuration: the Triton kernels run on CPU through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, before tunefast
or triton is imported by any test module. Tests that need a real GPU are marked ``gpu`` and skipped
without one (benchmarks/gpu_check.sh runs them on a GPU machine).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

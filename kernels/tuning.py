"""Launch-configuration policy shared by the kernels.

On a GPU every kernel autotunes over its configs (a few seconds of compiles per new size bucket) unless
TUNEFAST_AUTOTUNE=0, which makes each use one fixed, reasonable config: that is how the GPU tests run
(benchmarks/gpu_check.sh), so that correctness checks over many shapes and dtypes do not spend the
machine's time compiling dozens of configs each. Under the interpreter one small config always runs.
"""

import os


def autotune_enabled() -> bool:
    return os.environ.get("TUNEFAST_AUTOTUNE", "1") != "0"

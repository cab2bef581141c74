# The two set-up commands of the README. Each creates (or reuses) .venv, installs what it needs,
# and runs. TORCH_SPEC defaults to the CPU wheel; GPU users install their own CUDA torch first
# (see README) and run with TORCH_SPEC= to keep it.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,envs
STAMP := $(VENV)/.leafe-installed

.PHONY: install build demo test bench gpu-check clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q setuptools wheel "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

# Rebuild the C++ extension in place after editing csrc/.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: $(STAMP)
	$(VENV)/bin/leafe-fast demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# Every benchmark in turn; without CUDA each script runs its CPU-small shapes, with CUDA its GPU
# shapes. Results (JSON + plot, with device and versions) go to benchmarks/results/.
bench: $(STAMP)
	$(VENV)/bin/leafe-fast bench --list
	$(VENV)/bin/leafe-fast bench all

# The checks that need a CUDA GPU (benchmarks/gpu_check.py), from a bare GPU machine: no venv, no
# install, no network. GPU_PY is the machine's Python with CUDA torch (pybind11 for the C++ packer);
# the packer is built in place and kernels/ maps to leafe_fast.kernels from the checkout.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) benchmarks/gpu_check.py

# Build outputs and the install stamp: the next `make test` reinstalls (and rebuilds _C).
clean:
	rm -rf build dist *.egg-info leafe_fast/_C*.so $(STAMP)

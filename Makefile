# The two set-up commands of the README. Each creates (or reuses) .venv, installs what it needs,
# and runs. TORCH_SPEC defaults to the CPU wheel; GPU users install their own CUDA torch first
# (see README) and run with TORCH_SPEC= to keep it.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.leafe-installed

.PHONY: install build demo test bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q setuptools wheel "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

# Rebuild the C++ extension in place after editing csrc/.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: $(STAMP)
	$(VENV)/bin/leafe-fast demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf build *.egg-info leafe_fast/_C*.so

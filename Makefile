# Set-up and checks. `make demo` installs ptsne into .venv and runs the main job
# (train -> register -> embed) on the embedded defaults; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The torch that `make install` puts in the venv (its CPU build); pyproject.toml asks for torch>=2.9 only.
TORCH_VERSION ?= 2.13.0
# The GPU check runs where the venv is, else with the image's own python3 (a GPU image without the venv).
CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: install demo test test-all benchmark gpu-check clean

install: $(VENV)/.installed

# torch is installed first and pinned, so pip takes the CPU build rather than
# resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[cpu,dev]"
	touch $@

demo: install
	$(VENV)/bin/ptsne quickstart

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m "not gpu"

# The MNIST file of the benchmarks (the project's own machines keep it beside the checkout).
PTSNE_MNIST ?= ../shared/data/mnist.npz

benchmark: install
	$(PY) benchmarks/mnist.py --data $(PTSNE_MNIST)

# On a GPU node: a venv with CUDA torch and `pip install -e ".[gpu-cu12,dev]"` (or gpu-cu13; not `install`,
# which takes faiss-cpu), or an image's python3 with what benchmarks/gpu_carry.sh carried (docs/gpu-check.md).
# Environment, a probe per GPU path (PASS, FAIL or SKIPPED), gpu tests, figures in gpu-check.json.
gpu-check:
	$(CHECK_PY) benchmarks/gpu_check.py --out gpu-check.json $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) ptsne-runs .pytest_cache

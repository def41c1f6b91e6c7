# Set-up and checks. `make demo` installs ptsne into .venv and runs the main job
# (train -> register -> embed) on the embedded defaults; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install demo test test-all benchmark gpu-check clean

install: $(VENV)/.installed

# torch is installed first and pinned, so pip takes the CPU build rather than
# resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
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

# On a GPU node, in a venv with CUDA torch and `pip install -e ".[gpu,dev]"` (not `install`, which takes faiss-cpu):
# environment, gpu tests, default suite, PASS/FAIL per GPU item of issue 19, figures in gpu-check.json.
gpu-check:
	$(PY) benchmarks/gpu_check.py --out gpu-check.json

clean:
	rm -rf $(VENV) ptsne-runs .pytest_cache

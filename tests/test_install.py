"""How ptsne is installed: FAISS is one explicit build, chosen by extra."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_faiss_is_one_build_per_extra_and_not_a_base_dependency():
    project = _project()
    assert not [d for d in project["dependencies"] if d.lower().startswith("faiss")]
    extras = project["optional-dependencies"]

    def faiss_of(extra: str) -> list[str]:
        return [re.split(r"[<>=;\[ ]", d)[0] for d in extras[extra] if d.startswith("faiss")]

    assert faiss_of("cpu") == ["faiss-cpu"]
    assert faiss_of("gpu-cu12") == ["faiss-gpu-cu12"]  # brings its own CUDA 12 libraries
    assert faiss_of("gpu-cu13") == ["faiss-gpu-cu13-cuvs"]  # CUDA 13 with cuVS
    assert extras["gpu"] == ["ptsne[gpu-cu12]"]  # the old name of the GPU extra still installs


def test_torch_is_a_lower_bound_and_make_install_pins_the_cpu_build():
    # A GPU node keeps the CUDA torch it has; `make install` installs the CPU build first, at its version.
    torch_req = [d for d in _project()["dependencies"] if re.match(r"torch\b", d)]
    assert len(torch_req) == 1 and torch_req[0].startswith("torch>=") and "==" not in torch_req[0]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH_VERSION \?= \d+\.\d+\.\d+$", makefile, re.M)
    install = makefile[makefile.index("$(VENV)/.installed:"):]
    assert install.index("torch==$(TORCH_VERSION)") < install.index('-e ".[cpu,dev]"')


def test_gpu_check_runs_without_a_venv():
    # A GPU image has no .venv: the check falls back to its python3.
    # --no-print-directory: under `make test` this make is nested and would print "Entering directory".
    proc = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "VENV=/nonexistent-venv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["python3", "benchmarks/gpu_check.py"]


def test_make_install_takes_the_cpu_build():
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[cpu,dev]"' in makefile


@pytest.mark.parametrize("package", ["ptsne", "pipeline"])
def test_without_faiss_the_import_names_both_extras(package):
    code = f"import sys; sys.modules['faiss'] = None; import {package}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install 'ptsne[cpu]'" in proc.stderr, proc.stderr[-2000:]
    assert "'ptsne[gpu-cu12]'" in proc.stderr and "'ptsne[gpu-cu13]'" in proc.stderr, proc.stderr[-2000:]

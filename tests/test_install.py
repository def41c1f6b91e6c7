"""How ptsne is installed: FAISS is one explicit build, chosen by extra."""

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
    assert [d.split(">")[0].split("=")[0] for d in extras["cpu"] if d.startswith("faiss")] == ["faiss-cpu"]
    assert [d.split("=")[0] for d in extras["gpu"] if d.startswith("faiss")] == ["faiss-gpu"]


def test_make_install_takes_the_cpu_build():
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[cpu,dev]"' in makefile


@pytest.mark.parametrize("package", ["ptsne", "pipeline"])
def test_without_faiss_the_import_names_both_extras(package):
    code = f"import sys; sys.modules['faiss'] = None; import {package}"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install 'ptsne[cpu]'" in proc.stderr and "pip install 'ptsne[gpu]'" in proc.stderr, proc.stderr[-2000:]

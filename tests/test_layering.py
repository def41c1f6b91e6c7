"""The core package stays free of ray and mlflow; pipeline/ stays free of mlflow."""

import subprocess
import sys


def _loaded_after_import(package: str) -> set[str]:
    code = (
        f"import sys, {package}, pkgutil, importlib\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_ptsne_imports_neither_ray_nor_mlflow():
    loaded = _loaded_after_import("ptsne")
    assert "ray" not in loaded
    assert "mlflow" not in loaded


def test_pipeline_does_not_import_mlflow():
    assert "mlflow" not in _loaded_after_import("pipeline")

"""The carry recipe of the GPU check (benchmarks/gpu_carry.py, gpu_carry.sh) on wheels made here."""

import importlib.util
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_carry", ROOT / "benchmarks" / "gpu_carry.py")
gpu_carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_carry)


def make_wheel(folder: Path, name: str, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> Path:
    """A minimal valid wheel ``name-1.0-py3-none-any.whl`` holding ``files``."""
    info = f"{name}-1.0.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as whl:
        for name_in, data in {**files, f"{info}/RECORD": record.encode()}.items():
            entry = zipfile.ZipInfo(name_in)
            entry.external_attr = ((0o755 if name_in in executable else 0o644) | stat.S_IFREG) << 16
            whl.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def test_rays_wheel_loses_jars_and_dashboard_client_keeps_its_binaries_and_installs(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "ray", {"ray/__init__.py": b"VERSION = 1\n", "ray/jars/worker.jar": os.urandom(5000),
                               "ray/dashboard/client/build/index.html": b"<html/>" * 500,
                               "ray/core/raylet": b"#!/bin/sh\necho raylet\n"}, executable=("ray/core/raylet",))
    data = tmp_path / "mnist.npz"
    data.write_bytes(b"x" * 1000)
    folders = gpu_carry.pack(wheels, tmp_path / "out", 60, [data, tmp_path / "missing.npz"])
    assert [f.name for f in folders] == ["gpu-1"]
    assert sorted(p.name for p in folders[0].iterdir()) == ["mnist.npz", "ray-1.0-py3-none-any.whl"]
    with zipfile.ZipFile(folders[0] / "ray-1.0-py3-none-any.whl") as whl:
        names = whl.namelist()
        assert not [n for n in names if n.startswith(gpu_carry.RAY_DROP)]
        record = whl.read("ray-1.0.dist-info/RECORD").decode()
        assert "jars" not in record and "ray/core/raylet,," in record
        assert whl.getinfo("ray/core/raylet").compress_type == zipfile.ZIP_LZMA
    env = tmp_path / "env"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(env), str(folders[0] / "ray-1.0-py3-none-any.whl")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (env / "ray" / "__init__.py").read_text() == "VERSION = 1\n"
    assert os.access(env / "ray" / "core" / "raylet", os.X_OK)
    assert not (env / "ray" / "jars").exists()


def test_parts_stay_under_the_limit_largest_first():
    mib = 1 << 20
    sizes = {"ray.whl": 33 * mib, "faiss.whl": 9 * mib, "pandas.whl": 10 * mib, "scipy.whl": 20 * mib,
             "mnist.npz": 11 * mib, "small.whl": mib}
    parts = gpu_carry.plan_parts(sizes, 60 * mib)
    assert sorted(n for part in parts for n in part) == sorted(sizes)
    assert all(sum(sizes[n] for n in part) <= 60 * mib for part in parts)
    assert parts[0][0] == "ray.whl" and len(parts) == 2
    with pytest.raises(SystemExit, match="big.whl is 61.0 MiB, more than a part of 60 MiB"):
        gpu_carry.plan_parts({"big.whl": 61 * mib}, 60 * mib)


def test_only_what_the_image_lacks_is_carried_and_never_a_gpu_wheel():
    def report(*names):
        return {"install": [{"metadata": {"name": n, "version": "1.0"}} for n in names]}

    got = gpu_carry.wanted(report("ray", "numpy", "Typing_Extensions", "nvidia-cublas-cu12", "tqdm"),
                           ["numpy", "typing-extensions", "nvidia-*"])
    assert got == ["ray==1.0", "tqdm==1.0"]
    with pytest.raises(SystemExit, match="a GPU wheel was resolved \\(faiss-gpu-cu12\\)"):
        gpu_carry.wanted(report("faiss-gpu-cu12"), ["numpy"])


def test_install_puts_a_folder_into_the_env_the_check_imports_from(tmp_path):
    folder = tmp_path / "gpu-1"
    folder.mkdir()
    make_wheel(folder, "carried", {"carried/__init__.py": b"OK = True\n"})
    env = tmp_path / "env"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_carry.sh"), "install", str(folder)],
                          env={**os.environ, "ENV_DIR": str(env)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "installed 1 wheels" in proc.stdout
    check = subprocess.run([sys.executable, "-c", "import carried; print(carried.OK)"],
                           env={**os.environ, "PYTHONPATH": str(env)}, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "True", check.stderr
    usage = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_carry.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr

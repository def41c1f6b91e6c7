"""The dry run of benchmarks/gpu_check.py (CPU, tiny sizes), so that the GPU check cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_on_cpu_and_says_skipped_for_what_needs_a_gpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--n", "2000",
         "--e2e-n", "0", "--skip-pytest", "--skip-mnist", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"torch", "torch_cuda", "bf16_native", "faiss", "faiss_gpus", "gpu_search", "tf32_api"} <= set(
        report["environment"])
    probes = report["probes"]
    assert len(probes) == 17
    status = {name: p["status"] for name, p in probes.items()}
    assert "FAIL" not in status.values(), probes
    # What needs a GPU (or an option turned it off) says SKIPPED with its reason, never PASS.
    for name in ("nprobe and k caps of FAISS GPU", "NCCL through run_epoch under torchrun",
                 "affinities stage on Ray's GPUs", "train_distributed(use_gpu=True) on Ray",
                 "embedding actors in both modes vs without the GPU", "gpu tests", "MNIST benchmark",
                 "end to end", "default suite", "torch exact search equals FAISS flat"):
        assert status[name] == "SKIPPED" and probes[name]["reason"], (name, probes[name])
    # The decisions, the epoch under torchrun (gloo on CPU) and the torch search ran for real.
    assert status["GPU decisions"] == status["TF32 while training only"] == "PASS"
    assert "gloo" in probes["NCCL through run_epoch under torchrun"]["reason"]
    assert "same_neighbours" in probes["torch exact search equals FAISS flat"]["reason"]
    assert probes["TF32 while training only"]["tf32_while_training"] is False
    assert probes["training and embedding on device vs CPU"]["cpu"]["steps_per_s"] > 0
    assert report["counts"]["SKIPPED"] == sum(s == "SKIPPED" for s in status.values())
    assert not list(tmp_path.glob(".gpu-check.json.tmp-*"))


def test_a_probe_that_raises_is_a_fail_and_the_run_goes_on(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(ctx):
        raise RuntimeError("broken probe")

    def missing(ctx):
        gpu_check.needs("a_package_that_is_not_there")

    monkeypatch.setattr(gpu_check, "PROBES", [("broken", broken), ("missing", missing),
                                              ("decisions", gpu_check.probe_decisions)])
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 1
    probes = json.loads(out.read_text())["probes"]
    assert probes["broken"]["status"] == "FAIL" and "broken probe" in probes["broken"]["error"]
    assert probes["missing"] == {**probes["missing"], "status": "SKIPPED",
                                 "reason": "needs a_package_that_is_not_there (not installed here)"}
    assert probes["decisions"]["status"] == "PASS"

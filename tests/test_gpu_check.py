"""The dry run of benchmarks/gpu_check.py (CPU, tiny sizes), so that the GPU check cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--n", "2000",
         "--e2e-n", "0", "--skip-pytest", "--skip-mnist", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"torch", "torch_cuda", "bf16_native", "faiss", "faiss_gpus"} <= set(report["environment"])
    assert len(report["probes"]) == 11
    assert "skipped" in report["probes"]["embedding actors by gpus_per_actor"]
    assert report["probes"]["TF32 for float32 training on CUDA only"]["tf32"] is False
    assert all(p["status"] == "PASS" for p in report["probes"].values()), report["probes"]
    assert report["probes"]["training and embedding on device vs CPU"]["cpu"]["steps_per_s"] > 0
    assert not list(tmp_path.glob(".gpu-check.json.tmp-*"))

"""The memory figures of the benchmarks (psutil): the Ray worker processes below the driver and the peak RSS."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_worker_rss_names_only_the_ray_processes_below_the_driver():
    scale = _load("scale")
    worker = subprocess.Popen(["bash", "-c", "exec -a ray::probe sleep 30"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = scale.ray_worker_rss_mb(psutil.Process())
            if worker.pid in found:
                break
            time.sleep(0.05)
        rss, name = found[worker.pid]
        assert name == "ray::probe" and rss > 0 and other.pid not in found
    finally:
        for process in (worker, other):
            process.kill()
            process.wait()


#: Run in a process of its own: after hundreds of tests this one's allocator and threads
#: are not a clean slate for a memory figure.
_PEAK_RSS_PROBE = """
import importlib.util, mmap, sys, time
spec = importlib.util.spec_from_file_location("benchmark_compare", sys.argv[1])
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)
with compare.PeakRSS(interval=0.01) as mem:
    block = mmap.mmap(-1, 64 * 2**20)  # an anonymous map, every page written: new resident memory
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    deadline = time.monotonic() + 10  # the sampling thread may wait for a core on a loaded machine
    while mem.peak - mem.start < 32 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.01)
    block.close()
print(mem.peak_mb)
"""


def test_peak_rss_sees_memory_taken_inside_the_block():
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS_PROBE, str(ROOT / "benchmarks" / "compare.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) >= 32

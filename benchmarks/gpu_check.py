"""One prepared GPU check (issue 19): environment, GPU tests, a probe per GPU item, figures.

On a GPU host (``make gpu-check``) it prints the environment, runs the ``gpu`` tests and
the default suite, then a probe with PASS/FAIL per item of issue 19 and the timings of
kNN + P, training and embedding on the GPU against the CPU, an optional MNIST benchmark
and an end-to-end fit, and writes every figure to one JSON file. Stages run in order of
importance and none starts after ``--budget-s`` seconds (it is recorded as skipped).

    python benchmarks/gpu_check.py [--out gpu-check.json] [--n 200000] [--budget-s 420]
    python benchmarks/gpu_check.py --device cpu --n 2000 --e2e-n 0 --skip-pytest --skip-mnist  # dry run

The dry run (CPU, tiny sizes) is a default test (tests/test_gpu_check.py), so the
script cannot rot. Exit status 1 when any probe FAILs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import torch  # noqa: E402

from ptsne import ParametricTSNE  # noqa: E402
from ptsne.affinity import joint_probabilities  # noqa: E402
from ptsne.device import faiss_gpu_count, native_bfloat16, resolve_device  # noqa: E402
from ptsne.knn import GPU_MAX_SELECTION_K, check_gpu_k, knn_graph, max_nprobe, recall_at_k, set_nprobe  # noqa: E402

log = logging.getLogger("benchmarks.gpu_check")


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": str(device), "faiss": faiss.__version__, "faiss_gpus": faiss_gpu_count(),
        "bf16_native": native_bfloat16(device), "cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}")
    return env


def blobs(n: int, dim: int = 50, centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=6.0, size=(centers, dim))
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)


# -- probes: each returns a dict of figures and raises (FAIL) when the behaviour is wrong ----


def probe_load_on_cpu(device: torch.device, n: int) -> dict:
    X = blobs(min(n, 2000), dim=10)
    est = ParametricTSNE(perplexity=10.0, n_epochs=2, batch_size=128, random_state=0, device=str(device.type),
                         reference_size=0).fit(X)
    with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
        path = est.save(Path(d) / "m")
        cpu = ParametricTSNE.load(path)
        on = ParametricTSNE.load(path, device=device.type)
        if cpu.device_.type != "cpu":
            raise AssertionError(f"load() without device= loaded onto {cpu.device_}")
        diff = float(np.abs(cpu.transform(X[:200]) - on.transform(X[:200])).max())
    if diff > 1e-3:
        raise AssertionError(f"transform on {device.type} differs from CPU by {diff:g}")
    return {"max_abs_diff_vs_cpu": diff}


def probe_shared_gpu_refused(device: torch.device, n: int) -> dict:
    from pipeline.train import check_gpu_workers

    check_gpu_workers(1, True, 0.5)
    check_gpu_workers(2, True, 1.0)
    try:
        check_gpu_workers(2, True, 0.5)
    except ValueError as exc:
        return {"refusal": str(exc)}
    raise AssertionError("2 workers x 0.5 GPU was not refused")


def probe_caps(device: torch.device, n: int) -> dict:
    try:
        check_gpu_k(GPU_MAX_SELECTION_K)
    except ValueError:
        pass
    else:
        raise AssertionError(f"k={GPU_MAX_SELECTION_K} (k + 1 > {GPU_MAX_SELECTION_K}) was not refused")
    if device.type != "cuda" or faiss_gpu_count() == 0:
        return {"gpu_index": False}
    from ptsne.knn import _gpu_resources

    nlist = 2 * GPU_MAX_SELECTION_K
    X = blobs(nlist * 40, dim=8)
    cpu = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, nlist)
    cpu.train(X)
    index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, cpu)
    index.add(X)
    if max_nprobe(index) != GPU_MAX_SELECTION_K or set_nprobe(index, nlist) != GPU_MAX_SELECTION_K:
        raise AssertionError("nprobe on a GPU index was not capped at GPU_MAX_SELECTION_K")
    index.search(X[:100], 31)
    return {"gpu_index": True, "nlist": nlist, "nprobe": GPU_MAX_SELECTION_K}


def probe_resume_on_cpu(device: torch.device, n: int) -> dict:
    from pipeline.train import CHECKPOINT_OPTIMIZER, load_optimizer_state

    net = torch.nn.Linear(4, 2).to(device)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(3, 4, device=device)).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
        torch.save({"optimizer": opt.state_dict(), "scheduler": {}}, Path(d) / CHECKPOINT_OPTIMIZER)
        state = load_optimizer_state(d)
    devices = {v.device.type for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)}
    if devices != {"cpu"}:
        raise AssertionError(f"optimizer state loaded onto {devices}")
    torch.optim.Adam(torch.nn.Linear(4, 2).parameters()).load_state_dict(state["optimizer"])
    return {"saved_on": device.type}


_SHARED: dict = {}  # the probes' data and P, computed once by probe_knn_p


def probe_knn_p(device: torch.device, n: int) -> dict:
    X = blobs(n)
    out, graphs = {}, {}
    for name in dict.fromkeys(["cpu", device.type]):
        t = time.perf_counter()
        g = knn_graph(X, k=90, device="cuda" if name == "cuda" and faiss_gpu_count() else "cpu")
        t_knn = time.perf_counter() - t
        edges = joint_probabilities(g, 30.0)
        graphs[name] = g
        out[name] = {"knn_s": round(t_knn, 3), "knn_p_s": round(time.perf_counter() - t, 3)}
    out["recall_vs_cpu"] = recall_at_k(graphs["cpu"].indices[:2000], graphs[device.type].indices[:2000])
    _SHARED.update(X=X, edges=edges)
    return out


def probe_train_and_embed(device: torch.device, n: int) -> dict:
    from ptsne.model import ModelConfig, build_mapper
    from ptsne.train import TrainConfig, fit_mapper
    from ptsne.transform import transform

    if "edges" not in _SHARED:
        probe_knn_p(device, n)
    X, edges = _SHARED["X"], _SHARED["edges"]
    config = TrainConfig(n_epochs=3, seed=0)
    out = {}
    for name in dict.fromkeys(["cpu", device.type]):
        torch.manual_seed(0)
        mapper = build_mapper(ModelConfig(X.shape[1], 2))
        mapper.standardize.fit(X)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if name == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                history = fit_mapper(mapper, X, edges, config, torch.device(name))
            finally:
                if name == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        train_s = sum(h["seconds"] for h in history)
        steps = len(history) * (n // min(config.batch_size, n))
        t = time.perf_counter()
        Y = transform(mapper, X, device=torch.device(name))
        embed_s = time.perf_counter() - t
        if not np.isfinite(Y).all():
            raise AssertionError(f"non-finite embedding on {name}")
        out[name] = {"train_s": round(train_s, 3), "steps_per_s": round(steps / train_s, 1),
                     "sync_warnings": sum("synchroniz" in str(w.message) for w in caught),
                     "embed_rows_per_s": round(n / embed_s), "final_loss": history[-1]["loss"]}
    return out


PROBES = [
    ("1 load onto CPU by default", probe_load_on_cpu),
    ("2 workers sharing a GPU refused", probe_shared_gpu_refused),
    ("4 nprobe and k caps", probe_caps),
    ("8 GPU checkpoint resumes on CPU", probe_resume_on_cpu),
    ("kNN + P on device vs CPU", probe_knn_p),
    ("training and embedding on device vs CPU", probe_train_and_embed),
]


def run_pytest(args: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"rc": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="device of the probes (default: cuda; cpu for the dry run)")
    p.add_argument("--n", type=int, default=200_000, help="rows of the kNN + P, training and embedding probes")
    p.add_argument("--e2e-n", type=int, default=1_000_000, help="rows of the end-to-end fit (0: skip)")
    p.add_argument("--skip-pytest", action="store_true", help="do not run the gpu tests and the default suite")
    p.add_argument("--skip-mnist", action="store_true", help="do not run benchmarks/mnist.py")
    p.add_argument("--budget-s", type=float, default=420.0, help="no stage starts after this many seconds")
    p.add_argument("--out", default="gpu-check.json", help="JSON of every figure (default: gpu-check.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    report = {"environment": environment(device), "probes": {}, "stages": {}}
    print(json.dumps(report["environment"], indent=2))

    def in_budget(name: str) -> bool:
        if time.perf_counter() - t0 <= args.budget_s:
            return True
        report["stages"][name] = "skipped (budget)"
        return False

    failed = False
    for name, probe in PROBES:
        if not in_budget(name):
            continue
        t = time.perf_counter()
        try:
            figures = probe(device, args.n)
            report["probes"][name] = {"status": "PASS", **figures}
        except Exception as exc:  # a probe's failure is a result, not the end of the check
            failed = True
            report["probes"][name] = {"status": "FAIL", "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc(limit=5)}
        report["probes"][name]["seconds"] = round(time.perf_counter() - t, 2)
        print(f"{report['probes'][name]['status']}  {name}  ({report['probes'][name]['seconds']} s)")
    if not args.skip_pytest:
        for name, pytest_args in (("gpu tests", ["-m", "gpu"]), ("default suite", [])):
            if in_budget(name):
                report["stages"][name] = run_pytest(pytest_args, timeout=max(30.0, args.budget_s))
                print(f"{name}: {report['stages'][name]['summary']}")
    if not args.skip_mnist and in_budget("mnist"):
        out = Path(tempfile.mkdtemp(prefix="ptsne-gpu-check-mnist-"))
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mnist.py"), "--skip-opentsne",
                               "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
        results = out / "results.json"
        report["stages"]["mnist"] = json.loads(results.read_text()) if results.exists() else {
            "rc": proc.returncode, "stderr": proc.stderr[-2000:]}
    if args.e2e_n > 0 and in_budget("end to end"):
        t = time.perf_counter()
        est = ParametricTSNE(device=device.type, random_state=0).fit(blobs(args.e2e_n))
        report["stages"]["end to end"] = {"n": args.e2e_n, "seconds": round(time.perf_counter() - t, 1),
                                          "stages_s": est.timings_}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)
    print(f"{'FAIL' if failed else 'PASS'}: figures in {out} ({report['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

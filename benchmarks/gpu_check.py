"""One prepared GPU check (issue 19): environment, GPU tests, a probe per GPU item, figures.

On a GPU host (``make gpu-check``) it prints the environment, runs the ``gpu`` tests and
the default suite, then a probe with PASS/FAIL per item of issue 19 and the timings of
kNN + P, training and embedding on the GPU against the CPU, an optional MNIST benchmark
and an end-to-end fit, and writes every figure to one JSON file. Stages run in order of
importance and none starts after ``--budget-s`` seconds (it is recorded as skipped).

    python benchmarks/gpu_check.py [--out gpu-check.json] [--n 200000] [--budget-s 420]
    python benchmarks/gpu_check.py --device cpu --n 2000 --e2e-n 0 --skip-pytest --skip-mnist  # dry run

Further probes cover the GPU defaults: TF32 for float32 training, the exact-search threshold
by device, IVF k-means on the GPU against the CPU, the Ray kNN stage with several searches
sharing a GPU, and embedding rows/s with ``gpus_per_actor`` 1, 0.5 and 0.25 (the last two need
a GPU and Ray; each records why it was skipped otherwise).

The estimators run with ``device="auto"``, so a GPU host whose FAISS is a CPU build
trains on the GPU and searches on CPU (the environment and each figure say where).
Where Ray or MLflow is not installed (a bare GPU image), the test stages run the
numerics' tests (``tests/ptsne``) alone.

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


def _asked(device: torch.device) -> str:
    # "auto" on a GPU: trains there, and searches on CPU should FAISS be a CPU build.
    return "auto" if device.type == "cuda" else device.type


def blobs(n: int, dim: int = 50, centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=6.0, size=(centers, dim))
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)


# -- probes: each returns a dict of figures and raises (FAIL) when the behaviour is wrong ----


def probe_load_on_cpu(device: torch.device, n: int) -> dict:
    X = blobs(min(n, 2000), dim=10)
    est = ParametricTSNE(perplexity=10.0, n_epochs=2, batch_size=128, random_state=0, device=_asked(device),
                         reference_size=0).fit(X)
    if est.device_.type != device.type:
        raise AssertionError(f"fit on {device.type} ran on {est.device_}")
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
    from ptsne.knn import gpu_resources

    nlist = 2 * GPU_MAX_SELECTION_K
    X = blobs(nlist * 40, dim=8)
    cpu = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, nlist)
    cpu.train(X)
    index = faiss.index_cpu_to_gpu(gpu_resources(), 0, cpu)
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
    searches = ["cpu"] + (["cuda"] if device.type == "cuda" and faiss_gpu_count() else [])
    for name in searches:
        t = time.perf_counter()
        g = knn_graph(X, n_neighbors=90, device=name)
        t_knn = time.perf_counter() - t
        edges = joint_probabilities(g, 30.0)
        graphs[name] = g
        out[name] = {"knn_s": round(t_knn, 3), "knn_p_s": round(time.perf_counter() - t, 3)}
    if "cuda" in graphs:
        out["recall_vs_cpu"] = recall_at_k(graphs["cpu"].indices[:2000], graphs["cuda"].indices[:2000])
    else:
        out["gpu_search"] = "not run: FAISS sees no GPU" if device.type == "cuda" else "not asked"
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


def probe_ivf_training(device: torch.device, n: int) -> dict:
    from ptsne.knn import build_index, default_nlist, is_gpu_index

    X = blobs(n)
    out = {"n": n, "nlist": default_nlist(n)}
    for name in ["cpu"] + (["cuda"] if device.type == "cuda" and faiss_gpu_count() else []):
        t = time.perf_counter()
        index = build_index(X, "ivf", name, seed=0)
        out[f"{name}_build_s"] = round(time.perf_counter() - t, 3)
        if is_gpu_index(index) != (name == "cuda"):
            raise AssertionError(f"IVF built for {name} is {'a GPU' if is_gpu_index(index) else 'a CPU'} index")
    return out


def probe_exact_threshold(device: torch.device, n: int) -> dict:
    from ptsne.knn import EXACT_MAX_POINTS_GPU, resolve_knn_device, resolve_method

    on = resolve_knn_device(_asked(device), 90)
    want = "exact" if on == "cuda" else "ivf"
    if resolve_method("auto", 1_000_000, on) != want:
        raise AssertionError(f"method='auto' for 1M points searched on {on} is not {want}")
    X = blobs(n)
    t = time.perf_counter()
    knn_graph(X, n_neighbors=90, method="exact", device=on)
    return {"search_device": on, "auto_at_1M": want, "gpu_threshold": EXACT_MAX_POINTS_GPU,
            "exact_s": round(time.perf_counter() - t, 3), "n": n}


def probe_tf32(device: torch.device, n: int) -> dict:
    from ptsne.device import use_tf32
    from ptsne.model import ModelConfig, build_mapper
    from ptsne.train import TrainConfig, fit_mapper

    X = blobs(min(n, 5000), dim=10)
    edges = joint_probabilities(knn_graph(X, n_neighbors=30, method="exact", device="cpu"), 10.0)
    mapper = build_mapper(ModelConfig(X.shape[1], 2))
    mapper.standardize.fit(X)
    fit_mapper(mapper, X, edges, TrainConfig(n_epochs=1, precision="float32"), device)
    on = bool(torch.backends.cuda.matmul.allow_tf32)
    if on != use_tf32(device, None):
        raise AssertionError(f"float32 training on {device}: TF32 {'on' if on else 'off'}")
    return {"tf32": on}


def _ray_session():
    """Ray for the probes that need it: ``(ray, started_here)``, or ``(None, reason)`` when they cannot run."""
    try:
        import ray
    except ImportError:
        return None, "skipped: Ray is not installed"
    if ray.is_initialized():
        return ray, False
    ray.init(include_dashboard=False, log_to_driver=False)
    return ray, True


def _write_blob_shards(directory: Path, X: np.ndarray, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    for i, rows in enumerate(np.array_split(np.arange(len(X)), shards)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X[rows].reshape(-1)), X.shape[1])
        pq.write_table(pa.table({"id": pa.array(rows, type=pa.int64()), "vector": vec}),
                       directory / f"part-{i:03d}.parquet")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def probe_knn_ray(device: torch.device, n: int) -> dict:
    if device.type != "cuda" or not faiss_gpu_count():
        return {"skipped": "needs a GPU and FAISS GPU (the CPU stage is tested by tests/pipeline)"}
    ray, started = _ray_session()
    if ray is None:
        return {"skipped": started}
    from pipeline.affinity import AffinityJobConfig, build_affinities

    lines = _Lines()
    logger = logging.getLogger("pipeline.affinity")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
            _write_blob_shards(Path(d) / "in", blobs(n), 4)
            t = time.perf_counter()
            m = build_affinities(AffinityJobConfig(input=str(Path(d) / "in"), output=str(Path(d) / "out"),
                                                   perplexity=30.0, batch_rows=max(1000, n // 16), device="auto"))
            seconds = time.perf_counter() - t
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        if started:
            ray.shutdown()
    searched = [line for line in lines.lines if "searched on" in line]
    if not searched or "cuda" not in searched[-1]:
        raise AssertionError(f"the kNN stage did not search on the GPU: {searched}")
    at_once = int(searched[-1].split("at most ")[1].split()[0])
    if at_once < 2:
        raise AssertionError(f"search tasks did not share the GPU: {searched[-1]}")
    return {"n": n, "seconds": round(seconds, 2), "knn_method": m["knn_method"], "searched": searched[-1],
            "searches_at_once": at_once, "timings_s": m["timings_s"]}


def probe_embed_actors(device: torch.device, n: int) -> dict:
    if device.type != "cuda":
        return {"skipped": "needs a GPU (the actor plan is tested on CPU by tests/pipeline/test_embed.py)"}
    ray, started = _ray_session()
    if ray is None:
        return {"skipped": started}
    from pipeline.embed import EmbedConfig, ModelSpec, embed_shards

    out = {"n": n}
    try:
        with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
            X = blobs(n)
            est = ParametricTSNE(n_epochs=1, random_state=0, device="cpu", reference_size=0).fit(X[:5000])
            spec = ModelSpec(path=str(est.save(Path(d) / "m")), name="check", version="1", tag="v1")
            _write_blob_shards(Path(d) / "in", X, 32)
            for share in (1.0, 0.5, 0.25):
                summary = embed_shards(Path(d) / "in", Path(d) / f"out-{share:g}", spec,
                                       EmbedConfig(gpus_per_actor=share, progress=False))
                out[f"gpus_per_actor={share:g}"] = {"rows_per_s": round(summary.rows_per_s),
                                                    "stream_rows_per_s": round(summary.stream_rows_per_s)}
    finally:
        if started:
            ray.shutdown()
    return out


PROBES = [
    ("1 load onto CPU by default", probe_load_on_cpu),
    ("2 workers sharing a GPU refused", probe_shared_gpu_refused),
    ("4 nprobe and k caps", probe_caps),
    ("8 GPU checkpoint resumes on CPU", probe_resume_on_cpu),
    ("kNN + P on device vs CPU", probe_knn_p),
    ("training and embedding on device vs CPU", probe_train_and_embed),
    ("TF32 for float32 training on CUDA only", probe_tf32),
    ("exact kNN threshold by device", probe_exact_threshold),
    ("IVF trained on GPU vs CPU", probe_ivf_training),
    ("kNN stage on Ray: searches sharing a GPU", probe_knn_ray),
    ("embedding actors by gpus_per_actor", probe_embed_actors),
]


def run_pytest(args: list[str], timeout: float) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-1500:]
        return {"rc": None, "summary": f"stopped after {timeout:.0f} s (budget)",
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
                "seconds": round(time.perf_counter() - t, 1)}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"rc": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:], "failures": failures[:20],
            "seconds": round(time.perf_counter() - t, 1)}


def test_paths() -> list[str]:
    """The whole suite, or the numerics' tests alone where Ray or MLflow is not installed."""
    try:
        import mlflow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return ["tests/ptsne", "tests/test_gpu_check.py"]
    return ["tests"]


def write_report(report: dict, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="device of the probes (default: cuda; cpu for the dry run)")
    p.add_argument("--n", type=int, default=200_000, help="rows of the kNN + P, training and embedding probes")
    p.add_argument("--e2e-n", type=int, default=1_000_000, help="rows of the end-to-end fit (0: skip)")
    p.add_argument("--skip-pytest", action="store_true", help="do not run the gpu tests and the default suite")
    p.add_argument("--skip-mnist", action="store_true", help="do not run benchmarks/mnist.py")
    p.add_argument("--mnist-data", default=None, help="mnist.npz for the MNIST stage (default: $PTSNE_MNIST)")
    p.add_argument("--with-opentsne", action="store_true", help="run openTSNE beside ptsne in the MNIST stage")
    p.add_argument("--budget-s", type=float, default=420.0, help="no stage starts after this many seconds")
    p.add_argument("--out", default="gpu-check.json", help="JSON of every figure (default: gpu-check.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    out = Path(args.out)
    device = resolve_device(args.device)
    report = {"environment": environment(device), "probes": {}, "stages": {}}
    print(json.dumps(report["environment"], indent=2), flush=True)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t0)

    def in_budget(name: str) -> bool:
        if left() > 0:
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
        print(f"{report['probes'][name]['status']}  {name}  ({report['probes'][name]['seconds']} s)", flush=True)
        write_report(report, out)
    if not args.skip_pytest and in_budget("gpu tests"):
        report["stages"]["gpu tests"] = run_pytest(["-m", "gpu", *test_paths()], timeout=max(30.0, left()))
        print(f"gpu tests: {report['stages']['gpu tests']['summary']}", flush=True)
        write_report(report, out)
    if not args.skip_mnist and in_budget("mnist"):
        mnist_out = Path(tempfile.mkdtemp(prefix="ptsne-gpu-check-mnist-"))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "mnist.py"), "--out", str(mnist_out)]
        cmd += [] if args.with_opentsne else ["--skip-opentsne"]
        cmd += ["--data", args.mnist_data] if args.mnist_data else []
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        results = mnist_out / "results.json"
        report["stages"]["mnist"] = json.loads(results.read_text()) if results.exists() else {
            "rc": proc.returncode, "stderr": proc.stderr[-2000:]}
        report["stages"]["mnist"]["wall_s"] = round(time.perf_counter() - t, 1)
        print(f"mnist: {report['stages']['mnist'].get('wall_s')} s", flush=True)
        write_report(report, out)
    if args.e2e_n > 0 and in_budget("end to end"):
        t = time.perf_counter()
        est = ParametricTSNE(device=_asked(device), random_state=0).fit(blobs(args.e2e_n))
        report["stages"]["end to end"] = {"n": args.e2e_n, "seconds": round(time.perf_counter() - t, 1),
                                          "device": str(est.device_), "stages_s": est.timings_}
        print(f"end to end: {report['stages']['end to end']}", flush=True)
        write_report(report, out)
    if not args.skip_pytest and in_budget("default suite"):
        report["stages"]["default suite"] = run_pytest(test_paths(), timeout=max(30.0, left()))
        print(f"default suite: {report['stages']['default suite']['summary']}", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(report, out)
    print(f"{'FAIL' if failed else 'PASS'}: figures in {out} ({report['seconds']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

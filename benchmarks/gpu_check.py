"""One prepared GPU check: environment, a probe per GPU path (PASS, FAIL or SKIPPED), figures in one JSON.

On a GPU host (``make gpu-check``) it records the environment, then runs the probes in
order of importance: the GPU decisions, the kNN search on the GPU (FAISS GPU, or the
exact torch search beside a CPU build of FAISS) against FAISS on CPU, training and
embedding on the device against the CPU, NCCL through the project's own epoch
function under ``torchrun --standalone --nproc_per_node=1``, ``train_distributed
(use_gpu=True)`` on Ray, the affinities stage on Ray's GPUs, embedding actors in
both modes against the same node without its GPU, the ``gpu`` tests, the MNIST
benchmark, an end-to-end fit of ``--e2e-n`` points and the default suite.

    python benchmarks/gpu_check.py [--out gpu-check.json] [--n 200000] [--budget-s 420]
    python benchmarks/gpu_check.py --device cpu --n 2000 --e2e-n 0 --skip-pytest --skip-mnist  # dry run

A probe that cannot run here (no GPU, a package the image lacks: Ray, openTSNE, pytest,
MNIST's file) says SKIPPED with the reason, never PASS, and the run goes on; a probe
that raises is a FAIL with its traceback, and the run goes on. No probe starts after
``--budget-s`` seconds (SKIPPED: budget). The JSON is rewritten (under a temporary name,
then renamed) after every probe, and long probes write their figures as they measure
them, so a run cut short keeps what it measured. Exit status 1 when any probe FAILs.

A bare GPU image (torch, no Ray, FAISS or MLflow) gets what the check needs from
``benchmarks/gpu_carry.sh`` (docs/gpu-check.md). The dry run (CPU, tiny sizes) is a
default test (tests/test_gpu_check.py), so the script cannot rot.
"""

from __future__ import annotations

import argparse
import importlib.util
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.gpu_check")

#: The environment variable that gives the test Ray GPUs (tests/conftest.py).
RAY_GPUS_ENV = "PTSNE_TEST_RAY_GPUS"


class Skipped(Exception):
    """A probe that could not run here: recorded as SKIPPED with this reason, never as PASS."""


def needs(*modules: str) -> None:
    """Skip the probe unless every one of ``modules`` is importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(f"needs {', '.join(missing)} (not installed here)")


def needs_cuda(device: torch.device, what: str = "a CUDA GPU") -> None:
    if device.type != "cuda":
        raise Skipped(f"needs {what}; the device is {device}")


def environment(device: torch.device) -> dict:
    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "device": str(device), "cpus": os.cpu_count(),
        "packages": {m: importlib.util.find_spec(m) is not None
                     for m in ("faiss", "ray", "mlflow", "openTSNE", "pytest", "pyarrow", "scipy", "sklearn")},
    }
    try:
        import faiss

        from ptsne.device import faiss_gpu_count, native_bfloat16, tf32_api
        from ptsne.knn import gpu_backend

        env.update(faiss=faiss.__version__, faiss_gpus=faiss_gpu_count(), bf16_native=native_bfloat16(device),
                   gpu_search=gpu_backend(), tf32_api=tf32_api())
    except ImportError as exc:
        env["ptsne_import_error"] = str(exc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}")
    return env


def _asked(device: torch.device) -> str:
    return "auto" if device.type == "cuda" else device.type


def blobs(n: int, dim: int = 50, centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=6.0, size=(centers, dim))
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, dim))).astype(np.float32)


class Report:
    """The JSON of the run, rewritten whole (temp name, then rename) whenever a figure is added."""

    def __init__(self, out: Path, device: torch.device):
        self.out = out
        self.data = {"environment": environment(device), "probes": {}}
        self.write()

    def figure(self, probe: str, **figures) -> None:
        self.data["probes"].setdefault(probe, {}).update(figures)
        self.write()

    def write(self) -> None:
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.out)


# -- probes: each returns a dict of figures, raises Skipped (SKIPPED) or anything else (FAIL) ---


def probe_decisions(ctx) -> dict:
    """The GPU decisions as pure functions: the same answers on every host."""
    from jobs.train import training_gpus
    from pipeline.affinity import knn_on_gpu
    from pipeline.embed import EmbedConfig, plan_actors
    from pipeline.knn import gpu_nprobe, gpu_task_options
    from pipeline.train import check_gpu_workers
    from ptsne.knn import search_backend

    checks = {
        "search_backend torch beside CPU FAISS": search_backend(0, True) == "torch",
        "nprobe capped before the copy": gpu_nprobe(4096, 4096) == 2048,
        "GPU tasks end their worker": gpu_task_options({"num_gpus": 0.25}).get("max_calls") == 1,
        "refine on a GPU node: CPU actors": plan_actors(EmbedConfig(), 100, {"CPU": 16, "GPU": 1}, "refine").gpus == 0,
        "network on a GPU node: GPU actors": plan_actors(EmbedConfig(), 100, {"CPU": 16, "GPU": 1}, "network").gpus > 0,
        "train on the cluster's GPUs": training_gpus("auto", 1, 1) == 1.0,
        "flat kNN on GPUs beside CPU FAISS": knn_on_gpu("auto", 1, False, "exact"),
    }
    try:
        check_gpu_workers(2, True, 0.5)
        checks["2 workers x 0.5 GPU refused"] = False
    except ValueError:
        checks["2 workers x 0.5 GPU refused"] = True
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        raise AssertionError(f"decisions differ: {wrong}")
    return {"checked": len(checks)}


def probe_load_on_cpu(ctx) -> dict:
    from ptsne import ParametricTSNE

    device = ctx.device
    X = blobs(min(ctx.n, 2000), dim=10)
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


def probe_caps(ctx) -> dict:
    import faiss

    from ptsne.device import faiss_gpu_count
    from ptsne.knn import GPU_MAX_SELECTION_K, gpu_resources, max_nprobe, set_nprobe

    needs_cuda(ctx.device)
    if faiss_gpu_count() == 0:
        raise Skipped("needs FAISS's GPU build (FAISS here is a CPU build)")
    nlist = 2 * GPU_MAX_SELECTION_K
    X = blobs(nlist * 40, dim=8)
    cpu = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, nlist)
    cpu.train(X)
    index = faiss.index_cpu_to_gpu(gpu_resources(), 0, cpu)
    index.add(X)
    if max_nprobe(index) != GPU_MAX_SELECTION_K or set_nprobe(index, nlist) != GPU_MAX_SELECTION_K:
        raise AssertionError("nprobe on a GPU index was not capped at GPU_MAX_SELECTION_K")
    index.search(X[:100], 31)
    return {"nlist": nlist, "nprobe": GPU_MAX_SELECTION_K}


def probe_resume_on_cpu(ctx) -> dict:
    from pipeline.train import CHECKPOINT_OPTIMIZER, load_optimizer_state

    needs_cuda(ctx.device)
    net = torch.nn.Linear(4, 2).to(ctx.device)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(3, 4, device=ctx.device)).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
        torch.save({"optimizer": opt.state_dict(), "scheduler": {}}, Path(d) / CHECKPOINT_OPTIMIZER)
        state = load_optimizer_state(d)
    devices = {v.device.type for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)}
    if devices != {"cpu"}:
        raise AssertionError(f"optimizer state loaded onto {devices}")
    return {"saved_on": ctx.device.type}


def probe_knn_p(ctx) -> dict:
    """kNN + P: FAISS on CPU against the GPU search (FAISS GPU or torch), same graph."""
    from ptsne.affinity import joint_probabilities
    from ptsne.knn import knn_graph, recall_at_k, resolve_knn_device

    X = blobs(ctx.n)
    out, graphs = {}, {}
    searches = ["cpu"] + (["cuda"] if resolve_knn_device(_asked(ctx.device), 90) == "cuda" else [])
    for name in searches:
        t = time.perf_counter()
        g = knn_graph(X, n_neighbors=90, method="exact" if name == "cuda" else "auto", device=name)
        t_knn = time.perf_counter() - t
        edges = joint_probabilities(g, 30.0)
        graphs[name] = g
        out[name] = {"knn_s": round(t_knn, 3), "knn_p_s": round(time.perf_counter() - t, 3)}
        ctx.report.figure(ctx.name, **out)
    ctx.shared.update(X=X, edges=edges)
    if "cuda" not in graphs:
        raise Skipped(f"no GPU search here (CPU figures kept: {out})")
    out["recall_vs_cpu"] = recall_at_k(graphs["cpu"].indices[:2000], graphs["cuda"].indices[:2000])
    return out


def probe_torch_search_equals_faiss(ctx) -> dict:
    """The exact torch search on the device against FAISS's flat search on CPU."""
    import faiss

    from ptsne.flat import TorchFlatIndex
    from ptsne.knn import search

    X = blobs(min(ctx.n, 100_000))
    q = np.arange(0, len(X), max(1, len(X) // 2000))
    cpu = faiss.IndexFlatL2(X.shape[1])
    cpu.add(X)
    t = time.perf_counter()
    want = search(cpu, X[q], 90, query_ids=q)
    cpu_s = time.perf_counter() - t
    index = TorchFlatIndex(X.shape[1], ctx.device)
    index.add(X)
    t = time.perf_counter()
    got = search(index, X[q], 90, query_ids=q)
    torch_s = time.perf_counter() - t
    same = float((want.indices == got.indices).mean())
    if same < 0.999:
        raise AssertionError(f"the torch search agrees with FAISS on {same:.5f} of the neighbours")
    out = {"n": len(X), "queries": len(q), "same_neighbours": same, "faiss_cpu_s": round(cpu_s, 3),
           f"torch_{ctx.device.type}_s": round(torch_s, 3)}
    if ctx.device.type != "cuda":
        raise Skipped(f"ran on CPU tensors only: {out}")
    return out


def probe_train_and_embed(ctx) -> dict:
    from ptsne.model import ModelConfig, build_mapper
    from ptsne.train import TrainConfig, fit_mapper
    from ptsne.transform import transform

    if "edges" not in ctx.shared:
        raise Skipped("needs the kNN + P probe's graph")
    X, edges = ctx.shared["X"], ctx.shared["edges"]
    n = len(X)
    config = TrainConfig(n_epochs=3, seed=0)
    out = {}
    for name in dict.fromkeys(["cpu", ctx.device.type]):
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
        ctx.report.figure(ctx.name, **out)
    return out


def probe_tf32(ctx) -> dict:
    from ptsne.affinity import joint_probabilities
    from ptsne.device import tf32_api, tf32_enabled, use_tf32
    from ptsne.knn import knn_graph
    from ptsne.model import ModelConfig, build_mapper
    from ptsne.train import TrainConfig, fit_mapper

    X = blobs(min(ctx.n, 5000), dim=10)
    edges = joint_probabilities(knn_graph(X, n_neighbors=30, method="exact", device="cpu"), 10.0)
    mapper = build_mapper(ModelConfig(X.shape[1], 2))
    mapper.standardize.fit(X)
    before, during = tf32_enabled(), []
    fit_mapper(mapper, X, edges, TrainConfig(n_epochs=1, precision="float32"), ctx.device,
               callbacks=[lambda epoch, metrics: during.append(tf32_enabled())])
    if during != [use_tf32(ctx.device, None)]:
        raise AssertionError(f"float32 training on {ctx.device}: TF32 {during}")
    if tf32_enabled() != before:
        raise AssertionError("TF32 was not restored after training")
    return {"tf32_while_training": during[0], "restored": True, "api": tf32_api()}


def probe_exact_threshold(ctx) -> dict:
    from ptsne.knn import EXACT_MAX_POINTS_GPU, knn_graph, resolve_knn_device, resolve_method

    on = resolve_knn_device(_asked(ctx.device), 90)
    want = "exact" if on == "cuda" else "ivf"
    if resolve_method("auto", 1_000_000, on) != want:
        raise AssertionError(f"method='auto' for 1M points searched on {on} is not {want}")
    X = blobs(ctx.n)
    t = time.perf_counter()
    knn_graph(X, n_neighbors=90, method="exact", device=on)
    return {"search_device": on, "auto_at_1M": want, "gpu_threshold": EXACT_MAX_POINTS_GPU,
            "exact_s": round(time.perf_counter() - t, 3), "n": ctx.n}


def probe_nccl_epoch(ctx) -> dict:
    """The project's epoch function under ``torchrun --standalone --nproc_per_node=1`` with NCCL (gloo on CPU)."""
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
        result = Path(d) / "epoch.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(Path(__file__).resolve()), "--epoch-worker", str(result), "--backend", backend]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60.0, ctx.left()))
        if proc.returncode != 0:
            raise AssertionError(f"torchrun exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
        out = json.loads(result.read_text())
    if backend != "nccl":
        raise Skipped(f"needs a CUDA GPU for NCCL; the epoch ran under torchrun with gloo: {out}")
    return out


def epoch_worker(result: str, backend: str) -> int:
    """One rank of :func:`probe_nccl_epoch`: two epochs of DDP training through ``ptsne.train.run_epoch``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ptsne.affinity import joint_probabilities
    from ptsne.knn import knn_graph
    from ptsne.loss import TSNELoss
    from ptsne.model import ModelConfig, build_mapper
    from ptsne.train import NeighborSampler, TrainConfig, make_optimizer, make_scheduler, run_epoch

    dist.init_process_group(backend)
    try:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
        X = blobs(20_000 if device.type == "cuda" else 1000, dim=20)  # the CPU dry run: a few steps
        n = len(X)
        edges = joint_probabilities(knn_graph(X, n_neighbors=30, method="exact", device="cpu"), 10.0)
        torch.manual_seed(0)
        mapper = build_mapper(ModelConfig(20, 2))
        mapper.standardize.fit(X)
        model = DistributedDataParallel(mapper.to(device), device_ids=[local] if device.type == "cuda" else None)
        config = TrainConfig(n_epochs=2, batch_size=256, seed=0)
        steps = n // config.batch_size
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, steps)
        sampler, loss_fn = NeighborSampler(edges, n, device), TSNELoss(config.dof)
        gen = torch.Generator(device=device).manual_seed(0)
        Xt = torch.as_tensor(X, device=device)
        t = time.perf_counter()
        losses = []
        for epoch in range(config.n_epochs):
            order = torch.randperm(n, generator=gen, device=device)
            anchors = [order[s * config.batch_size:(s + 1) * config.batch_size] for s in range(steps)]
            m = config.positives_per_anchor
            heads = [a if m == 1 else a.repeat_interleave(m) for a in anchors]
            batches = ((Xt[a], Xt[tails], w) for a, h in zip(anchors, heads) for tails, w in [sampler.sample(h, gen)])
            means = run_epoch(model, optimizer, scheduler, loss_fn, batches, n, config.exaggeration_at(epoch))
            dist.all_reduce(means)  # NCCL reduces CUDA tensors: the epoch's means stay on the device
            losses.append(float(means[0]) / dist.get_world_size())
        seconds = time.perf_counter() - t
        if dist.get_rank() == 0:
            Path(result).write_text(json.dumps({
                "backend": dist.get_backend(), "world_size": dist.get_world_size(), "device": str(device),
                "losses": losses, "steps_per_s": round(config.n_epochs * steps / seconds, 1)}))
    finally:
        dist.destroy_process_group()
    return 0


def _ray(ctx):
    """Ray for the probes that need it (started once, with the host's GPUs)."""
    needs("ray")
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
        ctx.started_ray = True
    return ray


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


def _affinities(ctx, n: int, shards: int = 4) -> tuple[dict, list[str], float, Path]:
    from pipeline.affinity import AffinityJobConfig, build_affinities

    lines = _Lines()
    logger = logging.getLogger("pipeline.affinity")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    d = Path(tempfile.mkdtemp(prefix="ptsne-gpu-check-aff-"))
    try:
        _write_blob_shards(d / "in", blobs(n), shards)
        t = time.perf_counter()
        m = build_affinities(AffinityJobConfig(input=str(d / "in"), output=str(d / "out"), perplexity=30.0,
                                               batch_rows=max(1000, n // 16), device="auto"))
        seconds = time.perf_counter() - t
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return m, [line for line in lines.lines if "searched on" in line], seconds, d / "out"


def probe_affinities_ray(ctx) -> dict:
    needs_cuda(ctx.device)
    ray = _ray(ctx)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise Skipped("Ray sees no GPU")
    m, searched, seconds, out = _affinities(ctx, ctx.n)
    ctx.shared["affinity_dir"] = out
    if not searched or "cuda" not in searched[-1]:
        raise AssertionError(f"the kNN stage did not search on the GPU: {searched}")
    return {"n": ctx.n, "seconds": round(seconds, 2), "knn_method": m["knn_method"], "searched": searched[-1],
            "timings_s": m["timings_s"]}


def probe_train_distributed_gpu(ctx) -> dict:
    from pipeline.train import DistributedTrainConfig, train_distributed

    needs_cuda(ctx.device)
    ray = _ray(ctx)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise Skipped("Ray sees no GPU")
    affinity_dir = ctx.shared.get("affinity_dir") or _affinities(ctx, min(ctx.n, 50_000))[3]
    with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-rt-") as d:
        t = time.perf_counter()
        config = DistributedTrainConfig.from_settings(n_epochs=3, seed=0, reference_size=0)
        result = train_distributed(str(affinity_dir), config, num_workers=1, use_gpu=True, storage_path=d)
        seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 1), "epochs": len(result.history),
            "seconds_per_epoch": round(sum(h["seconds"] for h in result.history) / len(result.history), 3),
            "final_loss": result.history[-1]["loss"]}


def probe_embed_actors(ctx) -> dict:
    """Rows/s of the default actor plan against the same node without its GPU, in both modes."""
    from pipeline.embed import EmbedConfig, ModelSpec, embed_shards
    from ptsne import ParametricTSNE

    needs_cuda(ctx.device)
    needs("openTSNE")
    ray = _ray(ctx)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise Skipped("Ray sees no GPU")
    out = {"n": ctx.n}
    with tempfile.TemporaryDirectory(prefix="ptsne-gpu-check-") as d:
        X = blobs(ctx.n)
        est = ParametricTSNE(n_epochs=2, random_state=0, device="cpu", reference_size=5000).fit(X[:20_000])
        spec = ModelSpec(path=str(est.save(Path(d) / "m")), name="check", version="1", tag="v1")
        _write_blob_shards(Path(d) / "in", X, 32)
        for method in ("network", "refine"):
            for label, gpus in (("default", None), ("without_gpu", 0.0)):
                summary = embed_shards(Path(d) / "in", Path(d) / f"out-{method}-{label}", spec,
                                       EmbedConfig(gpus_per_actor=gpus, progress=False, method=method))
                out[f"{method}_{label}_rows_per_s"] = round(summary.rows_per_s)
                ctx.report.figure(ctx.name, **out)
            out[f"{method}_gpu_vs_without"] = round(out[f"{method}_default_rows_per_s"]
                                                    / max(1, out[f"{method}_without_gpu_rows_per_s"]), 3)
    slower = [m for m in ("network", "refine") if out[f"{m}_gpu_vs_without"] < 0.95]
    if slower:
        raise AssertionError(f"embedding with the GPU is slower than without it in {slower}: {out}")
    return out


def _pytest(ctx, args: list[str], gpus: int = 0) -> dict:
    needs("pytest")
    t = time.perf_counter()
    env = {**os.environ, RAY_GPUS_ENV: str(gpus)}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=max(30.0, ctx.left()), env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"stopped after {max(30.0, ctx.left()):.0f} s (budget)") from None
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    out = {"rc": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
           "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20],
           "seconds": round(time.perf_counter() - t, 1)}
    if proc.returncode not in (0, 5):
        raise AssertionError(json.dumps(out))
    return out


def test_paths() -> list[str]:
    """The whole suite, or the numerics' tests alone where Ray or MLflow is not installed."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("mlflow") is None:
        return ["tests/ptsne", "tests/test_gpu_check.py"]
    return ["tests"]


def probe_gpu_tests(ctx) -> dict:
    needs_cuda(ctx.device)
    if ctx.args.skip_pytest:
        raise Skipped("--skip-pytest")
    return _pytest(ctx, ["-m", "gpu", *test_paths()], gpus=1)


def probe_mnist(ctx) -> dict:
    if ctx.args.skip_mnist:
        raise Skipped("--skip-mnist")
    needs("openTSNE")
    data = Path(ctx.args.mnist_data or os.environ.get("PTSNE_MNIST") or ROOT.parent / "shared" / "data" / "mnist.npz")
    if not data.exists():
        raise Skipped(f"no MNIST file at {data}")
    mnist_out = Path(tempfile.mkdtemp(prefix="ptsne-gpu-check-mnist-"))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "mnist.py"), "--out", str(mnist_out), "--data", str(data)]
    cmd += [] if ctx.args.with_opentsne else ["--skip-opentsne"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60.0, ctx.left()))
    results = mnist_out / "results.json"
    if proc.returncode != 0 or not results.exists():
        raise AssertionError(f"benchmarks/mnist.py exited {proc.returncode}: {proc.stderr[-2000:]}")
    return {**json.loads(results.read_text()), "wall_s": round(time.perf_counter() - t, 1)}


def probe_end_to_end(ctx) -> dict:
    from ptsne import ParametricTSNE

    if ctx.args.e2e_n <= 0:
        raise Skipped("--e2e-n 0")
    needs("openTSNE")  # the reference map
    X = blobs(ctx.args.e2e_n)
    ctx.report.figure(ctx.name, n=ctx.args.e2e_n)
    t = time.perf_counter()
    est = ParametricTSNE(device=_asked(ctx.device), random_state=0).fit(X)
    return {"n": ctx.args.e2e_n, "seconds": round(time.perf_counter() - t, 1), "device": str(est.device_),
            "stages_s": {k: round(v, 2) for k, v in est.timings_.items()}}


def probe_default_suite(ctx) -> dict:
    if ctx.args.skip_pytest:
        raise Skipped("--skip-pytest")
    return _pytest(ctx, test_paths())


PROBES = [
    ("GPU decisions", probe_decisions),
    ("load onto CPU by default", probe_load_on_cpu),
    ("nprobe and k caps of FAISS GPU", probe_caps),
    ("GPU checkpoint resumes on CPU", probe_resume_on_cpu),
    ("TF32 while training only", probe_tf32),
    ("torch exact search equals FAISS flat", probe_torch_search_equals_faiss),
    ("kNN + P on device vs CPU", probe_knn_p),
    ("training and embedding on device vs CPU", probe_train_and_embed),
    ("exact kNN threshold by device", probe_exact_threshold),
    ("NCCL through run_epoch under torchrun", probe_nccl_epoch),
    ("affinities stage on Ray's GPUs", probe_affinities_ray),
    ("train_distributed(use_gpu=True) on Ray", probe_train_distributed_gpu),
    ("embedding actors in both modes vs without the GPU", probe_embed_actors),
    ("gpu tests", probe_gpu_tests),
    ("MNIST benchmark", probe_mnist),
    ("end to end", probe_end_to_end),
    ("default suite", probe_default_suite),
]


class Context:
    """What the probes share: the device, sizes, options, the report and the remaining time."""

    def __init__(self, device: torch.device, args: argparse.Namespace, report: Report, t0: float):
        self.device, self.args, self.n, self.report, self.t0 = device, args, args.n, report, t0
        self.shared: dict = {}
        self.name = ""
        self.started_ray = False

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)


def run_probe(ctx: Context, name: str, probe) -> str:
    """Run one probe into the report; returns its status (PASS, FAIL or SKIPPED)."""
    ctx.name = name
    t = time.perf_counter()
    import_error = ctx.report.data["environment"].get("ptsne_import_error")
    try:
        if ctx.left() <= 0:
            raise Skipped("budget: no time left for it")
        if import_error:
            raise Skipped(f"ptsne does not import here: {import_error}")
        entry = {"status": "PASS", **probe(ctx)}
    except Skipped as exc:
        entry = {"status": "SKIPPED", "reason": str(exc)}
    except ImportError as exc:  # an optional package the image lacks
        entry = {"status": "SKIPPED", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # a probe's failure is a result, not the end of the check
        entry = {"status": "FAIL", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
    entry["seconds"] = round(time.perf_counter() - t, 2)
    ctx.report.data["probes"][name] = {**ctx.report.data["probes"].get(name, {}), **entry}
    ctx.report.write()
    reason = f"  {entry['reason']}" if entry["status"] == "SKIPPED" else ""
    print(f"{entry['status']:7s}  {name}  ({entry['seconds']} s){reason}", flush=True)
    return entry["status"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="device of the probes (default: cuda; cpu for the dry run)")
    p.add_argument("--n", type=int, default=200_000, help="rows of the kNN + P, training and embedding probes")
    p.add_argument("--e2e-n", type=int, default=1_000_000, help="rows of the end-to-end fit (0: skip)")
    p.add_argument("--skip-pytest", action="store_true", help="do not run the gpu tests and the default suite")
    p.add_argument("--skip-mnist", action="store_true", help="do not run benchmarks/mnist.py")
    p.add_argument("--mnist-data", default=None,
                   help="mnist.npz for the MNIST probe (default: $PTSNE_MNIST, else shared/data/ beside the checkout)")
    p.add_argument("--with-opentsne", action="store_true", help="run openTSNE beside ptsne in the MNIST probe")
    p.add_argument("--only", action="append", default=None, help="run only the probes whose name contains this")
    p.add_argument("--budget-s", type=float, default=420.0, help="no probe starts after this many seconds")
    p.add_argument("--out", default="gpu-check.json", help="JSON of every figure (default: gpu-check.json)")
    p.add_argument("--epoch-worker", default=None, help=argparse.SUPPRESS)  # one torchrun rank of the NCCL probe
    p.add_argument("--backend", default="nccl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.epoch_worker:
        return epoch_worker(args.epoch_worker, args.backend)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("gpu check: torch sees no CUDA GPU; the probes run on CPU and the GPU ones say SKIPPED")
        device = torch.device("cpu")
    report = Report(Path(args.out), device)
    print(json.dumps(report.data["environment"], indent=2), flush=True)
    ctx = Context(device, args, report, t0)
    statuses = []
    try:
        for name, probe in PROBES:
            if args.only and not any(part in name for part in args.only):
                continue
            statuses.append(run_probe(ctx, name, probe))
    finally:
        if ctx.started_ray:
            import ray

            ray.shutdown()
    report.data["seconds"] = round(time.perf_counter() - t0, 1)
    report.data["counts"] = {s: statuses.count(s) for s in ("PASS", "FAIL", "SKIPPED")}
    report.write()
    print(f"{'FAIL' if 'FAIL' in statuses else 'DONE'}: {report.data['counts']}, figures in {args.out} "
          f"({report.data['seconds']} s)")
    return 1 if "FAIL" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())

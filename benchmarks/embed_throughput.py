"""Parquet-to-Parquet embedding throughput of ``pipeline.embed`` against the raw model forward.

The pipeline runs ``--num-actors`` actors of ``--cpus-per-actor`` CPUs each on a
local Ray of ``--cpus`` CPUs; the raw forward is ``ParametricTSNE.transform`` of
the same rows already in memory, in a Ray task of ``num_actors * cpus_per_actor``
CPUs (same process setup and threads as the actors), timed ``--repeats`` times
before and after the pipeline; the median is the reference (the best is
reported too). On a shared machine run it a few times: other processes move
both numbers by tens of percent.
Actor start-up (a process importing torch) is a fixed cost per run, so the
steady-state rate (``EmbedSummary.stream_rows_per_s``: rows after the first
output batch over the time from the first to the last batch, which includes
reading, the model, and writing each shard with its ledger line) is compared
with the raw rate; the end-to-end rate (start-up included) is reported too.

Example::

    python benchmarks/embed_throughput.py --rows 400000 --dim 64 --shards 16 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.embed import EmbedConfig, ModelSpec, embed_shards  # noqa: E402
from ptsne import ParametricTSNE  # noqa: E402
from ptsne.device import set_num_threads  # noqa: E402
from ptsne.model import DEFAULT_HIDDEN, ModelConfig, build_mapper  # noqa: E402


def make_model(dim: int, hidden: tuple[int, ...], X: np.ndarray, path: Path) -> ParametricTSNE:
    """An untrained mapper of the production architecture (throughput does not depend on training)."""
    import torch

    torch.manual_seed(0)
    mapper = build_mapper(ModelConfig(dim, 2, hidden_layers=hidden))
    mapper.standardize.fit(X[:10000])
    est = ParametricTSNE.from_mapper(mapper, n_features_in=dim, n_neighbors=90, hidden_layers=hidden, device="cpu")
    est.save(path)
    return est


def write_shards(root: Path, X: np.ndarray, n_shards: int) -> None:
    root.mkdir(parents=True)
    for i, idx in enumerate(np.array_split(np.arange(len(X)), n_shards)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X[idx].reshape(-1)), X.shape[1])
        pq.write_table(pa.table({"id": pa.array(idx, pa.int64()), "vector": vec}), root / f"part-{i:04d}.parquet")


def raw_forward(model_dir: str, X: np.ndarray, threads: int, batch_size: int) -> float:
    """Seconds of ``transform(X)`` after a warm-up, on ``threads`` threads."""
    set_num_threads(threads)
    est = ParametricTSNE.load(model_dir, device="cpu")
    est.transform(X[:batch_size], batch_size=batch_size)
    t = time.perf_counter()
    est.transform(X, batch_size=batch_size)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("Example")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--hidden", default=",".join(map(str, DEFAULT_HIDDEN)), help="hidden widths, comma-separated")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="raw forward timings before and after the pipeline")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.shards < 2 or args.rows < args.shards:
        p.error("need --shards >= 2 and --rows >= --shards")
    hidden = tuple(int(h) for h in args.hidden.split(","))
    threads = max(1, int(args.num_actors * args.cpus_per_actor))

    import ray

    with tempfile.TemporaryDirectory(prefix="ptsne-bench-") as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        X = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
        make_model(args.dim, hidden, X, tmp / "model")
        write_shards(tmp / "in", X, args.shards)

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            raw_task = ray.remote(num_cpus=threads)(raw_forward)
            X_ref = ray.put(X)
            raw_times = [ray.get(raw_task.remote(str(tmp / "model"), X_ref, threads, args.batch_size))
                         for _ in range(args.repeats)]
            spec = ModelSpec(path=str(tmp / "model"), name="bench", version="1", tag="v1")
            cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.num_actors,
                              cpus_per_actor=args.cpus_per_actor, progress=False)
            s_all = embed_shards(tmp / "in", tmp / "out", spec, cfg)
            raw_times += [ray.get(raw_task.remote(str(tmp / "model"), X_ref, threads, args.batch_size))
                          for _ in range(args.repeats)]
        finally:
            ray.shutdown()

    raw = args.rows / float(np.median(raw_times))
    raw_best = args.rows / min(raw_times)
    steady = s_all.stream_rows_per_s
    result = {
        "rows": args.rows, "dim": args.dim, "shards": args.shards, "hidden": list(hidden),
        "batch_size": args.batch_size, "ray_cpus": args.cpus, "num_actors": args.num_actors,
        "cpus_per_actor": args.cpus_per_actor, "threads_raw": threads,
        "raw_rows_per_s_median": round(raw), "raw_rows_per_s_best": round(raw_best), "pipeline_rows_per_s_end_to_end": round(s_all.rows_per_s),
        "pipeline_rows_per_s_steady": round(steady),
        "overhead_steady": round(1 - steady / raw, 3),
        "pipeline_seconds": round(s_all.seconds, 2), "pipeline_stream_seconds": round(s_all.stream_seconds, 2),
        "raw_seconds": [round(t, 2) for t in raw_times],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for k, v in result.items():
        print(f"{k:34s} {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

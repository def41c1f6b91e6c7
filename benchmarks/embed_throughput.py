"""Parquet-to-Parquet embedding throughput of ``pipeline.embed`` against the raw model forward.

The pipeline runs ``--num-actors`` actors of ``--cpus-per-actor`` CPUs each on a
local Ray of ``--cpus`` CPUs. The raw forward is ``ParametricTSNE.transform`` of
the same rows already in memory, at the same batch size, in a Ray task of
``num_actors * cpus_per_actor`` CPUs (a Ray worker like the actors, on the same
number of torch threads).

Raw and pipeline runs are interleaved ``--repeats`` times (raw, pipeline, raw,
pipeline, ...; each on all ``--rows`` rows, each pipeline run into a fresh output
directory with fresh actors), so that slow drifts of the machine's load hit
both alike. Reported: the median of each, the overhead of the medians and the
median of the per-pair overheads (each pipeline run against the raw run just
before it). On a shared machine run it a few times: other processes move both
numbers by tens of percent; ``load_average_1min`` is recorded with the result.

Actor start-up (a process importing torch) is a fixed cost per run, so the
steady-state rate (``EmbedSummary.stream_rows_per_s``: all embedded rows over
the time from the first model call in an actor to the last shard written,
which includes the actors' reading, model calls and writing) is compared with the raw rate; the end-to-end rate (start-up included)
is reported too, and so is the share of the stream time the actors spent in
the model (``model_seconds``) and in their per-batch calls (``actor_seconds``).

With ``--s3`` the input shards and every output live on a local S3-protocol server
(moto's ``ThreadedMotoServer`` on 127.0.0.1, started here; pyarrow and the actors reach it
through ``AWS_ENDPOINT_URL``), so the actors read and write over the S3 protocol.

Example::

    python benchmarks/embed_throughput.py --cpus 2 --json /tmp/embed_bench/result.json
    python benchmarks/embed_throughput.py --cpus 2 --num-actors 2 --s3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.embed import CPU_BATCH_ROWS, EmbedConfig, ModelSpec, embed_shards
from pipeline.session import RaySession
from ptsne import ParametricTSNE
from ptsne.device import set_num_threads
from ptsne.model import DEFAULT_HIDDEN, ModelConfig, build_mapper


def make_model(dim: int, hidden: tuple[int, ...], X: np.ndarray, path: Path) -> ParametricTSNE:
    """An untrained mapper of the production architecture (throughput does not depend on training)."""
    import torch

    torch.manual_seed(0)
    mapper = build_mapper(ModelConfig(dim, 2, hidden_layers=hidden))
    mapper.standardize.fit(X[:10000])
    est = ParametricTSNE.from_mapper(mapper, n_features_in=dim, n_neighbors=90, hidden_layers=hidden, device="cpu")
    est.save(path)
    return est


def write_shards(root: str, X: np.ndarray, n_shards: int) -> None:
    fs, path = pafs.FileSystem.from_uri(root)
    fs.create_dir(path)
    for i, idx in enumerate(np.array_split(np.arange(len(X)), n_shards)):
        vec = pa.FixedSizeListArray.from_arrays(pa.array(X[idx].reshape(-1)), X.shape[1])
        pq.write_table(pa.table({"id": pa.array(idx, pa.int64()), "vector": vec}), f"{path}/part-{i:04d}.parquet",
                       filesystem=fs)


def remove(root: str) -> None:
    fs, path = pafs.FileSystem.from_uri(root)
    fs.delete_dir(path)


@contextlib.contextmanager
def local_s3(bucket: str):
    """A local S3-protocol server for this process and the Ray it starts; yields ``s3://bucket``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="bench", secret_key="bench", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()


def raw_forward(model_dir: str, X: np.ndarray, threads: int, batch_size: int) -> float:
    """Seconds of ``transform(X)`` (batches of ``batch_size`` rows) after a warm-up, on ``threads`` threads."""
    set_num_threads(threads)
    est = ParametricTSNE.load(model_dir, device="cpu")
    est.transform(X[:batch_size], batch_size=batch_size)
    t = time.perf_counter()
    est.transform(X, batch_size=batch_size)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("Example")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--hidden", default=",".join(map(str, DEFAULT_HIDDEN)), help="hidden widths, comma-separated")
    p.add_argument("--batch-size", type=int, default=CPU_BATCH_ROWS,
                   help=f"rows per model call, raw and pipeline (default: the pipeline's on CPU, {CPU_BATCH_ROWS})")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--num-actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="interleaved raw and pipeline runs")
    p.add_argument("--s3", action="store_true", help="input and outputs on a local S3-protocol server (moto)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.shards < 2 or args.rows < args.shards:
        p.error("need --shards >= 2 and --rows >= --shards")
    if args.repeats < 1:
        p.error("need --repeats >= 1")
    hidden = tuple(int(h) for h in args.hidden.split(","))
    threads = max(1, int(args.num_actors * args.cpus_per_actor))

    import ray

    with tempfile.TemporaryDirectory(prefix="ptsne-bench-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        data = stack.enter_context(local_s3("ptsne-bench")) if args.s3 else str(tmp)
        rng = np.random.default_rng(0)
        X = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
        make_model(args.dim, hidden, X, tmp / "model")
        write_shards(f"{data}/in", X, args.shards)

        RaySession(None, args.cpus, log_to_driver=False).start()
        raw_times, runs = [], []
        try:
            raw_task = ray.remote(num_cpus=threads)(raw_forward)
            X_ref = ray.put(X)
            del X
            spec = ModelSpec(path=str(tmp / "model"), name="bench", version="1", tag="v1")
            cfg = EmbedConfig(batch_size=args.batch_size, num_actors=args.num_actors,
                              cpus_per_actor=args.cpus_per_actor, progress=False)
            for i in range(args.repeats):
                raw_times.append(ray.get(raw_task.remote(str(tmp / "model"), X_ref, threads, args.batch_size)))
                runs.append(embed_shards(f"{data}/in", f"{data}/out-{i}", spec, cfg))
                remove(f"{data}/out-{i}")
                print(f"repeat {i + 1}/{args.repeats}: raw {args.rows / raw_times[-1]:,.0f} rows/s, "
                      f"pipeline steady {runs[-1].stream_rows_per_s:,.0f} rows/s", file=sys.stderr)
        finally:
            ray.shutdown()

    raw_rates = [args.rows / t for t in raw_times]
    steady = [s.stream_rows_per_s for s in runs]
    raw, pipe = float(np.median(raw_rates)), float(np.median(steady))
    result = {
        "storage": "s3 (local moto server)" if args.s3 else "local disk",
        "rows": args.rows, "dim": args.dim, "shards": args.shards, "hidden": list(hidden),
        "batch_size": args.batch_size, "ray_cpus": args.cpus, "num_actors": args.num_actors,
        "cpus_per_actor": args.cpus_per_actor, "threads_raw": threads, "repeats": args.repeats,
        "raw_rows_per_s_median": round(raw), "raw_rows_per_s_best": round(max(raw_rates)),
        "pipeline_rows_per_s_steady_median": round(pipe),
        "overhead_steady": round(1 - pipe / raw, 3),
        "overhead_steady_paired_median": round(float(np.median([1 - s / r for s, r in zip(steady, raw_rates)])), 3),
        "raw_rows_per_s": [round(r) for r in raw_rates],
        "pipeline_rows_per_s_steady": [round(r) for r in steady],
        "pipeline_rows_per_s_end_to_end": [round(s.rows_per_s) for s in runs],
        "pipeline_seconds": [round(s.seconds, 2) for s in runs],
        "pipeline_stream_seconds": [round(s.stream_seconds, 2) for s in runs],
        "actor_model_share": [round(s.model_seconds / (s.stream_seconds * args.num_actors), 3) for s in runs],
        "actor_busy_share": [round(s.actor_seconds / (s.stream_seconds * args.num_actors), 3) for s in runs],
        "model_rows_per_s_in_actors": [round(s.stream_rows * args.num_actors / s.model_seconds) if s.model_seconds else 0
                                       for s in runs],
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for k, v in result.items():
        print(f"{k:36s} {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``ptsne quickstart``: the whole pipeline on scikit-learn's digits, on this machine.

1. writes the digits (1797 images of 8x8 pixels, shipped with scikit-learn) as
   Parquet shards: a training split and a held-out split;
2. runs ``ptsne train`` on the training split with a local Ray (kNN -> P ->
   two training workers -> MLflow run with metrics and plot -> registered model
   ``ptsne-digits@champion``) in the default local MLflow store;
3. embeds the held-out shards with ``ptsne embed --model models:/ptsne-digits@champion``;
4. prints where the plot, the run, the model and the embeddings are.

Running it again reuses everything that is already there and matches.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jobs.cli import EXIT_OK, EXIT_USAGE, Report

log = logging.getLogger(__name__)

REPORT = Report("quickstart")

DEFAULT_WORKDIR = "ptsne-quickstart"
HELD_OUT_FRACTION = 0.2


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="train, register and apply a map of scikit-learn's digits, end to end on this machine",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where data, model and outputs go (default: ./{DEFAULT_WORKDIR})")
    p.add_argument("--workers", type=int, default=2, help="training workers (default: 2)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default: 40)")
    p.add_argument("--model-name", default="ptsne-digits", help="registered model name (default: ptsne-digits)")
    p.add_argument("--alias", default="champion", help="alias of the new version (default: champion)")
    p.add_argument("--experiment", default="ptsne-quickstart", help="MLflow experiment (default: ptsne-quickstart)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def write_digits(data_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Digits as Parquet shards ``train/`` and ``heldout/`` (columns id, vector, label); kept if present."""
    import numpy as np
    from sklearn.datasets import load_digits

    from pipeline.shards import write_array_shards

    train_dir, heldout_dir = data_dir / "train", data_dir / "heldout"
    if any(train_dir.glob("*.parquet")) and any(heldout_dir.glob("*.parquet")):
        log.info("quickstart: reusing the digits shards in %s", data_dir)
        return train_dir, heldout_dir
    digits = load_digits()
    X = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    ids = np.arange(len(X), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(X))
    n_held = int(round(HELD_OUT_FRACTION * len(X)))
    held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
    write_array_shards(str(train_dir), X[train], y[train], ids[train], shard_rows=500, overwrite=True)
    write_array_shards(str(heldout_dir), X[held], y[held], ids[held], shard_rows=200, overwrite=True)
    log.info("quickstart: wrote %d training and %d held-out digits to %s", len(train), len(held), data_dir)
    return train_dir, heldout_dir


def run(args: argparse.Namespace) -> int:
    from jobs.cli import build_parser
    from jobs.train import TrainJobSpec, resolve_args, train_job

    if args.workers < 1 or args.epochs < 1:
        return REPORT.error("--workers and --epochs must be >= 1", EXIT_USAGE)
    workdir = Path(args.workdir).resolve()
    train_dir, heldout_dir = write_digits(workdir / "data", args.seed)

    from pipeline.session import RaySession

    session = RaySession(None, args.num_cpus)
    try:
        session.start()
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = max(1, min(args.workers, cpus))
        if workers < args.workers:
            log.warning("quickstart: Ray has %d CPU(s); training with %d worker(s)", cpus, workers)
        parser = build_parser()
        targs = parser.parse_args([
            "train", "--input", str(train_dir), "--eval-input", str(heldout_dir),
            "--vector-col", "vector", "--id-col", "id", "--label-col", "label",
            "--perplexity", "30", "--knn-method", "exact", "--epochs", str(args.epochs), "--batch-size", "128",
            "--learning-rate", "0.002", "--workers", str(workers), "--seed", str(args.seed),
            "--workdir", str(workdir / "train"), "--experiment", args.experiment,
            "--register", args.model_name, "--alias", args.alias,
        ])
        result = train_job(TrainJobSpec.from_args(resolve_args(targs)))
        model_uri = f"models:/{args.model_name}@{args.alias}"
        embeddings = workdir / "embeddings"
        eargs = parser.parse_args([
            "embed", "--model", model_uri, "--input", str(heldout_dir), "--output", str(embeddings),
            "--id-col", "id", "--passthrough", "label", "--no-progress",
        ])
        code = eargs.func(eargs)
        if code != EXIT_OK:
            return REPORT.error(f"embedding the held-out shards failed (exit code {code})", code)
    except Exception as exc:
        return REPORT.fail(exc)
    finally:
        session.close()

    ui = f"mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1 --port 5000"
    summary = {
        "plot": result.plot,
        "mlflow_run": result.run_id,
        "mlflow_ui": ui,
        "run_url": f"http://127.0.0.1:5000/#/experiments/{result.experiment_id}/runs/{result.run_id}",
        "model": model_uri,
        "model_dir": result.model_dir,
        "embeddings": str(embeddings),
        "metrics": {k: v for k, v in result.metrics.items() if k in ("knn_accuracy", "trustworthiness", "knn_recall")},
        "skipped": result.skipped,
    }
    lines = [
        "",
        "ptsne quickstart: done",
        f"  plot of the training map : {summary['plot']}",
        f"  MLflow run               : {summary['mlflow_run']}  (open with: {ui}; then {summary['run_url']})",
        f"  registered model         : {model_uri}",
        f"  held-out embeddings      : {summary['embeddings']}",
        f"  held-out quality         : {json.dumps(summary['metrics'])}",
        "",
    ]
    sys.stdout.write("\n".join(lines))
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return EXIT_OK

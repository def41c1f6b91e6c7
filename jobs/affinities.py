"""``ptsne affinities``: Parquet shards -> affinity directory (features, joint-P edges, manifest)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import EXIT_OK, Report, add_ray_arguments, ray_session

log = logging.getLogger(__name__)

REPORT = Report("affinities", output="--output", overwrite="--overwrite")


def _n_neighbors(value: str):
    return value if value == "auto" else int(value)


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Options naming the input columns (shared with other subcommands that read shards)."""
    p.add_argument("--vector-col", default="vector", help="column of fixed-size lists or lists of numbers (default: vector)")
    p.add_argument("--feature-cols", default=None,
                   help="comma-separated numeric columns that form the vectors (instead of --vector-col)")
    p.add_argument("--id-col", default=None, help="int or string id column (default: row position in the input)")
    p.add_argument("--label-col", default=None, help="column copied to the features as 'label'")


def add_affinity_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the affinity stage (also usable by ``ptsne train``)."""
    add_input_arguments(p)
    p.add_argument("--perplexity", type=float, nargs="+", default=[30.0],
                   help="perplexity, or several for multiscale affinities (default: 30)")
    p.add_argument("--n-neighbors", type=_n_neighbors, default="auto", help="neighbours per point (default: auto = 3 x perplexity)")
    p.add_argument("--pca", dest="pca_components", type=int, default=None, help="project to this many dimensions first")
    p.add_argument("--pca-samples", type=int, default=100_000, help="rows sampled to fit the PCA (default: 100000)")
    p.add_argument("--knn-method", choices=("auto", "exact", "ivf"), default="auto")
    p.add_argument("--target-recall", type=float, default=0.95, help="IVF recall@k target (default: 0.95)")
    p.add_argument("--batch-rows", type=int, default=50_000, help="rows per kNN task (default: 50000)")
    p.add_argument("--edge-partitions", type=int, default=None, help="edges output parts (default: from the edge count)")
    p.add_argument("--max-index-bytes", type=int, default=None,
                   help="largest index shipped whole through the object store; larger ones are sharded "
                   "(default: min(2 GiB, 1/4 of the smallest node's object store))")
    p.add_argument("--drop-invalid", action="store_true",
                   help="drop NaN/Inf/missing vectors into rejects.parquet instead of rejecting the input")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--task-cpus", type=int, default=1, help="CPUs per Ray task (default: 1)")
    p.add_argument("--seed", type=int, default=0)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "affinities",
        help="compute the kNN graph and joint-P affinities of Parquet shards with Ray",
        description="Validate Parquet shards, optionally apply PCA, and write an affinity "
        "directory: features/ and edges/ Parquet shards plus manifest.json. A run whose "
        "output already holds a manifest with the same settings and input returns at once.",
    )
    p.add_argument("--input", required=True, help="directory, file or URI of Parquet shards")
    p.add_argument("--output", required=True, help="affinity directory to create (path or URI)")
    add_affinity_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output built with other settings")
    add_ray_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, **overrides):
    """An :class:`pipeline.affinity.AffinityJobConfig` from parsed arguments; ``overrides`` replace fields."""
    from pipeline.affinity import AffinityJobConfig

    perp = args.perplexity
    fields = dict(
        input=args.input,
        output=getattr(args, "output", None),  # `ptsne train` passes its own (WORKDIR/affinities)
        vector_col=args.vector_col,
        feature_cols=tuple(c.strip() for c in args.feature_cols.split(",") if c.strip()) if args.feature_cols else None,
        id_col=args.id_col,
        label_col=args.label_col,
        perplexity=perp[0] if len(perp) == 1 else tuple(perp),
        n_neighbors=args.n_neighbors,
        pca_components=args.pca_components,
        pca_samples=args.pca_samples,
        knn_method=args.knn_method,
        target_recall=args.target_recall,
        batch_rows=args.batch_rows,
        edge_partitions=args.edge_partitions,
        max_index_bytes=args.max_index_bytes,
        drop_invalid=args.drop_invalid,
        device=args.device,
        task_cpus=args.task_cpus,
        seed=args.seed,
        overwrite=getattr(args, "overwrite", False),
        ray_address=getattr(args, "ray_address", None),
    )
    fields.update(overrides)
    return AffinityJobConfig(**fields)


def run(args: argparse.Namespace) -> int:
    from pipeline.storage import check_disjoint

    try:
        check_disjoint(args.input, args.output, ("--input", "--output"))
        config = config_from_args(args)
    except (TypeError, ValueError) as exc:
        return REPORT.refuse(exc)
    from pipeline.affinity import build_affinities
    from pipeline.storage import check_creatable, resolve

    try:  # a local output that cannot be created is reported before the input is read
        check_creatable(*resolve(config.output))
    except OSError as exc:
        return REPORT.fail(exc)
    # Without --num-cpus, Ray starts (on loopback) only once the input is listed and the
    # output found out of date, so an up-to-date rerun costs no Ray start-up.
    try:
        with ray_session(args) as session:
            if args.num_cpus is not None:
                session.start()
            manifest = build_affinities(config)
    except Exception as exc:
        return REPORT.fail(exc)
    summary = {k: manifest[k] for k in ("n", "dim", "k", "perplexities", "knn_method", "knn_recall", "n_edges")}
    summary["output"] = config.output
    summary["timings_s"] = manifest.get("timings_s")
    sys.stdout.write(json.dumps(summary) + "\n")
    return EXIT_OK

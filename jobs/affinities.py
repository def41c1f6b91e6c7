"""``ptsne affinities``: Parquet shards -> affinity directory (features, joint-P edges, manifest)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import EXIT_OK, Report, add_ray_arguments, ray_session

log = logging.getLogger(__name__)

REPORT = Report("affinities", output="--output", overwrite="--overwrite")


def add_affinity_arguments(p) -> None:
    """Options of the affinity stage, one per setting of :class:`pipeline.affinity.AffinityJobConfig`
    (also the "kNN and affinities" group of ``ptsne train``)."""
    from jobs.settings import add_setting_arguments
    from pipeline.configs import AffinityJobConfig

    add_setting_arguments(p, AffinityJobConfig)


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
    from jobs.settings import settings_from_args
    from pipeline.configs import AffinityJobConfig

    fields = dict(
        input=args.input,
        output=getattr(args, "output", None),  # `ptsne train` passes its own (WORKDIR/affinities)
        **settings_from_args(args, AffinityJobConfig),
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

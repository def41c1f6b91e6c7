"""``ptsne data import`` (.npy/.npz/.csv -> Parquet shards) and ``ptsne data synth``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from jobs.cli import EXIT_NOT_FOUND, EXIT_OK, Report, add_ray_arguments, ray_session

log = logging.getLogger(__name__)

IMPORT_REPORT = Report("data import", output="--output", overwrite="--overwrite")
SYNTH_REPORT = Report("data synth", output="--output", overwrite="--overwrite")

#: Smallest normal and largest finite float32 magnitudes (``--scale`` bounds).
_FLOAT32_TINY, _FLOAT32_MAX = 1.1754944e-38, 3.4028235e38


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="import arrays as Parquet shards or generate synthetic data")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    imp = sub.add_parser(
        "import",
        help="convert a .npy, .npz or .csv file into Parquet shards",
        description="Write the vectors of a .npy/.npz/.csv file (and its labels) as "
        "part-*.parquet shards with columns id, vector (fixed-size list of float32) and label.",
    )
    imp.add_argument("source", help="a .npy, .npz or .csv file")
    imp.add_argument("--output", required=True, help="directory (or URI) of the shards to create")
    imp.add_argument("--shard-rows", type=int, default=100_000, help="rows per shard (default: 100000)")
    imp.add_argument("--x-key", default=None, help=".npz: array of vectors (default: X, x, data, X_train, x_train)")
    imp.add_argument("--y-key", default=None,
                     help=".npz: array of labels (default: y, labels, label, target, y_train; '' for none)")
    imp.add_argument("--label-col", default=None, help=".csv: label column")
    imp.add_argument("--id-col", default=None, help=".csv: id column")
    imp.add_argument("--scale", type=_scale, default=None, help="multiply the vectors by this (e.g. 0.00392156 for 1/255)")
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    imp.set_defaults(func=run_import)

    syn = sub.add_parser(
        "synth",
        help="write a deterministic Gaussian mixture with labels as Parquet shards",
        description="Each shard is generated from (seed, shard index) alone, in parallel Ray tasks.",
    )
    syn.add_argument("--n", type=int, required=True, help="number of points")
    syn.add_argument("--dim", type=int, required=True, help="dimension")
    syn.add_argument("--centers", type=int, default=10, help="mixture components / labels (default: 10)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--shard-rows", type=int, default=100_000, help="rows per shard (default: 100000)")
    syn.add_argument("--spread", type=float, default=6.0, help="standard deviation of the component means (default: 6)")
    syn.add_argument("--output", required=True, help="directory (or URI) of the shards to create")
    syn.add_argument("--no-ray", action="store_true", help="generate the shards in this process")
    add_ray_arguments(syn)
    syn.add_argument("--overwrite", action="store_true", help="replace a non-empty output")
    syn.set_defaults(func=run_synth)


def _scale(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    # The vectors are float32: a factor outside its normal range makes them all Inf or all 0.
    if not (math.isfinite(v) and _FLOAT32_TINY <= abs(v) <= _FLOAT32_MAX):
        raise argparse.ArgumentTypeError(
            f"must be a finite, non-zero number of magnitude {_FLOAT32_TINY:g} to {_FLOAT32_MAX:g}, got {value!r}"
        )
    return v


def _write_failure(output: str, exc: OSError) -> OSError:
    """A failed write of ``output`` as the error to report: an unwritable output is named as such."""
    from pipeline.storage import OutputLocationError

    if isinstance(exc, (FileExistsError, OutputLocationError)):
        return exc
    return OutputLocationError(f"cannot write {output!r}: {exc}")


def run_import(args: argparse.Namespace) -> int:
    import numpy as np

    from pipeline.shards import load_csv, load_npy, write_array_shards
    from pipeline.storage import check_disjoint

    src = args.source
    if not os.path.exists(src):
        return IMPORT_REPORT.error(f"{src} does not exist", EXIT_NOT_FOUND)
    ext = os.path.splitext(src)[1].lower()
    try:
        check_disjoint(src, args.output, ("source", "--output"))
        if ext in (".npy", ".npz"):
            if args.label_col or args.id_col:
                raise ValueError("--label-col/--id-col apply to .csv input; use --y-key for .npz labels")
            X, y = load_npy(src, args.x_key, args.y_key)
            ids = None
        elif ext == ".csv":
            if args.x_key or args.y_key:
                raise ValueError("--x-key/--y-key apply to .npz input; use --label-col for .csv labels")
            X, y, ids = load_csv(src, args.label_col, args.id_col)
        else:
            raise ValueError(f"source must end in .npy, .npz or .csv, got {src!r}")
        if args.scale is not None:
            X = np.asarray(X, dtype=np.float32) * np.float32(args.scale)
    except (TypeError, ValueError) as exc:  # InvalidInputError (exit 3) among them
        return IMPORT_REPORT.refuse(exc)
    try:
        shards = write_array_shards(args.output, X, y, ids, args.shard_rows, overwrite=args.overwrite)
    except (TypeError, ValueError) as exc:
        return IMPORT_REPORT.refuse(exc)
    except OSError as exc:
        return IMPORT_REPORT.fail(_write_failure(args.output, exc))
    rows = sum(s["rows"] for s in shards)
    sys.stdout.write(json.dumps({"output": args.output, "rows": rows, "shards": len(shards),
                                 "labels": y is not None}) + "\n")
    return EXIT_OK


def run_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import SynthConfig, write_synth

    try:
        config = SynthConfig(n=args.n, dim=args.dim, centers=args.centers, seed=args.seed,
                             shard_rows=args.shard_rows, spread=args.spread)
    except (ValueError, TypeError) as exc:
        return SYNTH_REPORT.refuse(exc)
    with ray_session(args) as session:
        if not args.no_ray:
            session.start()
        try:
            info = write_synth(config, args.output, use_ray=not args.no_ray, overwrite=args.overwrite)
        except OSError as exc:
            return SYNTH_REPORT.fail(_write_failure(args.output, exc))
    sys.stdout.write(json.dumps({"output": args.output, "rows": config.n, "shards": len(info["shards"])}) + "\n")
    return EXIT_OK

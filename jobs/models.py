"""``ptsne models list`` and ``ptsne models show NAME``: what the model registry holds.

Exit codes: 0 ok; 4 unknown model (the message lists the registered ones).
"""

from __future__ import annotations

import json
import logging
import sys

from jobs.cli import EXIT_OK, EXIT_USAGE, Report

log = logging.getLogger(__name__)

REPORT = Report("models show")

#: Metrics shown first in ``models show`` (others follow alphabetically).
KEY_METRICS = ("knn_accuracy", "trustworthiness", "knn_recall", "kl_divergence")
#: At most this many metric columns in the text table (``--json`` has them all).
MAX_METRIC_COLUMNS = 6


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list registered models and their versions")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    ls = sub.add_parser("list", help="registered models with their latest version and aliases")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run_list)
    show = sub.add_parser("show", help="versions, aliases, source run, reference size and metrics of one model")
    show.add_argument("name", help="registered model name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines) + "\n"


def run_list(args) -> int:
    from jobs import registry
    from jobs.tracking import configure_mlflow

    location = configure_mlflow(experiment=None)
    models = registry.list_models()
    if args.json:
        sys.stdout.write(json.dumps(models, indent=2) + "\n")
        return EXIT_OK
    if not models:
        sys.stdout.write(f"no registered models in {location.registry_uri}\n")
        return EXIT_OK
    rows = [
        [
            m["name"],
            m["latest_version"],
            m["n_versions"],
            ", ".join(f"@{a}->{v}" for a, v in sorted(m["aliases"].items())) or "-",
            m["updated"] or "-",
        ]
        for m in models
    ]
    sys.stdout.write(_table(rows, ["NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED"]))
    return EXIT_OK


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _reference_cells(version: dict) -> list[str]:
    """``REF_POINTS`` and ``REF_MB`` of a version: ``0`` for a network-only model, ``-`` unknown."""
    size, nbytes = version.get("reference_points"), version.get("reference_bytes")
    return [
        "-" if size is None else str(size),
        "-" if nbytes is None else (f"{nbytes / 1e6:.3g}" if nbytes else "0"),
    ]


def run_show(args) -> int:
    from jobs import registry
    from jobs.tracking import configure_mlflow

    configure_mlflow(experiment=None)
    try:
        info = registry.describe_model(args.name)
    except registry.ModelNotFoundError as exc:
        return REPORT.fail(exc)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return EXIT_OK
    out = [f"model {info['name']}" + (f": {info['description']}" if info["description"] else "") + "\n"]
    aliases = ", ".join(f"@{a} -> version {v}" for a, v in sorted(info["aliases"].items())) or "none"
    out.append(f"aliases: {aliases}\n\n")
    names = sorted({k for v in info["versions"] for k in v["metrics"]})
    metric_cols = [m for m in KEY_METRICS if m in names] + [m for m in names if m not in KEY_METRICS]
    metric_cols = metric_cols[:MAX_METRIC_COLUMNS]
    rows = []
    for v in info["versions"]:
        rows.append(
            [
                v["version"],
                ",".join(v["aliases"]) or "-",
                v["status"],
                v["created"] or "-",
                v["run_id"] or "-",
                *_reference_cells(v),
                *[_fmt(v["metrics"][m]) if m in v["metrics"] else "-" for m in metric_cols],
            ]
        )
    header = ["VERSION", "ALIASES", "STATUS", "CREATED", "SOURCE RUN", "REF_POINTS", "REF_MB", *metric_cols]
    out.append(_table(rows, header))
    sys.stdout.write("".join(out))
    return EXIT_OK

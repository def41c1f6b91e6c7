"""``ptsne embed``: apply a registered mapper to new Parquet shards, each exactly once.

Examples
--------
One pass (cron-friendly; a rerun embeds only new or changed shards)::

    ptsne embed --model models:/mnist-map@prod --input data/incoming --output data/maps

Keep polling, and follow the alias (re-embedding everything when it moves)::

    ptsne embed --model models:/mnist-map@prod --input ... --output ... --watch --interval 60 --reembed

Input and output are local paths or URIs of any pyarrow filesystem (``s3://...``); Ray workers
read the input and write the output shards themselves, so on a cluster of several machines a
local ``--output`` must be a filesystem shared by every node.

Exit codes: 0 done (also when there is nothing new to embed, and ``--watch`` stopped by
SIGTERM or Ctrl-C: finished shards are kept); 1 an output that cannot be
written or is locked by another run, or an unexpected error;
2 usage (bad URI, an input and an output of which one contains the other, output held by
another model, or by another model's weights under the same name and version, without
``--reembed``; a damaged ``_current.json`` in an output of several version directories
without ``--reembed``; ``--method refine`` for a network-only model);
3 bad input (schema, dimension, NaN/Inf rows, duplicate ids with ``--on-duplicate-ids error``);
4 model, alias, version or input not found, or a model that cannot be used (a missing or corrupt
file, a sha256 mismatch; the message names the file).
The output is checked (and against the input), the model resolved, downloaded and checked, the
lock taken and the input listed before Ray starts; Ray starts only when some shard has rows to embed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from jobs.cli import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, Report, add_ray_arguments, exit_code, ray_session

log = logging.getLogger(__name__)

REPORT = Report("embed", output="--output")


def _columns(value: str) -> tuple[str, ...]:
    cols = tuple(c.strip() for c in value.split(",") if c.strip())
    if not cols:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {value!r}")
    return cols


def _positive_float(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return v


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed new Parquet shards with a registered model (exactly once per shard)",
        description=__doc__.split("Examples")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, NAME/VERSION, runs:/RUN_ID/PATH or a local model dir")
    p.add_argument("--input", required=True, help="Parquet file or directory (local path or URI such as s3://...)")
    p.add_argument("--output", required=True,
                   help="output location: a local path (on a cluster of several machines: a filesystem every node "
                        "shares) or a URI such as s3://...; it may not contain --input or lie inside it")
    cols = p.add_mutually_exclusive_group()
    cols.add_argument("--vector-col", help="list column holding the vectors (default: 'vector')")
    cols.add_argument("--feature-cols", type=_columns, help="comma-separated numeric columns forming the vector")
    p.add_argument("--id-col", default="id", help="id column copied to the output (default: id)")
    p.add_argument("--passthrough", type=_columns, default=(), help="comma-separated input columns to copy to the output")
    p.add_argument("--on-invalid", choices=("error", "reject"), default="error",
                   help="rows with NaN/Inf/null vectors or the wrong length: fail their shard (default) "
                        "or write them to _rejects/ and embed the rest")
    from pipeline.embed import ON_DUPLICATE_IDS, EmbedConfig

    p.add_argument("--on-duplicate-ids", choices=ON_DUPLICATE_IDS, default=EmbedConfig.on_duplicate_ids,
                   help="ids that occur more than once in a shard: 'warn' embeds them with a warning giving "
                        "the count, 'error' fails their shard (exit 3) (default: "
                        f"{EmbedConfig.on_duplicate_ids}). Ids of different shards are not compared")
    p.add_argument("--reembed", action="store_true",
                   help="embed all shards with the version the model URI names now, into OUTPUT/v<version>/ "
                        "(default: stay on the version of the current output)")
    from ptsne.configs import PLACEMENT_METHODS as METHODS

    p.add_argument("--method", choices=METHODS, default="auto",
                   help="how points are placed: 'network' is the network's forward pass; 'refine' places "
                        "each point on the model's reference map (t-SNE quality, slower; needs a model "
                        "trained with a reference); 'auto' refines when the model has a reference "
                        "(default: auto). One output holds one method's map")
    p.add_argument("--watch", action="store_true", help="keep polling the input for new shards")
    p.add_argument("--interval", type=_positive_float, default=60.0, help="seconds between polls (default 60)")
    p.add_argument("--max-polls", type=int, default=None, help="with --watch: stop after this many polls")
    # Defaults as in pipeline.embed.EmbedConfig (a test checks), chosen with benchmarks/embed_throughput.py.
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per model call (default 16384 on CPU actors, 131072 on GPU actors)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="model actors, each embedding one shard at a time (default: one per GPU, or one per "
                        "--cpus-per-actor CPUs of the cluster)")
    p.add_argument("--cpus-per-actor", type=_positive_float, default=1.0, help="CPUs (torch threads) per actor")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="default 0.25 (four actors per GPU) when the cluster has GPUs and the method is 'network'; "
                        "0 for 'refine', whose placement runs on CPU (one actor per CPU)")
    # Accepted so that existing command lines keep working; each input shard is one task now.
    p.add_argument("--block-mb", type=_positive_float, default=None, help=argparse.SUPPRESS)
    add_ray_arguments(p, old_address=True)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class _Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stop()


#: Name prefix of the model download directories in the system temp directory.
TEMP_PREFIX = "ptsne-embed-"


def _missing_model_dir(uri: str) -> bool:
    """True for a ``--model`` that is no registry URI but a local path that does not exist."""
    from jobs import registry

    try:
        registry.parse_model_uri(uri)
        return False
    except ValueError:
        pass
    path = os.path.expanduser(str(uri).strip())
    if not path or "://" in path or path.startswith(("models:", "runs:")):
        return False
    # Only an explicit path: "a/b/c" stays a malformed NAME/VERSION (bad usage).
    return path.startswith((".", "~", os.sep)) and not os.path.exists(path)


class _ModelCache:
    """Downloads and checks each resolved version once per process.

    The check is a full ``ParametricTSNE.load`` in the driver (sha256 sums, config,
    weight shapes against ``n_features_in``, finite values), so a broken model is
    reported naming its file before any Ray actor tries to load it.
    """

    def __init__(self):
        from jobs import tempdirs

        self.tmp = tempdirs.make(TEMP_PREFIX)
        self.paths: dict[str, str] = {}

    def spec(self, ref, tag: str | None = None):
        """The :class:`pipeline.embed.ModelSpec` of ``ref`` (downloaded and checked once), written to
        directory ``tag`` (default ``ref.tag``)."""
        from jobs import registry
        from pipeline.embed import ModelSpec

        if ref.uri not in self.paths:
            from ptsne.errors import ModelFileError
            from ptsne.estimator import ParametricTSNE

            dst = os.path.join(self.tmp.name, str(len(self.paths)))
            try:
                path = registry.download(ref, dst)
                ParametricTSNE.load(path, device="cpu")
            except ModelFileError as exc:
                where = "" if ref.version == "local" else f" (model {ref.uri})"
                raise type(exc)(exc.file, exc.problem + where) from None
            self.paths[ref.uri] = str(path)
        return ModelSpec(path=self.paths[ref.uri], name=ref.name, version=ref.version, tag=tag or ref.tag)


def _choose(args, out_current):
    """The version to apply: the one the URI names now, or (without --reembed) the current output's."""
    from jobs import registry

    ref = registry.lookup(args.model)
    if args.reembed or out_current is None:
        return ref
    if out_current.get("model_name") != ref.name:
        raise _UsageError(
            f"{args.output} holds embeddings of model {out_current.get('model_name')!r} "
            f"version {out_current.get('model_version')}, not of {ref.name!r}; pass --reembed to "
            f"embed everything with {ref.name!r} version {ref.version} into {ref.tag}/, "
            "or use another --output"
        )
    if out_current.get("model_version") != ref.version:
        log.warning(
            "%s now names %s version %s, but the current output %s/ holds version %s: new shards get "
            "version %s too, so the output stays one map. Run with --reembed to re-embed every shard "
            "with version %s.",
            args.model, ref.name, ref.version, out_current.get("dir"), out_current.get("model_version"),
            out_current.get("model_version"), ref.version,
        )
        if ref.is_registered:
            return registry.lookup(f"models:/{ref.name}/{out_current['model_version']}")
        if ref.run_id:
            return registry.lookup(f"runs:/{out_current['model_version']}/{ref.name}")
    return ref


class _UsageError(ValueError):
    """An output or a model that cannot be used as asked (exit 2)."""


def _resolve(args, cache):
    """The model to apply and its output directory: the version :func:`_choose` picks, checked by content.

    Without ``--reembed`` the current output's directory is kept, and a model
    with the current output's name and version but other weights (two local
    directories both named ``model``) is refused. A pointer written before the
    weights' sha256 was recorded holds name and version alone; the directory's
    ledger lines are then checked by content (``pipeline.embed._check_unrecorded``).
    A damaged pointer is set aside and rebuilt first (:func:`pipeline.embed.repair_current`).
    """
    from pipeline.embed import repair_current

    current = repair_current(args.output, reembed=args.reembed)
    ref = _choose(args, current)
    spec = cache.spec(ref)
    if args.reembed or current is None or (current.get("model_name"), current.get("model_version")) != \
            (spec.name, spec.version):
        return spec
    recorded = current.get("model_sha256")
    if recorded is not None and recorded != spec.sha256:
        raise _UsageError(
            f"{args.output} holds embeddings of {spec.name} version {spec.version} whose weights have sha256 "
            f"{recorded[:12]}, and --model {args.model} is another model of that name and version (weights "
            f"sha256 {spec.sha256[:12]}); pass --reembed to embed everything with it into {spec.tag}/, "
            "or use another --output"
        )
    return cache.spec(ref, tag=current["dir"])


def _check_model(args, cache) -> None:
    """Resolve, download and check the model before Ray starts; refuse ``--method refine``
    for a network-only model.

    A model that is broken (:class:`ptsne.errors.ModelFileError`) or cannot be
    refined on is always reported here. Other problems (not found yet, an output held
    by another model) are reported here without ``--watch``; with it, they are left to
    the poll loop, which reports and retries them.
    """
    from ptsne.errors import ModelFileError

    try:
        spec = _resolve(args, cache)
    except ModelFileError:
        raise
    except Exception:
        if not args.watch:
            raise
        log.debug("model check: the model could not be resolved yet", exc_info=True)
        return
    if args.method == "refine" and not spec.has_reference:
        raise _UsageError(
            f"--method refine needs a model with a reference; {spec.name} version {spec.version} is "
            "network-only (trained with --reference-size 0): use --method network or --method auto"
        )


def _once(args, cache, config, start_ray):
    from pipeline.embed import embed_shards

    return embed_shards(args.input, args.output, _resolve(args, cache), config, start_ray=start_ray)


def _report(args, summary) -> None:
    if args.json:
        sys.stdout.write(json.dumps(summary.as_dict(), sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"ptsne embed: {summary.line()}\n")
    sys.stdout.flush()


def run(args) -> int:
    """Entry point of ``ptsne embed``; returns an exit code."""
    from jobs import registry, tempdirs
    from jobs.tracking import configure_mlflow
    from pipeline.embed import EmbedConfig, check_output
    from pipeline.storage import check_disjoint

    tempdirs.remove_stale(TEMP_PREFIX)  # model copies of runs killed with SIGKILL
    if _missing_model_dir(args.model):
        return REPORT.error(f"--model {args.model!r}: no such model directory", EXIT_NOT_FOUND)
    try:
        config = EmbedConfig(
            vector_col=args.vector_col,
            feature_cols=args.feature_cols,
            id_col=args.id_col,
            passthrough=args.passthrough,
            on_invalid=args.on_invalid,
            on_duplicate_ids=args.on_duplicate_ids,
            batch_size=args.batch_size,
            num_actors=args.num_actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            progress=not args.no_progress,
            method=args.method,
        )
        if args.max_polls is not None and args.max_polls < 1:
            raise ValueError(f"--max-polls must be >= 1, got {args.max_polls}")
        registry.parse_model_uri(args.model)
        # An output inside the input is read back as input; an input inside the output is taken for output.
        check_disjoint(args.input, args.output, names=("--input", "--output"))
        check_output(args.output)
    except (ValueError, TypeError) as exc:
        return REPORT.refuse(exc)
    except OSError as exc:  # not a directory, no permission, an unreachable store: refused before any work
        return REPORT.error(f"--output: {exc}", EXIT_ERROR)
    if args.block_mb is not None:
        log.warning("--block-mb has no effect (each input shard is one task); ignored")
    if registry.parse_model_uri(args.model)[0] != "dir":
        configure_mlflow(experiment=None)
    # SIGTERM (cron timeouts, systemd, Kubernetes, `ray job stop`) ends a poll loop cleanly; only the
    # main thread may set it. ray.init installs a handler of its own (sys.exit, then an abort while Ray's
    # threads are torn down), so ours is installed again once Ray is up.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    cache = _ModelCache()
    polls = 0
    # Ray starts only when a poll has rows to embed, and stops at the end if it started here.
    session = ray_session(args, logging_level=logging.WARNING, log_to_driver=False)

    def start_ray() -> None:
        session.start()
        if main_thread:
            signal.signal(signal.SIGTERM, _on_sigterm)

    try:
        try:
            _check_model(args, cache)
        except Exception as exc:
            if exit_code(exc) is None:
                raise
            return REPORT.fail(exc)
        while True:
            polls += 1
            try:
                summary = _once(args, cache, config, start_ray)
                _report(args, summary)
                code = EXIT_OK
            except Exception as exc:
                if exit_code(exc) is None:
                    raise
                code = REPORT.fail(exc)
                if code == EXIT_BAD_INPUT and getattr(exc, "summary", None) is not None:
                    _report(args, exc.summary)
            if not args.watch or (args.max_polls is not None and polls >= args.max_polls):
                return code
            if code != EXIT_OK:
                log.warning("poll %d failed (exit code %d); retrying in %g s", polls, code, args.interval)
            time.sleep(args.interval)
    except (KeyboardInterrupt, _Stop):
        log.warning("stopped; finished shards are in the ledger, a rerun resumes the rest")
        return EXIT_OK if args.watch else EXIT_ERROR
    except RuntimeError as exc:  # a shard that failed in its actor: the message names it
        return REPORT.fail(exc, EXIT_ERROR)
    except Exception as exc:
        return REPORT.fail(exc)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        cache.tmp.cleanup()
        session.close()

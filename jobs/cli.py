"""The ``ptsne`` command line: one subcommand per job module, and what every subcommand shares.

Each job module exposes ``add_parser(subparsers)`` (which registers its
subcommand and sets ``func`` on the parsed arguments) and is imported only when
the command line is built, so ``ptsne --help`` stays fast.

Shared by every subcommand, so that they cannot drift apart:

- the exit codes (``EXIT_*``) and :data:`EXIT_CODES`, the README's "Exit codes"
  table as exception classes; :func:`exit_code` looks a failure up in it;
- :class:`Report`: the one way a command reports a failure (one ``log.error``
  line ``ptsne COMMAND: message`` for an expected failure, the traceback for an
  unexpected one) and picks its exit code;
- :func:`add_ray_arguments` and :func:`ray_session`: the same Ray options
  (``--ray-address``, ``--num-cpus``) and the same Ray session
  (:class:`pipeline.session.RaySession`) in every command that uses Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

from jobs.config import CommandParser

#: Job modules that provide subcommands, in the order of ``ptsne --help``.
JOB_MODULES = (
    "jobs.quickstart",
    "jobs.data",
    "jobs.affinities",
    "jobs.train",
    "jobs.embed",
    "jobs.models",
)

log = logging.getLogger(__name__)

#: Exit codes shared by every subcommand (the README's "Exit codes" table).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_NOT_FOUND = 4

#: Expected failures and their exit codes, as ``("module:Class", code)``; the first row
#: whose class the failure is an instance of decides. Order matters: several of the
#: project's errors subclass ValueError or OSError. Any other exception is unexpected
#: (exit 1 with its traceback). Classes are named, not imported, so that the table
#: costs no import: an exception of a class whose module is not loaded cannot exist.
EXIT_CODES: tuple[tuple[str, int], ...] = (
    ("pipeline.shards:InvalidInputError", EXIT_BAD_INPUT),  # schema, dimension, NaN/Inf, duplicate ids
    ("pipeline.embed:EmbedInputError", EXIT_BAD_INPUT),
    ("ptsne.errors:ModelFileError", EXIT_NOT_FOUND),  # a model file missing, corrupt or not matching
    ("jobs.registry:ModelNotFoundError", EXIT_NOT_FOUND),  # unknown model, alias, version or run
    ("builtins:FileNotFoundError", EXIT_NOT_FOUND),  # a missing input, config file or affinity directory
    ("pipeline.storage:OutputLocationError", EXIT_ERROR),  # an output that cannot be written
    ("pipeline.storage:LockedError", EXIT_ERROR),  # an output another run is writing
    ("builtins:FileExistsError", EXIT_USAGE),  # an output holding something else
    ("builtins:ValueError", EXIT_USAGE),  # a bad value or settings that cannot work together
    ("builtins:OSError", EXIT_ERROR),  # permissions, an unreachable store
)


def _loaded_class(name: str) -> type | None:
    module, _, cls = name.partition(":")
    return getattr(sys.modules.get(module), cls, None)


def unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task raised, without Ray's wrapper (its message carries the remote traceback)."""
    task_error = _loaded_class("ray.exceptions:RayTaskError")
    cause = getattr(exc, "cause", None)
    if task_error is not None and isinstance(exc, task_error) and isinstance(cause, Exception):
        return cause
    return exc


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected failure (:data:`EXIT_CODES`); None for an unexpected one."""
    exc = unwrap(exc)
    for name, code in EXIT_CODES:
        cls = _loaded_class(name)
        if cls is not None and isinstance(exc, cls):
            return code
    return None


@dataclass(frozen=True)
class Report:
    """How one command reports its failures: ``Report("affinities", output="--output", overwrite="--overwrite")``.

    Attributes
    ----------
    command : str
        The subcommand as typed (``"data import"``); every message starts ``ptsne COMMAND:``.
    output : str, optional
        The option naming the command's output; an output that cannot be written is reported under it.
    overwrite : str, optional
        The option that replaces an output holding something else, named in that message.
    """

    command: str
    output: str | None = None
    overwrite: str | None = None

    def error(self, message: str, code: int) -> int:
        """Report ``message`` in one line; returns ``code``."""
        log.error("ptsne %s: %s", self.command, message)
        return code

    def fail(self, exc: BaseException, code: int | None = None) -> int:
        """Report ``exc`` and return its exit code: ``code`` if given, else :func:`exit_code`'s.

        An expected failure is one line naming what is at fault; an unexpected one
        (no code in :data:`EXIT_CODES`) is logged with its traceback and exits 1.
        """
        exc = unwrap(exc)
        code = exit_code(exc) if code is None else code
        if code is None:
            log.error("ptsne %s failed", self.command, exc_info=exc)
            return EXIT_ERROR
        message = str(exc)
        location_error = _loaded_class("pipeline.storage:OutputLocationError")
        if self.output and location_error is not None and isinstance(exc, location_error):
            message = f"{self.output}: {message}"
        elif self.overwrite and isinstance(exc, FileExistsError):
            message = f"{message} ({self.overwrite} replaces it)"
        return self.error(message, code)

    def refuse(self, exc: Exception) -> int:
        """Report a failure found while checking the settings, before any work: its code in
        :data:`EXIT_CODES` (a missing input: 4), else bad usage (a TypeError too)."""
        code = exit_code(exc)
        return self.fail(exc, EXIT_USAGE if code is None else code)


def add_ray_arguments(parser, *, old_address: bool = False) -> None:
    """``--ray-address`` and ``--num-cpus``, the same in every command that uses Ray.

    ``old_address`` keeps ``--address``, the old spelling of ``ptsne embed``, as a hidden alias.
    """
    parser.add_argument("--ray-address", dest="ray_address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    if old_address:
        parser.add_argument("--address", dest="ray_address", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started by this command "
                        "(default: all)")


def ray_session(args: argparse.Namespace, **init_kwargs):
    """The :class:`pipeline.session.RaySession` of a command's ``--ray-address`` and ``--num-cpus``."""
    from pipeline.session import RaySession

    return RaySession(getattr(args, "ray_address", None), getattr(args, "num_cpus", None), **init_kwargs)


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(
        level=max(logging.DEBUG, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptsne", description="Distributed parametric t-SNE: train, register and apply 2-D/3-D maps."
    )
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name in JOB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a job module not present in this build
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    configure_logging(0 if args.quiet else args.verbose)
    return int(args.func(args) or EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())

"""The ``ptsne`` command line: one subcommand per job module.

Each job module exposes ``add_parser(subparsers)`` (which registers its
subcommand and sets ``func`` on the parsed arguments) and is imported only when
the command line is built, so ``ptsne --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

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

#: Exit codes shared by every subcommand (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_NOT_FOUND = 4


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

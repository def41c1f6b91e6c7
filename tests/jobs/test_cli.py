"""The layer every ``ptsne`` command shares (jobs/cli.py): exit codes, error reports, Ray options."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import registry
from jobs.cli import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    Report,
    build_parser,
    exit_code,
)
from pipeline.embed import EmbedInputError
from pipeline.session import RaySession
from pipeline.shards import InvalidInputError
from pipeline.storage import LockedError, OutputLocationError
from ptsne.errors import DigestMismatchError, ModelFileError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "exc, code",
    [
        (InvalidInputError("a.parquet: 2 rows with NaN"), EXIT_BAD_INPUT),
        (EmbedInputError("dimension 6, the model expects 8"), EXIT_BAD_INPUT),
        (ModelFileError("model.safetensors", "truncated"), EXIT_NOT_FOUND),
        (DigestMismatchError("model.safetensors", "sha256 differs"), EXIT_NOT_FOUND),
        (registry.ModelNotFoundError("unknown model 'x'"), EXIT_NOT_FOUND),
        (FileNotFoundError("no such input"), EXIT_NOT_FOUND),
        (OutputLocationError("'/f' is not a directory"), EXIT_ERROR),
        (LockedError("another run is writing"), EXIT_ERROR),
        (FileExistsError("the output holds other files"), EXIT_USAGE),
        (ValueError("--perplexity must be > 0"), EXIT_USAGE),
        (PermissionError("permission denied"), EXIT_ERROR),
        (RuntimeError("a bug"), None),
        (TypeError("a bug"), None),
        (KeyError("a bug"), None),
    ],
)
def test_exit_code_follows_the_readme_table(exc, code):
    assert exit_code(exc) == code


def test_report_is_one_line_naming_the_option(caplog):
    report = Report("affinities", output="--output", overwrite="--overwrite")
    with caplog.at_level(logging.ERROR):
        assert report.fail(OutputLocationError("'/f' is not a directory")) == EXIT_ERROR
        assert report.fail(FileExistsError("'/o' holds other files")) == EXIT_USAGE
        assert report.refuse(TypeError("perplexity must be a number")) == EXIT_USAGE
        assert report.refuse(FileNotFoundError("no such input 'x'")) == EXIT_NOT_FOUND
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "ptsne affinities: --output: '/f' is not a directory",
        "ptsne affinities: '/o' holds other files (--overwrite replaces it)",
        "ptsne affinities: perplexity must be a number",
        "ptsne affinities: no such input 'x'",
    ]
    assert all(r.exc_info is None for r in caplog.records)


def test_unexpected_failure_is_exit_1_with_its_traceback(caplog):
    with caplog.at_level(logging.ERROR):
        try:
            raise KeyError("vector")
        except KeyError as exc:
            assert Report("train").fail(exc) == EXIT_ERROR
    (record,) = caplog.records
    assert record.getMessage() == "ptsne train failed" and record.exc_info is not None


def test_every_ray_command_has_the_same_ray_options():
    parser = build_parser()
    commands = {
        "affinities": ["affinities", "--input", "i", "--output", "o"],
        "data synth": ["data", "synth", "--n", "5", "--dim", "2", "--output", "o"],
        "train": ["train", "--input", "i"],
        "embed": ["embed", "--model", "m@a", "--input", "i", "--output", "o"],
    }
    for name, argv in commands.items():
        args = parser.parse_args([*argv, "--ray-address", "10.0.0.6:6379", "--num-cpus", "3"])
        assert (args.ray_address, args.num_cpus) == ("10.0.0.6:6379", 3), name
    # The old spelling of `ptsne embed` stays accepted, unlisted.
    old = parser.parse_args([*commands["embed"], "--address", "10.0.0.7:6379"])
    assert old.ray_address == "10.0.0.7:6379"


def test_a_ray_session_that_starts_nothing_touches_nothing():
    with RaySession(num_cpus=1) as session:
        assert session.init_kwargs == {"log_to_driver": False, "include_dashboard": False}
    assert RaySession("10.0.0.6:6379", log_to_driver=False).init_kwargs == {"log_to_driver": False}


#: Libraries that building the command line must not load: each costs seconds to import.
HEAVY_MODULES = ("torch", "faiss", "ray", "mlflow")


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """``()`` for ``ptsne`` itself, then every command and subcommand: ``("data", "synth")``, ..."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _command_paths(sub, (*prefix, name))


@pytest.mark.parametrize("command", list(_command_paths(build_parser())), ids=lambda c: " ".join(("ptsne", *c)))
def test_help_loads_neither_torch_faiss_ray_nor_mlflow(command):
    # The modules loaded once the parser is built and has printed the help (argparse exits then).
    code = (
        "import sys\n"
        "from jobs.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        f"    sys.stderr.write('loaded: ' + ' '.join(m for m in {HEAVY_MODULES!r} if m in sys.modules) + '\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {' '.join(('ptsne', *command))}"), proc.stdout[:200]
    assert proc.stderr.splitlines()[-1] == "loaded: ", proc.stderr[-2000:]

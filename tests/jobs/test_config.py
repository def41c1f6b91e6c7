"""``jobs.config``: a config file fills exactly the options that the command line does not give.

The parser is the real one of ``ptsne train`` (``jobs.train.add_parser``), under
subcommands of :class:`jobs.config.CommandParser`; the settings come from real
files in ``tmp_path`` and reach the arguments through ``jobs.train.resolve_args``.
"""

from __future__ import annotations

import argparse

import pytest

from jobs.config import CommandParser, apply_config, given_options, load_config_file
from jobs.train import DEFAULT_WORKDIR, add_parser, add_train_arguments, resolve_args
from ptsne.model import DEFAULT_HIDDEN
from ptsne.train import TrainConfig

LEARNING_RATE = TrainConfig().learning_rate
HIDDEN = ",".join(str(width) for width in DEFAULT_HIDDEN)

#: (command-line strings, file line, destination, value when given, value from the file).
#: Most command-line values equal the option's default: they must win all the same.
CASES = {
    "int equal to the default": (["--seed", "0"], "seed = 5", "seed", 0, 5),
    "int as --opt=value": (["--seed=0"], "seed = 5", "seed", 0, 5),
    "int abbreviated": (["--see", "0"], "seed = 5", "seed", 0, 5),
    "float": (["--learning-rate", str(LEARNING_RATE)], "learning-rate = 0.5", "learning_rate", LEARNING_RATE, 0.5),
    "choice": (["--precision", "auto"], 'precision = "float32"', "precision", "auto", "float32"),
    "store_true over false": (["--fresh"], "fresh = false", "fresh", True, False),
    "store_true over true": (["--drop-invalid"], "drop-invalid = true", "drop_invalid", True, True),
    "nargs='+' list": (["--perplexity", "30"], "perplexity = [10, 20]", "perplexity", [30.0], [10.0, 20.0]),
    "type converter": (["--hidden-layers", HIDDEN], "hidden-layers = [64, 32]", "hidden_layers", DEFAULT_HIDDEN,
                       (64, 32)),
    "epochs auto": (["--epochs", "auto"], "epochs = 7", "epochs", "auto", 7),
    "n-neighbors auto": (["--n-neighbors", "auto"], "n_neighbors = 45", "n_neighbors", "auto", 45),
    "string default": (["--workdir", DEFAULT_WORKDIR], 'workdir = "elsewhere"', "workdir", DEFAULT_WORKDIR,
                       "elsewhere"),
    "dest differs from the option": (["--pca", "20"], "pca_components = 5", "pca_components", 20, 5),
    "option alias on the command line": (["--name", "m"], 'register = "other"', "register", "m", "other"),
    "option alias in the file": (["--register", "m"], 'name = "other"', "register", "m", "other"),
}


@pytest.fixture(scope="module")
def ptsne_parser() -> argparse.ArgumentParser:
    """``ptsne`` with only its ``train`` subcommand, built by the job module itself."""
    top = argparse.ArgumentParser(prog="ptsne")
    add_parser(top.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser))
    return top


def _train(parser, tmp_path, text: str, *argv: str, suffix: str = "toml", before: bool = False):
    """``ptsne train --input data --config FILE ARGV`` (ARGV before ``--config`` when ``before``), resolved."""
    path = tmp_path / f"train.{suffix}"
    path.write_text(text + "\n")
    config = ["--config", str(path)]
    line = ["train", "--input", "data", *argv, *config] if before else ["train", "--input", "data", *config, *argv]
    return resolve_args(parser.parse_args(line))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_command_line_wins_whenever_given(ptsne_parser, tmp_path, case):
    argv, line, dest, given, _ = case
    assert getattr(_train(ptsne_parser, tmp_path, line, *argv), dest) == given
    assert getattr(_train(ptsne_parser, tmp_path, line, *argv, before=True), dest) == given


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_file_value_used_when_option_not_given(ptsne_parser, tmp_path, case):
    _, line, dest, _, from_file = case
    assert getattr(_train(ptsne_parser, tmp_path, line), dest) == from_file


def test_store_true_from_the_file(ptsne_parser, tmp_path):
    assert _train(ptsne_parser, tmp_path, "fresh = true").fresh is True
    assert _train(ptsne_parser, tmp_path, "fresh = false").fresh is False
    assert _train(ptsne_parser, tmp_path, "fresh = false", "--fresh").fresh is True


def test_given_and_file_settings_combine(ptsne_parser, tmp_path):
    args = _train(ptsne_parser, tmp_path, "seed = 5\nepochs = 7\nworkers = 4\nfresh = true", "--seed", "0",
                  "--workers", "1")
    assert (args.seed, args.epochs, args.workers, args.fresh) == (0, 7, 1, True)


@pytest.mark.parametrize("suffix, text", [
    ("toml", "seed = 5\n[train]\nepochs = 7\nfresh = false"),
    ("yaml", "seed: 5\ntrain:\n  epochs: 7\n  fresh: false"),
])
def test_train_table_or_top_level_in_toml_and_yaml(ptsne_parser, tmp_path, suffix, text):
    args = _train(ptsne_parser, tmp_path, text, "--seed", "0", "--fresh", suffix=suffix)
    assert (args.seed, args.epochs, args.fresh) == (0, 7, True)
    args = _train(ptsne_parser, tmp_path, text, suffix=suffix)
    assert (args.seed, args.epochs, args.fresh) == (5, 7, False)


def test_given_options_names_every_given_destination(ptsne_parser):
    train = ptsne_parser.parse_args(["train"])._parser
    argv = ["--seed=0", "--fresh", "--name", "m", "--perplexity", "30", "40", "--learning-r", "0.01",
            "--epochs", "auto"]
    assert given_options(train, argv) == {"seed", "fresh", "register", "perplexity", "learning_rate", "epochs"}
    assert given_options(train, []) == set()
    # The parser itself keeps its defaults.
    assert train.get_default("seed") == 0 and train.get_default("epochs") == "auto"


def test_given_options_reads_no_private_argparse_api():
    import inspect

    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--register", "--name", dest="register", default=None)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--count", type=int, default=3)
    parser.set_defaults(func=print)
    argv = ["--learning-rate=0.5", "--nam", "m", "--fr"]  # as --opt=value, abbreviated, by an alias
    args = parser.parse_args(argv)
    for dests in (None, vars(args)):
        assert given_options(parser, argv, dests) == {"learning_rate", "register", "fresh"}
    assert given_options(parser, ["--count", "3"]) == {"count"}  # the default's value, given all the same
    assert vars(parser.parse_args([])) == {"learning_rate": 0.5, "register": None, "fresh": False, "count": 3,
                                           "func": print}
    assert "._" not in inspect.getsource(given_options)


def test_explicit_argv_for_a_parser_that_records_nothing(tmp_path):
    parser = argparse.ArgumentParser(prog="train")
    add_train_arguments(parser)
    argv = ["--seed", "0", "--precision", "auto"]
    settings = {"seed": 5, "precision": "float32", "epochs": 7}
    args = apply_config(parser, parser.parse_args(argv), dict(settings), argv=argv)
    assert (args.seed, args.precision, args.epochs) == (0, "auto", 7)
    with pytest.raises(TypeError, match="argv"):
        apply_config(parser, parser.parse_args(argv), dict(settings))


def test_unknown_setting_is_refused_naming_it_and_the_known_ones(ptsne_parser, tmp_path):
    for key in ("sede", "config", "verbose"):
        with pytest.raises(ValueError, match=rf"unknown setting '{key}'; known settings: .*\bseed\b"):
            _train(ptsne_parser, tmp_path, f"{key} = 5", "--seed", "0")


def test_mistyped_setting_is_refused_naming_it(ptsne_parser, tmp_path):
    with pytest.raises(ValueError, match="'seed'"):
        _train(ptsne_parser, tmp_path, 'seed = "five"')
    with pytest.raises(ValueError, match="'fresh'"):
        _train(ptsne_parser, tmp_path, 'fresh = "yes"')
    with pytest.raises(ValueError, match="'precision'"):
        _train(ptsne_parser, tmp_path, 'precision = "float16"')


@pytest.mark.parametrize("suffix, text", [("toml", "seed = "), ("yaml", "seed: [5"), ("json", "{seed")])
def test_settings_of_a_missing_or_unreadable_file(tmp_path, suffix, text):
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / f"bad.{suffix}"
    bad.write_text(text + "\n")
    with pytest.raises(ValueError, match=rf"{bad.name}' could not be parsed"):
        load_config_file(bad)

"""``ptsne affinities``: its options derived from the declarations of ``AffinityJobConfig``."""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys

import pytest

from jobs.affinities import config_from_args
from jobs.cli import EXIT_USAGE, build_parser, main
from jobs.settings import option
from pipeline.affinity import AffinityJobConfig
from ptsne.settings import settings_of

#: The options of the affinity stage as they were written by hand before the
#: declarations: option -> (dest, default, choices, nargs, argparse action).
OPTIONS = {
    "--vector-col": ("vector_col", "vector", None, None, "store"),
    "--feature-cols": ("feature_cols", None, None, None, "store"),
    "--id-col": ("id_col", None, None, None, "store"),
    "--label-col": ("label_col", None, None, None, "store"),
    "--perplexity": ("perplexity", [30.0], None, "+", "store"),
    "--n-neighbors": ("n_neighbors", "auto", None, None, "store"),
    "--pca": ("pca_components", None, None, None, "store"),
    "--pca-samples": ("pca_samples", 100_000, None, None, "store"),
    "--knn-method": ("knn_method", "auto", ("auto", "exact", "ivf"), None, "store"),
    "--target-recall": ("target_recall", 0.95, None, None, "store"),
    "--batch-rows": ("batch_rows", 50_000, None, None, "store"),
    "--edge-partitions": ("edge_partitions", None, None, None, "store"),
    "--max-index-bytes": ("max_index_bytes", None, None, None, "store"),
    "--drop-invalid": ("drop_invalid", False, None, 0, "store_true"),
    "--device": ("device", "auto", ("auto", "cpu", "cuda"), None, "store"),
    "--task-cpus": ("task_cpus", 1, None, None, "store"),
    "--seed": ("seed", 0, None, None, "store"),
    # Added after: how many kNN searches share one GPU (does not change the result).
    "--knn-searches-per-gpu": ("knn_searches_per_gpu", 4, None, None, "store"),
}
ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true"}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _table(actions) -> dict:
    return {a.option_strings[0]: (a.dest, a.default, a.choices and tuple(a.choices), a.nargs, ACTIONS[type(a)])
            for a in actions if a.option_strings and a.option_strings[0] in OPTIONS}


def test_every_setting_is_an_option_and_every_affinity_option_a_setting():
    assert [option(f) for f in settings_of(AffinityJobConfig)] == list(OPTIONS)


@pytest.mark.parametrize("command", ["affinities", "train"])
def test_the_options_are_those_written_by_hand_before(command):
    parser = _subparser(command)
    assert _table(parser._actions) == OPTIONS
    help_text = parser.format_help()
    assert all(opt in help_text for opt in OPTIONS)
    if command == "train":
        (group,) = [g for g in parser._action_groups if g.title.startswith("kNN and affinities")]
        assert list(_table(group._group_actions)) == list(OPTIONS)


def test_values_are_parsed_as_before():
    args = build_parser().parse_args([
        "affinities", "--input", "i", "--output", "o", "--perplexity", "10", "20", "--n-neighbors", "40",
        "--pca", "5", "--feature-cols", "a, b", "--drop-invalid", "--device", "cpu"])
    assert (args.perplexity, args.n_neighbors, args.pca_components) == ([10.0, 20.0], 40, 5)
    assert (args.feature_cols, args.drop_invalid, args.device) == ("a, b", True, "cpu")
    assert build_parser().parse_args(["affinities", "--input", "i", "--output", "o",
                                      "--n-neighbors", "auto"]).n_neighbors == "auto"


def test_config_from_args_is_the_config_of_the_same_settings():
    args = build_parser().parse_args([
        "affinities", "--input", "i", "--output", "o", "--perplexity", "10", "20", "--feature-cols", "a,b",
        "--id-col", "id", "--pca", "5", "--knn-method", "ivf", "--target-recall", "0.9", "--batch-rows", "7",
        "--edge-partitions", "3", "--max-index-bytes", "1000", "--task-cpus", "2", "--seed", "4", "--overwrite"])
    assert config_from_args(args) == AffinityJobConfig(
        input="i", output="o", feature_cols=("a", "b"), id_col="id", perplexity=(10.0, 20.0), pca_components=5,
        knn_method="ivf", target_recall=0.9, batch_rows=7, edge_partitions=3, max_index_bytes=1000,
        task_cpus=2, seed=4, overwrite=True)
    defaults = config_from_args(build_parser().parse_args(["affinities", "--input", "i", "--output", "o"]))
    assert defaults == AffinityJobConfig(input="i", output="o")
    assert defaults.perplexity == 30.0 and defaults.vector_col == "vector" and defaults.feature_cols is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-rows", "0"], "AffinityJobConfig: batch_rows must be an integer >= 1, got 0"),
        (["--pca", "0"], "AffinityJobConfig: pca_components must be an integer >= 1 or None, got 0"),
        (["--n-neighbors", "0"], "AffinityJobConfig: n_neighbors must be 'auto' or an integer >= 1, got 0"),
        (["--target-recall", "1.5"], r"AffinityJobConfig: target_recall must be a finite number in \(0, 1\], got 1.5"),
        (["--perplexity", "10", "0.5"],
         r"AffinityJobConfig: perplexity must be a finite number > 1 or a non-empty list of them, got \[10.0, 0.5\]"),
    ],
)
def test_a_bad_value_is_one_line_naming_class_setting_allowed_and_value(tmp_path, caplog, argv, message):
    (tmp_path / "in").mkdir()
    with caplog.at_level(logging.ERROR):
        code = main(["affinities", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *argv])
    assert code == EXIT_USAGE
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith("ptsne affinities: ") and re.search(f"{message}$", line), line
    assert not (tmp_path / "out").exists()


def test_the_command_line_is_built_without_importing_ray():
    code = "import sys; from jobs.cli import build_parser; build_parser(); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

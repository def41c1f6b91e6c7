"""``ptsne train`` end to end: local Ray (2 CPU workers), a real MLflow SQLite store, real digits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, build_parser, main
from jobs.config import apply_config, load_config_file
from jobs.train import STAMP_FILE, resolve_args
from ptsne.estimator import WEIGHTS_FILE

TRAIN_OPTS = [
    "--vector-col", "vector", "--id-col", "id", "--label-col", "label", "--perplexity", "10",
    "--knn-method", "exact", "--epochs", "20", "--batch-size", "128", "--hidden-layers", "64,64",
    "--learning-rate", "0.003", "--workers", "2", "--seed", "1", "--reference-iter", "50",
    "--report-steps", "1",  # a report (one MLflow value of each metric) after every epoch
]


@pytest.fixture
def digit_shards(tmp_path, digits):
    from pipeline.shards import write_array_shards

    X, y = digits
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1400], order[1400:]
    write_array_shards(str(tmp_path / "train"), X[train], y[train], shard_rows=500)
    write_array_shards(str(tmp_path / "heldout"), X[test], y[test], shard_rows=500)
    return tmp_path / "train", tmp_path / "heldout", X[test]


def test_train_logs_registers_and_pyfunc_predicts_like_the_estimator(
    ray_local, mlflow_store, tmp_path, digit_shards, capsys
):
    import mlflow

    from ptsne.estimator import ParametricTSNE

    train, heldout, X_test = digit_shards
    argv = ["train", "--input", str(train), "--eval-input", str(heldout), "--workdir", str(tmp_path / "work"),
            "--experiment", "digits-test", "--register", "digits-test", "--alias", "champion", *TRAIN_OPTS]
    assert main(argv) == EXIT_OK
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("digits-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["run_id"]
    run = runs[0]
    assert run.data.params["epochs"] == "20" and run.data.params["workers"] == "2"
    assert run.data.params["n_epochs"] == run.data.params["train.n_epochs"] == "20"
    assert run.data.params["perplexity"] == "[10.0]"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(20))
    phases = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "phase")}
    assert phases[0] == 0 and phases[19] == 1
    # One value per epoch of every per-epoch metric, logged live: the driver logged them
    # while Ray Train ran, so all before the trained model was saved (after-the-fact
    # logging would come seconds later, after evaluation and the plot; the 50 ms allow
    # for the coarse clock of file times).
    saved = (Path(summary["model_dir"]) / WEIGHTS_FILE).stat().st_mtime
    history = json.loads((Path(summary["model_dir"]) / STAMP_FILE).read_text())["history"]
    for name in ("loss", "attraction", "log_z", "exaggeration", "learning_rate", "epoch_seconds", "phase"):
        values = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in values) == list(range(20)), name
        assert max(m.timestamp for m in values) / 1000 <= saved + 0.05, name
    assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx([h["loss"] for h in history])
    # Both maps' figures: the default mode (the reference map) and the network alone.
    for name in ("trustworthiness", "knn_recall", "knn_accuracy"):
        assert 0.0 <= run.data.metrics[name] <= 1.0
        assert 0.0 <= run.data.metrics[f"network_{name}"] <= 1.0
    assert run.data.metrics["trustworthiness"] != run.data.metrics["network_trustworthiness"]
    assert run.data.metrics["reference_seconds"] > 0
    assert run.data.params["reference_size"] == "250000" and run.data.params["reference_iter"] == "50"
    # Digits are easy: held-out kNN accuracy far above the 10% of chance.
    assert run.data.metrics["knn_accuracy"] > 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"embedding.png", "manifest.json", "resolved_config.json", "history.json"} <= artifacts

    pyfunc = mlflow.pyfunc.load_model("models:/digits-test@champion")
    predicted = pyfunc.predict(X_test.astype(np.float32))
    estimator = ParametricTSNE.load(summary["model_dir"])
    assert len(estimator.reference_) == 1400  # every training point
    np.testing.assert_allclose(predicted, estimator.transform(X_test), rtol=1e-5, atol=1e-5)
    assert predicted.dtype == np.float32 and predicted.shape == (len(X_test), 2)
    network = pyfunc.predict(X_test.astype(np.float32), params={"method": "network"})
    np.testing.assert_allclose(network, estimator.transform(X_test, method="network"), rtol=1e-5, atol=1e-5)
    assert not np.allclose(network, predicted, atol=1e-3)
    from jobs.registry import describe_model

    (version,) = describe_model("digits-test")["versions"]
    assert (version["reference_points"], version["reference_bytes"]) == (1400, estimator.reference_.nbytes)

    # Second run, same settings: every stage is skipped, nothing new is logged.
    assert main(argv) == EXIT_OK
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["skipped"] == ["affinities", "train", "register"]
    assert again["run_id"] == summary["run_id"]
    assert len(client.search_runs([exp.experiment_id])) == 1


def _parse(argv):
    parser = build_parser()
    return parser.parse_args(argv)


@pytest.mark.parametrize("suffix", ["toml", "yaml"])
def test_config_file_gives_the_same_settings_as_the_command_line(tmp_path, suffix):
    cli = resolve_args(_parse(["train", "--input", "data", "--workers", "2", "--perplexity", "10", "20",
                               "--hidden-layers", "64,32", "--alias", "champion", "--register", "m"]))
    path = tmp_path / f"train.{suffix}"
    if suffix == "toml":
        path.write_text('[train]\ninput = "data"\nworkers = 2\nperplexity = [10, 20]\n'
                        'hidden-layers = [64, 32]\nalias = "champion"\nregister = "m"\n')
    else:
        path.write_text("input: data\nworkers: 2\nperplexity: [10, 20]\nhidden_layers: 64,32\n"
                        "alias: champion\nregister: m\n")
    from_file = resolve_args(_parse(["train", "--config", str(path)]))
    for key, value in vars(cli).items():
        if key not in ("config", "func") and not key.startswith("_"):  # _parser, the recorded command line
            assert getattr(from_file, key) == value, key


def test_command_line_wins_over_config_file(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('input = "data"\nworkers = 4\nepochs = 7\n')
    args = resolve_args(_parse(["train", "--config", str(path), "--workers", "2"]))
    assert args.workers == 2 and args.epochs == 7


def test_config_file_rejects_unknown_and_mistyped_settings(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    bad = tmp_path / "bad.toml"
    bad.write_text("wrokers = 2\n")
    with pytest.raises(ValueError, match="wrokers"):
        apply_config(parser, parser.parse_args([]), load_config_file(bad), argv=[])
    bad.write_text('workers = "two"\n')
    with pytest.raises(ValueError, match="workers"):
        apply_config(parser, parser.parse_args([]), load_config_file(bad), argv=[])
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "x.ini").write_text("")
        load_config_file(tmp_path / "x.ini")


def test_train_exit_codes_for_bad_usage(tmp_path):
    assert main(["train", "--workdir", str(tmp_path)]) == EXIT_USAGE  # neither --input nor --affinities
    assert main(["train", "--input", "x", "--workers", "0"]) == EXIT_USAGE
    assert main(["train", "--input", "x", "--workers", "2", "--gpus-per-worker", "0.5"]) == EXIT_USAGE
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == EXIT_NOT_FOUND


@pytest.mark.slow
def test_train_from_an_affinity_directory_with_pca_and_a_config_file(ray_local, mlflow_store, tmp_path, digit_shards):
    """`ptsne affinities --pca` then `ptsne train --affinities` driven by a YAML file; one worker."""
    import mlflow

    from ptsne.estimator import ParametricTSNE

    train, heldout, X_test = digit_shards
    aff = tmp_path / "aff"
    assert main(["affinities", "--input", str(train), "--output", str(aff), "--id-col", "id",
                 "--label-col", "label", "--perplexity", "10", "--pca", "20", "--knn-method", "exact"]) == EXIT_OK
    config = tmp_path / "train.yaml"
    config.write_text(
        f"train:\n  affinities: {aff}\n  workdir: {tmp_path / 'work'}\n  epochs: 3\n  batch-size: 128\n"
        f"  hidden-layers: [32, 32]\n  workers: 1\n  experiment: pca-test\n  name: digits-pca\n  alias: prod\n"
    )
    assert main(["train", "--config", str(config)]) == EXIT_OK
    estimator = ParametricTSNE.load(tmp_path / "work" / "model")
    assert estimator.pca_ is not None and estimator.n_features_in_ == 64
    pyfunc = mlflow.pyfunc.load_model("models:/digits-pca@prod")
    np.testing.assert_allclose(pyfunc.predict(X_test.astype(np.float32)), estimator.transform(X_test),
                               rtol=1e-5, atol=1e-5)
    run = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name("pca-test").experiment_id])[0]
    assert run.data.params["workers"] == "1" and run.data.params["data.dim"] == "20"
    assert run.data.tags["eval_source"] == "training_sample"


def test_workers_sharing_a_gpu_are_refused_naming_the_values():
    from jobs.train import UsageError

    with pytest.raises(UsageError, match=r"--workers 2 --gpus-per-worker 0.5: 2 training workers .* share a GPU"):
        resolve_args(_parse(["train", "--input", "data", "--workers", "2", "--gpus-per-worker", "0.5"]))
    assert resolve_args(_parse(["train", "--input", "data", "--workers", "1", "--gpus-per-worker", "0.5"]))
    assert resolve_args(_parse(["train", "--input", "data", "--workers", "2", "--gpus-per-worker", "1"]))
    assert resolve_args(_parse(["train", "--input", "data", "--workers", "2"])).gpus_per_worker == "auto"


@pytest.mark.parametrize(("asked", "workers", "cluster_gpus", "want"), [
    ("auto", 1, 0, 0.0),  # no GPU: CPU with gloo
    ("auto", 1, 1, 1.0),  # a GPU: it trains there, with NCCL
    ("auto", 4, 8, 1.0),  # one whole GPU per worker, never a share
    ("auto", 4, 2, 0.0),  # too few for one each: CPU (with a warning) rather than ranks sharing a GPU
    (0.0, 1, 4, 0.0),  # told: as told
    (0.5, 1, 0, 0.5),
    (1.0, 2, 0, 1.0),  # an autoscaling cluster whose GPU nodes are not up yet
])
def test_train_uses_the_gpus_of_the_cluster_by_default(asked, workers, cluster_gpus, want, caplog):
    from jobs.train import training_gpus

    with caplog.at_level("WARNING", logger="jobs.train"):
        assert training_gpus(asked, workers, cluster_gpus) == want
    assert ("training on CPUs" in caplog.text) == (asked == "auto" and 0 < cluster_gpus < workers)


def _train_config(args, n):
    from jobs.train import TrainJobSpec

    return TrainJobSpec.from_args(args).train_config(n)


def test_epochs_auto_resolves_for_the_data_size():
    from ptsne.train import default_epochs

    args = resolve_args(_parse(["train", "--input", "data"]))
    assert args.epochs == "auto"
    assert _train_config(args, n=1_000_000).train.n_epochs == default_epochs(1_000_000, args.batch_size) == 10
    assert _train_config(args, n=60_000).train.n_epochs == default_epochs(60_000, args.batch_size) == 30
    assert resolve_args(_parse(["train", "--input", "data", "--epochs", "7"])).epochs == 7
    with pytest.raises(SystemExit):
        _parse(["train", "--input", "data", "--epochs", "many"])
    assert main(["train", "--input", "x", "--epochs", "0"]) == EXIT_USAGE


def test_job_spec_is_parsed_once_and_resolves_epochs_for_the_data_size(tmp_path):
    from jobs.train import TrainJobSpec, TrainSampling, TrainScaling, train_job
    from ptsne.train import default_epochs

    args = resolve_args(_parse(["train", "--input", str(tmp_path / "data"), "--workdir", str(tmp_path / "w"),
                                "--eval-input", str(tmp_path / "held"), "--feature-cols", "a, b",
                                "--workers", "2", "--register", "digits", "--alias", "champion",
                                "--plot-points", "7"]))
    spec = TrainJobSpec.from_args(args)
    for n in (1000, 60_000, 1_000_000):
        assert spec.train_config(n) == spec.config.with_settings(n_epochs=default_epochs(n, args.batch_size))
    assert spec.affinity.output == spec.locations.affinities == str(tmp_path / "w" / "affinities")
    assert spec.affinity.overwrite and spec.eval.feature_cols == ("a", "b") and spec.eval.input == args.eval_input
    assert (spec.scaling, spec.register, spec.alias) == (TrainScaling(workers=2), "digits", "champion")
    assert spec.sampling == TrainSampling(plot_points=7) and spec.eval.samples == 5000
    fixed = TrainJobSpec.from_args(resolve_args(_parse(["train", "--input", "data", "--epochs", "7"])))
    assert fixed.train_config(1_000_000).train.n_epochs == 7
    on_dir = TrainJobSpec.from_args(resolve_args(_parse(["train", "--affinities", str(tmp_path / "aff")])))
    assert on_dir.affinity is None and on_dir.locations.affinities_given
    with pytest.raises(TypeError, match="TrainJobSpec"):
        train_job(args)
    with pytest.raises(ValueError, match="--input"):  # the locations are checked with the settings
        TrainJobSpec.from_args(resolve_args(_parse(["train", "--input", str(tmp_path), "--workdir", str(tmp_path / "w")])))


def test_run_params_are_the_declared_settings_with_resolved_values(tmp_path):
    from jobs.train import TrainJobSpec, TrainSampling, TrainScaling
    from ptsne.settings import public_name, settings_of
    from ptsne.train import default_epochs

    args = resolve_args(_parse(["train", "--input", str(tmp_path / "data"), "--workdir", str(tmp_path / "w"),
                                "--perplexity", "10", "--workers", "2", "--hidden-layers", "64,32",
                                "--eval-samples", "300"]))
    spec = TrainJobSpec.from_args(args)
    config = spec.train_config(60_000)
    params = spec.params(config)
    # Every training setting by its public name, "auto" epochs resolved for the data size.
    assert {name: params[name] for name in config.settings()} == config.settings()
    assert params["n_epochs"] == params["epochs"] == default_epochs(60_000, args.batch_size)
    assert (params["hidden_layers"], params["perplexity"]) == ([64, 32], [10.0])
    for part, cls in ((spec.scaling, TrainScaling), (spec.sampling, TrainSampling)):
        for f in settings_of(cls):
            assert params[public_name(f)] == getattr(part, f.name)
    assert (params["workers"], params["eval_samples"]) == (2, 300)
    assert params["workdir"] == str(tmp_path / "w") and params["affinities"] == spec.locations.affinities
    assert not {"output", "overwrite", "max_retries", "inject_failure", "inject_failure_mode"} & set(params)
    assert json.loads(json.dumps(params)) == params
    # The names runs recorded before (the options' destinations) are all still there.
    before = set(vars(args)) - {"func", "config", "_parser", "_command_lines", "verbose", "quiet", "command"}
    assert before <= set(params), before - set(params)
    on_dir = TrainJobSpec.from_args(resolve_args(_parse(["train", "--affinities", str(tmp_path / "aff")])))
    assert on_dir.params(on_dir.config)["vector_col"] == "vector" and "pca_samples" not in on_dir.params(on_dir.config)


def test_train_choices_and_defaults_come_from_the_library():
    from pipeline.train import DEFAULT_OBJECT_STORE_MAX_BYTES, FEATURE_SOURCES, DistributedTrainConfig
    from ptsne.device import PRECISIONS
    from ptsne.model import ACTIVATIONS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {a.dest: a for a in train._actions}
    assert tuple(options["feature_source"].choices) == FEATURE_SOURCES
    assert tuple(options["precision"].choices) == PRECISIONS
    assert sorted(options["activation"].choices) == sorted(ACTIVATIONS)
    args = resolve_args(_parse(["train", "--input", "data"]))
    assert args.object_store_max_bytes == DEFAULT_OBJECT_STORE_MAX_BYTES == DistributedTrainConfig().object_store_max_bytes
    from ptsne.reference import ReferenceConfig

    assert args.reference_size == ReferenceConfig.size == DistributedTrainConfig().reference.size
    assert args.reference_iter == ReferenceConfig.n_iter == DistributedTrainConfig().reference.n_iter
    assert main(["train", "--input", "x", "--reference-size", "-1"]) == EXIT_USAGE
    with pytest.raises(SystemExit) as exc:
        main(["train", "--input", "data", "--feature-source", "disk"])
    assert exc.value.code == EXIT_USAGE


def test_every_training_setting_is_an_option_that_reaches_the_config():
    # The options are derived from the settings' declarations: each one, its old spelling kept.
    from pipeline.train import DistributedTrainConfig

    argv = ["train", "--input", "data", "--epochs", "5", "--batch-size", "64", "--learning-rate", "0.5",
            "--early-exaggeration", "6", "--early-exaggeration-fraction", "0.5", "--exaggeration", "1",
            "--dof", "0.5", "--weight-decay", "0.01", "--positives-per-anchor", "2", "--seed", "3",
            "--precision", "float32", "--n-components", "3", "--hidden-layers", "8,4", "--activation", "gelu",
            "--layer-norm", "--feature-source", "scan", "--object-store-max-bytes", "7",
            "--report-seconds", "2.5", "--report-steps", "40", "--reference-size", "0", "--reference-iter", "9"]
    config = _train_config(resolve_args(_parse(argv)), n=1000)
    assert config.settings() == {
        "n_epochs": 5, "batch_size": 64, "learning_rate": 0.5, "early_exaggeration": 6.0,
        "early_exaggeration_fraction": 0.5, "exaggeration": 1.0, "dof": 0.5, "weight_decay": 0.01,
        "positives_per_anchor": 2, "seed": 3, "precision": "float32", "n_components": 3, "hidden_layers": [8, 4],
        "activation": "gelu", "layer_norm": True, "feature_source": "scan", "object_store_max_bytes": 7,
        "report_seconds": 2.5, "report_steps": 40, "reference_size": 0, "reference_iter": 9,
    }
    assert set(config.settings()) == set(DistributedTrainConfig().settings())
    defaults = _train_config(resolve_args(_parse(["train", "--input", "data"])), n=1000)
    assert defaults.with_settings(n_epochs=60) == DistributedTrainConfig()


def test_a_report_of_several_epochs_is_logged_per_epoch_of_wall_time():
    from jobs.train import _epoch_metrics

    entry = {"epoch": 39, "loss": 1.5, "attraction": 0.5, "log_z": 9.0, "exaggeration": 1.5, "learning_rate": 1e-3,
             "phase": "embedding", "seconds": 2.0, "steps": 40, "epochs": 4, "step": 120}
    assert _epoch_metrics(entry) == {"loss": 1.5, "attraction": 0.5, "log_z": 9.0, "exaggeration": 1.5,
                                     "learning_rate": 1e-3, "epoch_seconds": 0.5, "phase": 1.0,
                                     "optimizer_steps": 120.0}
    # The history of a model trained when every epoch was reported: one epoch an entry, no step count.
    old = {k: v for k, v in entry.items() if k not in ("epochs", "step", "steps")}
    assert _epoch_metrics(old)["epoch_seconds"] == 2.0 and "optimizer_steps" not in _epoch_metrics(old)


def test_train_unwritable_workdir_is_one_line_error_before_any_work(tmp_path, caplog):
    from jobs.cli import EXIT_ERROR

    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "work"  # a regular file where a directory must go
    assert main(["train", "--input", str(tmp_path / "data"), "--workdir", str(workdir), "--epochs", "1"]) == EXIT_ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--workdir" in errors[0] and "not a directory" in errors[0], errors
    assert not any(r.exc_info for r in caplog.records)


# -- one `ptsne train` per workdir -------------------------------------------------------------------

_HOLD_LEASE = r"""
import sys, time
from jobs.train import LOCK_FILE
from pipeline import storage
with storage.lock(*storage.resolve(sys.argv[1]), LOCK_FILE, what="another `ptsne train`"):
    print("held", flush=True)
    time.sleep(600)
"""


def _lock_text(path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_train_on_one_workdir_is_refused_naming_the_first(ray_local, mlflow_store, tmp_path, digit_shards,
                                                                   caplog, where, request):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from jobs.cli import EXIT_ERROR
    from jobs.train import LOCK_FILE
    from pipeline import storage

    train, _, _ = digit_shards
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    if where == "local":
        work = str(tmp_path / "work")
        argv = ["train", "--input", str(train), "--workdir", work, *TRAIN_OPTS[:-6], "--workers", "1"]
        # The first is a real `ptsne train`, holding the workdir from its start.
        first = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=repo, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    else:
        work = request.getfixturevalue("s3").bucket() + "/work"
        argv = ["train", "--input", str(train), "--workdir", work, *TRAIN_OPTS[:-6], "--workers", "1"]
        # On S3 the first holds the workdir's lease as `ptsne train` takes it.
        first = subprocess.Popen([sys.executable, "-c", _HOLD_LEASE, work], cwd=repo, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert first.stdout.readline().strip() == "held", first.stderr.read()
    holder = f"{socket.gethostname()}:{first.pid}"
    try:
        deadline = time.monotonic() + 120
        while where == "local" and holder not in _lock_text(Path(work) / LOCK_FILE):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        caplog.clear()
        assert main(argv) == EXIT_ERROR
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "another `ptsne train` is writing to" in errors[0] and holder in errors[0], errors
        assert first.poll() is None  # the first goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # Free once its holder is gone: the flock dies with it, a lease of a dead process of this host is broken.
    with storage.lock(*storage.resolve(work), LOCK_FILE):
        pass

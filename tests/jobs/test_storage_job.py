"""``ptsne train`` and ``ptsne affinities`` with their locations on S3 (a real S3-protocol server).

The server is the ``s3`` fixture's moto server; every process of the suite reaches it
through ``AWS_ENDPOINT_URL`` (tests/conftest.py), Ray workers and ``ptsne``
subprocesses included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.cli import EXIT_OK, EXIT_USAGE, main
from jobs.train import MODEL_DIR, PLOT_FILE, STAMP_FILE, TrainLocations, location_arg

REPO = Path(__file__).resolve().parents[2]

#: Small, quick settings on the digits (see tests/jobs/test_train_job.py).
TRAIN_OPTS = [
    "--vector-col", "vector", "--id-col", "id", "--label-col", "label", "--perplexity", "10",
    "--knn-method", "exact", "--epochs", "5", "--batch-size", "128", "--hidden-layers", "32,32",
    "--learning-rate", "0.003", "--seed", "1", "--reference-iter", "20", "--eval-samples", "300",
]
MODEL_FILES = ("SHA256SUMS", "config.json", "model.safetensors")


def _args(**values) -> argparse.Namespace:
    base = dict(input=None, affinities=None, workdir="ptsne-work", eval_input=None, storage_path=None)
    return argparse.Namespace(**{**base, **values})


def _hidden_leftovers(keys: list[str]) -> list[str]:
    from pipeline.storage import is_ours

    return [k for k in keys if any(is_ours(part) for part in k.split("/"))]


@pytest.fixture
def digit_split(digits):
    X, y = digits
    order = np.random.default_rng(0).permutation(len(X))
    return (X[order[:1400]], y[order[:1400]]), (X[order[1400:]], y[order[1400:]])


@pytest.fixture
def s3_shards(s3, digit_split):
    """A bucket with the digits as ``train/`` and ``heldout/`` shards: (bucket URI, held-out X)."""
    from pipeline.shards import write_array_shards

    (X, y), (X_test, y_test) = digit_split
    bucket = s3.bucket()
    write_array_shards(f"{bucket}/train", X, y, shard_rows=500)
    write_array_shards(f"{bucket}/heldout", X_test, y_test, shard_rows=500)
    return bucket, X_test


# -- where things go ------------------------------------------------------------------------------


def test_locations_under_a_uri_workdir_are_joined_as_strings():
    where = TrainLocations.from_args(_args(input="s3://b/vectors/", workdir="s3://b/runs/digits/"))
    assert where.workdir == "s3://b/runs/digits"
    assert where.input == "s3://b/vectors"
    assert where.affinities == "s3://b/runs/digits/affinities"
    assert where.model == f"s3://b/runs/digits/{MODEL_DIR}"
    assert where.plot == f"s3://b/runs/digits/{PLOT_FILE}"
    assert where.storage_path == "s3://b/runs/digits/ray_results"
    assert not where.affinities_given and not where.storage_path_given


def test_locations_resolve_local_paths_and_keep_given_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = TrainLocations.from_args(_args(affinities="aff/", workdir="work", storage_path="s3://b/ray/",
                                           eval_input="held"))
    assert where.workdir == str(tmp_path / "work")
    assert where.affinities == str(tmp_path / "aff") and where.affinities_given
    assert where.model == str(tmp_path / "work" / MODEL_DIR)
    assert where.storage_path == "s3://b/ray" and where.storage_path_given
    assert where.eval_input == str(tmp_path / "held")
    assert location_arg("gs://bucket/") == "gs://bucket"
    assert location_arg("~") == str(Path.home())


@pytest.mark.parametrize("values, message", [
    (dict(input="s3://b/data", workdir="s3://b/data/work"), "--workdir 's3://b/data/work' lies inside --input"),
    (dict(input="s3://b/data/in", workdir="s3://b/data"), "--workdir 's3://b/data' contains --input"),
    (dict(input="s3://b/in", eval_input="s3://b/w/held", workdir="s3://b/w"), "contains --eval-input"),
    (dict(input="s3://b/in", workdir="s3://b/w", storage_path="s3://b/in/ray"), "--storage-path"),
    (dict(affinities="s3://b/aff", workdir="s3://b/aff"), "overlap where training writes"),
    (dict(affinities="s3://b/aff", workdir="s3://b/aff/work"), "overlap where training writes"),
    (dict(affinities="s3://b/w/model", workdir="s3://b/w"), "overlap where training writes"),
    (dict(affinities="s3://b/aff", workdir="s3://b/w", storage_path="s3://b/aff/ray"), "--storage-path"),
])
def test_locations_that_contain_each_other_are_refused(values, message):
    with pytest.raises(ValueError) as exc:
        TrainLocations.from_args(_args(**values)).check()
    assert message in str(exc.value) and "must not" in str(exc.value)


def test_affinities_inside_the_workdir_away_from_what_training_writes_are_fine():
    for aff in ("s3://b/w/affinities", "s3://b/w/other/aff"):
        TrainLocations.from_args(_args(affinities=aff, workdir="s3://b/w")).check()
    TrainLocations.from_args(_args(input="s3://b/data", workdir="s3://b/data-work")).check()
    TrainLocations.from_args(_args(input="s3://b/data", workdir="/tmp/b/data/work")).check()


# -- the model at a URI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    from ptsne.estimator import ParametricTSNE
    from tests.conftest import gaussian_blobs

    X, _ = gaussian_blobs(300, 8, 3)
    est = ParametricTSNE(perplexity=10.0, n_epochs=3, batch_size=128, hidden_layers=(16,), reference_iter=20,
                         random_state=0, device="cpu").fit(X)
    return est, X


def test_model_round_trips_through_s3(s3, fitted):
    from jobs.modelstore import load_model, save_model
    from pipeline.storage import read_json, resolve

    est, X = fitted
    location = f"{s3.bucket()}/runs/model"
    assert save_model(est, location, extra={STAMP_FILE: b'{"key": "k"}'}) == location
    prefix = location[len("s3://"):].split("/", 1)[1]
    assert s3.keys(location) == sorted(f"{prefix}/{name}" for name in (*MODEL_FILES, STAMP_FILE))
    loaded = load_model(location)
    np.testing.assert_array_equal(loaded.transform(X), est.transform(X))
    np.testing.assert_array_equal(loaded.transform(X, method="network"), est.transform(X, method="network"))
    # Saving again replaces the model and its stamp, and leaves no staging copy behind; a file
    # it does not know (the stamp, when not named) is left alone.
    with pytest.raises(FileExistsError, match=STAMP_FILE):
        save_model(est, location)
    save_model(est, location, extra={STAMP_FILE: b'{"key": "k2"}'})
    assert s3.keys(location) == sorted(f"{prefix}/{name}" for name in (*MODEL_FILES, STAMP_FILE))
    fs, path = resolve(location)
    assert read_json(fs, f"{path}/{STAMP_FILE}") == {"key": "k2"}
    assert not _hidden_leftovers(s3.keys(location.rsplit("/", 1)[0]))


def test_local_model_with_its_stamp_is_replaced_whole(fitted, tmp_path):
    from jobs.modelstore import load_model, save_model

    est, X = fitted
    location = str(tmp_path / "work" / "model")
    save_model(est, location, extra={STAMP_FILE: b"1"})
    save_model(est, location, extra={STAMP_FILE: b"2"})  # a retrain over an earlier model and stamp
    assert sorted(os.listdir(location)) == sorted((*MODEL_FILES, STAMP_FILE))
    assert (Path(location) / STAMP_FILE).read_bytes() == b"2"
    assert os.listdir(tmp_path / "work") == ["model"]  # no staging directory left
    np.testing.assert_array_equal(load_model(location).transform(X), est.transform(X))


def test_model_location_holding_other_files_is_left_alone(s3, fitted, tmp_path):
    from jobs.modelstore import save_model
    from pipeline.storage import resolve, write_bytes_atomic

    est, _ = fitted
    for location in (f"{s3.bucket()}/model", str(tmp_path / "model")):
        fs, path = resolve(location)
        write_bytes_atomic(fs, f"{path}/notes.txt", b"keep me")
        with pytest.raises(FileExistsError, match="notes.txt"):
            save_model(est, location)
        assert [f.base_name for f in fs.get_file_info(pafs.FileSelector(path))] == ["notes.txt"]


def test_a_damaged_model_on_s3_is_reported_naming_its_file_there(s3, fitted):
    from jobs.modelstore import load_model, save_model
    from pipeline.storage import resolve, write_bytes_atomic
    from ptsne.errors import DigestMismatchError

    est, _ = fitted
    location = f"{s3.bucket()}/model"
    save_model(est, location)
    fs, path = resolve(location)
    write_bytes_atomic(fs, f"{path}/config.json", b'{"format_version": 1}')
    with pytest.raises(DigestMismatchError) as exc:
        load_model(location)
    assert exc.value.file == f"{location}/config.json"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(f"{location}-missing")


# -- refused before any work ----------------------------------------------------------------------


def test_train_refuses_s3_locations_that_contain_each_other_before_any_work(s3, s3_shards, caplog):
    bucket, _ = s3_shards
    before = s3.keys(bucket)
    for extra in (
        ["--input", f"{bucket}/train", "--workdir", f"{bucket}/train/work"],
        ["--input", f"{bucket}/train", "--workdir", bucket],
        ["--input", f"{bucket}/train", "--eval-input", f"{bucket}/heldout", "--workdir", f"{bucket}/heldout/w"],
        ["--input", f"{bucket}/train", "--workdir", f"{bucket}/w", "--storage-path", f"{bucket}/train/ray"],
        ["--affinities", f"{bucket}/train", "--workdir", f"{bucket}/train"],
    ):
        caplog.clear()
        assert main(["train", *extra, "--epochs", "1"]) == EXIT_USAGE, extra
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and ("--workdir" in errors[0] or "--storage-path" in errors[0]), errors
    assert s3.keys(bucket) == before


def test_train_refuses_a_model_directory_holding_other_files_before_any_work(s3, s3_shards, caplog):
    from pipeline.storage import resolve, write_bytes_atomic

    bucket, _ = s3_shards
    fs, path = resolve(f"{bucket}/w/{MODEL_DIR}")
    write_bytes_atomic(fs, f"{path}/notes.txt", b"keep me")
    before = s3.keys(bucket)
    assert main(["train", "--input", f"{bucket}/train", "--workdir", f"{bucket}/w", "--epochs", "1"]) == EXIT_USAGE
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "notes.txt" in errors[0] and f"{bucket}/w/{MODEL_DIR}" in errors[0], errors
    assert s3.keys(bucket) == before  # no affinities built, nothing written


def test_affinities_refuses_s3_output_around_its_input_and_a_taken_output(s3, s3_shards, caplog):
    bucket, _ = s3_shards
    from pipeline.storage import resolve, write_bytes_atomic

    fs, path = resolve(f"{bucket}/taken")
    write_bytes_atomic(fs, f"{path}/notes.txt", b"keep me")
    before = s3.keys(bucket)
    for output in (f"{bucket}/train/aff", bucket, f"{bucket}/train/"):
        assert main(["affinities", "--input", f"{bucket}/train", "--output", output, "--overwrite"]) == EXIT_USAGE
        err = caplog.text
        caplog.clear()
        assert "--input" in err and "--output" in err and "must not contain each other" in err, err
    # An output holding something else: refused before Ray starts, with the way out.
    assert main(["affinities", "--input", f"{bucket}/train", "--output", f"{bucket}/taken"]) == EXIT_USAGE
    assert "--overwrite" in caplog.text
    caplog.clear()
    assert main(["data", "synth", "--n", "50", "--dim", "2", "--output", f"{bucket}/taken", "--no-ray"]) == EXIT_USAGE
    assert "--overwrite" in caplog.text
    assert s3.keys(bucket) == before


# -- end to end -----------------------------------------------------------------------------------


def test_train_with_every_location_on_s3_registers_and_reruns_nothing(
    ray_local, mlflow_store, s3, s3_shards, capsys
):
    import mlflow

    from jobs.modelstore import load_model

    bucket, X_test = s3_shards
    work, ray_storage = f"{bucket}/work", f"{bucket}/ray"
    argv = ["train", "--input", f"{bucket}/train", "--eval-input", f"{bucket}/heldout", "--workdir", work,
            "--storage-path", ray_storage, "--workers", "2", "--experiment", "s3-train",
            "--register", "s3-digits", "--alias", "champion", *TRAIN_OPTS]
    assert main(argv) == EXIT_OK
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["workdir"] == work and summary["model_dir"] == f"{work}/{MODEL_DIR}"
    assert summary["affinity_dir"] == f"{work}/affinities" and summary["plot"] == f"{work}/{PLOT_FILE}"

    keys = s3.keys(work)
    for name in (*MODEL_FILES, STAMP_FILE):
        assert f"work/{MODEL_DIR}/{name}" in keys, keys
    assert "work/affinities/manifest.json" in keys and f"work/{PLOT_FILE}" in keys
    assert s3.keys(ray_storage), "no Ray Train checkpoints under --storage-path"
    assert not _hidden_leftovers(keys)
    assert not Path("ptsne-work").exists()  # nothing written to the local default workdir

    # The registered model and the model in the workdir are the same map.
    estimator = load_model(summary["model_dir"])
    pyfunc = mlflow.pyfunc.load_model("models:/s3-digits@champion")
    X_test = X_test.astype(np.float32)
    np.testing.assert_allclose(pyfunc.predict(X_test), estimator.transform(X_test), rtol=1e-5, atol=1e-5)
    run = mlflow.get_run(summary["run_id"])
    assert run.data.tags["ptsne.workdir"] == work
    assert 0.0 <= run.data.metrics["trustworthiness"] <= 1.0
    assert PLOT_FILE in {a.path for a in mlflow.MlflowClient().list_artifacts(summary["run_id"])}
    stamp = json.loads(s3.client.get_object(Bucket=bucket[5:], Key=f"work/{MODEL_DIR}/{STAMP_FILE}")["Body"].read())
    assert stamp["logged"]["run_id"] == summary["run_id"]

    # A rerun with the same settings skips every stage and logs nothing new.
    assert main(argv) == EXIT_OK
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["skipped"] == ["affinities", "train", "register"]
    assert again["run_id"] == summary["run_id"]
    exp = mlflow.get_experiment_by_name("s3-train")
    assert len(mlflow.MlflowClient().search_runs([exp.experiment_id])) == 1


def _ptsne(argv: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_train_and_embed_on_a_two_node_cluster_with_s3_locations(s3, s3_shards, tmp_path):
    """A head and a worker node (``ray.cluster_utils.Cluster``, one CPU each); the jobs run as
    ``ptsne`` processes that join it with ``--ray-address``/``--address``."""
    from ray.cluster_utils import Cluster

    bucket, X_test = s3_shards
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PTSNE_ARTIFACT_ROOT=str(tmp_path / "mlartifacts"))
    env.pop("MLFLOW_REGISTRY_URI", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
        cluster.wait_for_nodes()
        work = f"{bucket}/work"
        train = _ptsne(["train", "--input", f"{bucket}/train", "--workdir", work,
                        "--storage-path", f"{bucket}/ray", "--workers", "2", "--ray-address", cluster.address,
                        "--experiment", "s3-cluster", "--register", "s3-cluster", "--alias", "prod",
                        *TRAIN_OPTS], env)
        assert train.returncode == EXIT_OK, train.stderr[-4000:]
        summary = json.loads(train.stdout.strip().splitlines()[-1])
        assert summary["model_dir"] == f"{work}/{MODEL_DIR}"
        assert f"work/{MODEL_DIR}/SHA256SUMS" in s3.keys(work)

        embed = _ptsne(["embed", "--model", "models:/s3-cluster@prod", "--input", f"{bucket}/heldout",
                        "--output", f"{bucket}/maps", "--ray-address", cluster.address, "--json", "--no-progress",
                        "--num-actors", "1"], env)
        assert embed.returncode == EXIT_OK, embed.stderr[-4000:]
        # Every held-out row once, placed where the model in the workdir places it.
        from jobs.modelstore import load_model
        from pipeline.storage import resolve

        shards = [k for k in s3.keys(f"{bucket}/maps") if k.endswith(".parquet") and "/_" not in k]
        assert shards, s3.keys(f"{bucket}/maps")
        fs, _ = resolve(bucket)
        maps = pa.concat_tables([pq.read_table(f"{bucket[5:]}/{k}", filesystem=fs) for k in shards]).sort_by("id")
        assert maps.column("id").to_pylist() == list(range(len(X_test)))
        embedded = np.stack(maps.column("embedding").to_numpy(zero_copy_only=False))
        expected = load_model(summary["model_dir"]).transform(X_test.astype(np.float32))
        np.testing.assert_allclose(embedded, expected, rtol=1e-4, atol=1e-4)

        again = _ptsne(["train", "--input", f"{bucket}/train", "--workdir", work, "--storage-path",
                        f"{bucket}/ray", "--workers", "2", "--ray-address", cluster.address,
                        "--experiment", "s3-cluster", "--register", "s3-cluster", "--alias", "prod",
                        *TRAIN_OPTS], env)
        assert again.returncode == EXIT_OK, again.stderr[-4000:]
        assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == ["affinities", "train", "register"]
    finally:
        cluster.shutdown()

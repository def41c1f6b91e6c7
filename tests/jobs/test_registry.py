"""jobs.tracking and jobs.registry against a real MLflow SQLite store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from jobs import registry
from jobs.tracking import configure_mlflow
from ptsne import ParametricTSNE, digest
from ptsne.errors import DigestMismatchError
from ptsne.estimator import CONFIG_FILE, WEIGHTS_FILE
from tests.conftest import gaussian_blobs

DIM = 6
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def estimators():
    """Two fitted models: the first with a reference of its 200 points, the second network-only."""
    out = []
    for seed, reference_size in ((0, 1000), (1, 0)):
        X, _ = gaussian_blobs(200, DIM, 3, seed=seed)
        out.append(ParametricTSNE(n_epochs=2, perplexity=8, hidden_layers=(16,), random_state=seed, device="cpu",
                                  reference_size=reference_size, reference_iter=50).fit(X))
    return out


def test_default_location_is_under_cwd(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PTSNE_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    loc = configure_mlflow()
    assert loc.tracking_uri == f"sqlite:///{tmp_path / 'ptsne-runs' / 'mlflow.db'}"
    assert loc.registry_uri == loc.tracking_uri == mlflow.get_tracking_uri()
    assert loc.artifact_root == (tmp_path / "ptsne-runs" / "mlartifacts").as_uri()
    experiment = mlflow.get_experiment(loc.experiment_id)
    assert experiment.name == "ptsne"
    assert experiment.artifact_location.startswith(loc.artifact_root)
    assert (tmp_path / "ptsne-runs" / "mlflow.db").is_file()
    # a second call finds the same experiment
    assert configure_mlflow().experiment_id == loc.experiment_id


def test_env_overrides(mlflow_store, tmp_path, monkeypatch):
    registry_db = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry_db)
    loc = configure_mlflow(experiment="other")
    assert loc.tracking_uri == mlflow_store["tracking_uri"]
    assert loc.registry_uri == registry_db == mlflow.get_registry_uri()
    assert loc.artifact_root == Path(mlflow_store["artifact_root"]).as_uri()
    assert mlflow.get_experiment(loc.experiment_id).artifact_location.startswith(loc.artifact_root)
    with pytest.raises(ValueError, match="experiment must be a non-empty string"):
        configure_mlflow(experiment="")


def test_log_register_resolve_every_uri_form(mlflow_store, estimators, rng):
    est = estimators[0]
    configure_mlflow()
    with mlflow.start_run() as run:
        mlflow.log_metric("trustworthiness", 0.91)
        info = registry.log_model(est)
    ref = registry.register(info.model_uri, "demo", "prod")
    assert (ref.name, ref.version, ref.uri, ref.run_id, ref.tag) == ("demo", "1", "models:/demo/1", run.info.run_id, "v1")

    X = rng.normal(size=(40, DIM)).astype(np.float32)
    expected = est.transform(X)
    network = est.transform(X, method="network")
    assert len(est.reference_) == 200 and not np.allclose(expected, network, atol=1e-3)
    for uri in ("models:/demo@prod", "models:/demo/1", "demo/1", "demo@prod", "demo", "models:/demo/latest"):
        loaded, got = registry.resolve_model(uri)
        assert (got.name, got.version, got.aliases) == ("demo", "1", ("prod",)), uri
        np.testing.assert_allclose(loaded.transform(X), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loaded.transform(X, method="network"), network, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(loaded.reference_.embedding, est.reference_.embedding)
    loaded, got = registry.resolve_model(f"runs:/{run.info.run_id}/mapper")
    assert (got.name, got.version, got.tag) == ("mapper", run.info.run_id, f"run-{run.info.run_id}")
    np.testing.assert_allclose(loaded.transform(X), expected, rtol=1e-6, atol=1e-6)
    # the artifact is exactly a ParametricTSNE.save directory
    assert sorted(p.name for p in got.path.iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors"]
    loaded, got = registry.resolve_model(str(got.path))
    assert got.version == "local"

    # the pyfunc flavour: signature float32 (n, D) -> float32 (n, 2), predict == transform
    pyfunc = mlflow.pyfunc.load_model("models:/demo@prod")
    np.testing.assert_allclose(pyfunc.predict(X), expected, rtol=1e-6, atol=1e-6)
    # transform's method as a predict param
    np.testing.assert_allclose(pyfunc.predict(X, params={"method": "network"}), network, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(X, params={"method": "refine"}), expected, rtol=1e-6, atol=1e-6)
    sig = pyfunc.metadata.signature
    assert sig.inputs.inputs[0].shape == (-1, DIM) and sig.inputs.inputs[0].type == np.dtype(np.float32)
    assert sig.outputs.inputs[0].shape == (-1, 2)
    reqs = Path(mlflow.artifacts.download_artifacts("models:/demo/1/requirements.txt")).read_text()
    assert "torch==" in reqs and "safetensors==" in reqs


def test_alias_moves_and_errors_list_what_exists(mlflow_store, estimators):
    configure_mlflow()
    for est in estimators:
        with mlflow.start_run():
            info = registry.log_model(est)
        registry.register(info.model_uri, "demo", "prod")
    assert registry.lookup("demo@prod").version == "2"
    assert registry.lookup("demo/1").aliases == ()

    with pytest.raises(registry.ModelNotFoundError, match=r"unknown model 'dem'; registered models: demo"):
        registry.resolve_model("models:/dem@prod")
    with pytest.raises(registry.ModelNotFoundError, match=r"no alias 'staging'; versions: 1, 2; aliases: @prod -> 2"):
        registry.resolve_model("models:/demo@staging")
    with pytest.raises(registry.ModelNotFoundError, match=r"no version 9; versions: 1, 2"):
        registry.resolve_model("demo/9")
    with pytest.raises(registry.ModelNotFoundError, match="unknown run 'feedface'"):
        registry.resolve_model("runs:/feedface/mapper")
    run_id = registry.lookup("demo/2").run_id
    with pytest.raises(registry.ModelNotFoundError, match=r"has no model at 'other'; its models: \['mapper'\]"):
        registry.resolve_model(f"runs:/{run_id}/other")
    with pytest.raises(ValueError, match="is not understood"):
        registry.resolve_model("a/b/c")
    with pytest.raises(ValueError, match="alias must be a non-empty string"):
        registry.register("models:/demo/1", "demo", alias="a/b")


def test_list_and_describe(mlflow_store, estimators):
    configure_mlflow()
    assert registry.list_models() == []
    for i, est in enumerate(estimators):
        with mlflow.start_run():
            mlflow.log_metrics({"trustworthiness": 0.8 + i / 10, "knn_accuracy": 0.5 + i / 10})
            info = registry.log_model(est)
        registry.register(info.model_uri, "demo", "prod" if i else "candidate")
    (model,) = registry.list_models()
    assert (model["name"], model["latest_version"], model["n_versions"]) == ("demo", "2", 2)
    assert model["aliases"] == {"candidate": "1", "prod": "2"}
    info = registry.describe_model("demo")
    assert [v["version"] for v in info["versions"]] == ["1", "2"]
    assert [v["aliases"] for v in info["versions"]] == [["candidate"], ["prod"]]
    assert info["versions"][1]["metrics"] == pytest.approx({"knn_accuracy": 0.6, "trustworthiness": 0.9})
    assert all(v["run_id"] for v in info["versions"])
    reference = estimators[0].reference_
    facts = [(v["reference_points"], v["reference_bytes"]) for v in info["versions"]]
    assert facts == [(200, reference.nbytes), (0, 0)]
    with pytest.raises(registry.ModelNotFoundError, match="registered models: demo"):
        registry.describe_model("nope")


def test_log_model_checks_its_input(mlflow_store):
    configure_mlflow()
    with pytest.raises(TypeError, match="must be a ParametricTSNE"):
        registry.log_model(object())
    with pytest.raises(Exception, match="not fitted"):
        registry.log_model(ParametricTSNE())


# -- integrity: the version records the files' sha256, and loading checks them ------------------


def _stored_estimator_dir(mlflow_store) -> Path:
    """The one logged model's estimator directory inside the artifact store (what the store holds)."""
    (stored,) = Path(mlflow_store["artifact_root"]).rglob(f"data/{registry.ESTIMATOR_DIR}")
    return stored


def _flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def test_version_records_sha256_and_every_load_checks_it(mlflow_store, estimators):
    configure_mlflow()
    with mlflow.start_run():
        info = registry.log_model(estimators[1])
    ref = registry.register(info.model_uri, "demo", "prod")
    _, got = registry.resolve_model("demo@prod")
    sums = digest.read(got.path)
    assert set(sums) == {CONFIG_FILE, WEIGHTS_FILE} and ref.sha256 == got.sha256 == sums
    tags = mlflow.MlflowClient().get_model_version("demo", ref.version).tags
    assert {k: v for k, v in tags.items() if k.startswith(registry.SHA256_TAG_PREFIX)} == {
        "sha256.config.json": sums[CONFIG_FILE], "sha256.model.safetensors": sums[WEIGHTS_FILE]}

    stored = _stored_estimator_dir(mlflow_store)
    _flip_a_bit(stored / WEIGHTS_FILE)  # damaged in the store: its own SHA256SUMS disagrees
    with pytest.raises(DigestMismatchError, match=rf"{WEIGHTS_FILE}: sha256 .* recorded in the tags of models:/demo/1"):
        registry.resolve_model("demo@prod")
    with pytest.raises(DigestMismatchError, match=rf"{WEIGHTS_FILE}: sha256 .* recorded in SHA256SUMS"):
        mlflow.pyfunc.load_model("models:/demo@prod")  # the pyfunc loader checks the directory's own sums
    digest.write(stored, [CONFIG_FILE, WEIGHTS_FILE])  # rewritten with consistent sums: the tags still differ
    with pytest.raises(DigestMismatchError, match=rf"{WEIGHTS_FILE}: sha256 .* recorded in the tags of models:/demo/1"):
        registry.resolve_model("models:/demo/1")


def test_artifact_holds_no_code_and_loading_runs_none(mlflow_store, estimators, tmp_path):
    from mlflow.models import Model

    configure_mlflow()
    with mlflow.start_run():
        info = registry.log_model(estimators[1])
    registry.register(info.model_uri, "demo", "prod")
    local = Path(mlflow.artifacts.download_artifacts("models:/demo/1", dst_path=str(tmp_path / "download")))
    assert (local / "MLmodel").is_file() and not (local / "code").exists()
    assert not [p for p in local.rglob("*") if p.suffix in (".py", ".pyc", ".pkl", ".pt")]
    flavor = Model.load(str(local / "MLmodel")).flavors["python_function"]
    assert flavor["loader_module"] == "jobs.flavor" and not flavor.get("code")

    # Source planted in the store where code_paths used to put it is never imported.
    marker = tmp_path / "planted-code-ran"
    stored = _stored_estimator_dir(mlflow_store).parents[1]
    for module in ("jobs/__init__.py", "jobs/flavor.py", "ptsne/__init__.py", "ptsne/estimator.py"):
        (stored / "code" / module).parent.mkdir(parents=True, exist_ok=True)
        (stored / "code" / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    script = (
        "import sys, mlflow, numpy as np\n"
        "m = mlflow.pyfunc.load_model('models:/demo@prod')\n"
        "print(sorted(name for name in sys.modules if name.startswith('jobs')))\n"
        f"print(m.predict(np.zeros((3, {DIM}), np.float32)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    *_, modules, shape = out.stdout.strip().splitlines()
    assert shape == "(3, 2)"
    assert modules == "['jobs', 'jobs.flavor']"  # the flavour alone, not the command line
    assert not marker.exists()


def test_models_logged_with_the_old_loader_module_still_load(mlflow_store, estimators, tmp_path):
    import yaml

    configure_mlflow()
    with mlflow.start_run():
        info = registry.log_model(estimators[1])
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["loader_module"] = "jobs.registry"  # as logged before jobs.flavor
    (local / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    X = np.random.default_rng(0).normal(size=(5, DIM)).astype(np.float32)
    model = mlflow.pyfunc.load_model(str(local))
    np.testing.assert_allclose(model.predict(X), estimators[1].transform(X), rtol=1e-5, atol=1e-5)


def test_names_with_quotes_are_searched_as_one_literal(mlflow_store, estimators):
    configure_mlflow()
    for name in ("it", "it's", 'say "hi"', "it"):  # "it" gets two versions
        with mlflow.start_run():
            info = registry.log_model(estimators[1])
        registry.register(info.model_uri, name, "prod")
    assert registry.lookup("it's").uri == "models:/it's/1"  # the latest version: a filtered search
    assert registry.lookup("models:/it's@prod").version == "1"
    assert registry.lookup('say "hi"').version == "1" and registry.lookup("it").version == "2"
    loaded, ref = registry.resolve_model("models:/it's/latest")
    assert ref.sha256 and loaded.n_features_in_ == DIM
    assert [(m["name"], m["n_versions"]) for m in registry.list_models()] == [("it", 2), ("it's", 1),
                                                                               ('say "hi"', 1)]
    assert [v["version"] for v in registry.describe_model("it's")["versions"]] == ["1"]

    bad = "it's \"quoted\""
    with pytest.raises(ValueError, match=re.escape("register: name must not hold both ' and \" ") + ".*"
                       + re.escape(repr(bad))):
        registry.register(info.model_uri, bad)
    assert bad not in [m["name"] for m in registry.list_models()]


def test_version_without_recorded_sums_loads_with_a_warning(mlflow_store, estimators, caplog):
    configure_mlflow()
    with mlflow.start_run() as run:
        registry.log_model(estimators[1])
    with caplog.at_level("WARNING", logger="jobs.registry"):
        ref = registry.register(f"runs:/{run.info.run_id}/mapper", "demo")  # no logged model's tags to copy
        loaded, got = registry.resolve_model("demo")
    assert ref.sha256 == {} and got.sha256 == {}
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("records no sha256" in m and "runs:/" in m for m in messages), messages
    assert any("models:/demo/1 records no sha256" in m for m in messages), messages
    assert loaded.n_features_in_ == DIM  # its own SHA256SUMS was checked by load


def test_pip_requirements_pin_the_installed_faiss_build():
    from importlib import metadata

    from jobs.flavor import pip_requirements

    reqs = pip_requirements()
    installed = []
    for build in ("faiss-cpu", "faiss-gpu"):
        try:
            installed.append(f"{build}=={metadata.version(build).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    assert installed and [r for r in reqs if r.startswith("faiss")] == installed
    assert any(r.lower().startswith("opentsne==") for r in reqs)

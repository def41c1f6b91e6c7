"""jobs.tracking and jobs.registry against a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from jobs import registry
from jobs.tracking import configure_mlflow
from ptsne import ParametricTSNE
from tests.conftest import gaussian_blobs

DIM = 6


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
    assert sorted(p.name for p in got.path.iterdir()) == ["config.json", "model.safetensors"]
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

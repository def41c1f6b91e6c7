"""``ptsne models list`` / ``ptsne models show`` on a real MLflow SQLite store."""

from __future__ import annotations

import json

import mlflow
import pytest

from jobs.cli import EXIT_NOT_FOUND, EXIT_OK, main
from jobs.registry import log_model, register
from jobs.tracking import configure_mlflow
from ptsne import ParametricTSNE
from tests.conftest import gaussian_blobs


@pytest.fixture
def two_versions(mlflow_store):
    configure_mlflow()
    X, _ = gaussian_blobs(200, 5, 3, seed=0)
    runs = []
    for i, alias in enumerate(("candidate", "prod")):
        # Version 1 keeps a reference of its 200 points, version 2 is network-only.
        est = ParametricTSNE(n_epochs=2, perplexity=8, hidden_layers=(16,), random_state=i, device="cpu",
                             reference_size=0 if i else 1000, reference_iter=50).fit(X)
        with mlflow.start_run() as run:
            mlflow.log_metrics({"trustworthiness": 0.81 + i / 10, "knn_accuracy": 0.7 + i / 10})
            info = log_model(est)
        register(info.model_uri, "digits-map", alias)
        runs.append(run.info.run_id)
    return runs


def test_list(two_versions, capsys):
    assert main(["models", "list"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED"]
    row = lines[1].split()
    assert row[:3] == ["digits-map", "2", "2"]
    assert "@candidate->1," in row and "@prod->2" in row
    assert main(["models", "list", "--json"]) == EXIT_OK
    (model,) = json.loads(capsys.readouterr().out)
    assert model["aliases"] == {"candidate": "1", "prod": "2"}


def test_show(two_versions, capsys):
    assert main(["models", "show", "digits-map"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "aliases: @candidate -> version 1, @prod -> version 2" in out
    header, v1, v2 = [line.split() for line in out.splitlines()[-3:]]
    assert header[-2:] == ["knn_accuracy", "trustworthiness"]
    assert v1[:2] == ["1", "candidate"] and v2[:2] == ["2", "prod"]
    assert v1[4] == two_versions[0] and v2[4] == two_versions[1]
    # Reference points and size (MB): 200 points of 5 + 2 float32 values; none in version 2.
    assert header[6:8] == ["REF_POINTS", "REF_MB"]  # after SOURCE RUN
    assert v1[5:7] == ["200", "0.0056"] and v2[5:7] == ["0", "0"]
    assert v2[-2:] == ["0.8", "0.91"]
    assert main(["models", "show", "digits-map", "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert [v["metrics"]["trustworthiness"] for v in info["versions"]] == pytest.approx([0.81, 0.91])
    assert [(v["reference_points"], v["reference_bytes"]) for v in info["versions"]] == [(200, 5600), (0, 0)]


def test_unknown_and_empty(mlflow_store, capsys, caplog):
    assert main(["models", "list"]) == EXIT_OK
    assert "no registered models in sqlite:///" in capsys.readouterr().out
    assert main(["models", "show", "nope"]) == EXIT_NOT_FOUND
    assert "unknown model 'nope'" in caplog.text

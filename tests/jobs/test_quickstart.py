"""``ptsne quickstart`` end to end on the digits: shards -> train -> registry -> embed."""

from __future__ import annotations

import json

import pytest

from jobs.cli import EXIT_OK, main


def test_quickstart_writes_the_digits_shards(tmp_path):
    import pyarrow.dataset as ds

    from jobs.quickstart import write_digits

    train, heldout = write_digits(tmp_path / "data")
    t, h = ds.dataset(train).to_table(), ds.dataset(heldout).to_table()
    assert t.num_rows + h.num_rows == 1797
    assert set(t.column("id").to_pylist()).isdisjoint(h.column("id").to_pylist())
    assert {"id", "vector", "label"} <= set(t.column_names)
    before = sorted(p.stat().st_mtime_ns for p in train.glob("*.parquet"))
    write_digits(tmp_path / "data")  # a second call keeps the shards (and their fingerprint)
    assert sorted(p.stat().st_mtime_ns for p in train.glob("*.parquet")) == before


@pytest.mark.slow
def test_quickstart_end_to_end(ray_local, mlflow_store, tmp_path, capsys):
    import mlflow

    from pipeline.embed import load_output

    code = main(["quickstart", "--workdir", str(tmp_path / "qs"), "--epochs", "10"])
    assert code == EXIT_OK
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "models:/ptsne-digits@champion"
    assert (tmp_path / "qs" / "train" / "embedding.png").is_file()
    version = mlflow.MlflowClient().get_model_version_by_alias("ptsne-digits", "champion")
    assert version.run_id == summary["mlflow_run"]
    out = load_output(summary["embeddings"])
    assert out.num_rows == 359
    assert summary["metrics"]["knn_accuracy"] > 0.5

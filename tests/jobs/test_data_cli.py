"""``ptsne data import``, ``ptsne data synth`` and ``ptsne affinities`` end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from pipeline import schema
from pipeline.affinity import load_edges, load_features


def read_dir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".parquet"))
    return pa.concat_tables(pq.read_table(os.path.join(path, f)) for f in files)


def test_import_npz_with_labels(tmp_path, digits, capsys):
    X, y = digits
    np.savez(tmp_path / "digits.npz", X_train=X, y_train=y)
    out = tmp_path / "shards"
    assert main(["data", "import", str(tmp_path / "digits.npz"), "--output", str(out), "--shard-rows", "500"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"output": str(out), "rows": 1797, "shards": 4, "labels": True}
    t = read_dir(out)
    np.testing.assert_array_equal(schema.arrow_to_vectors(t.column("vector")), X)
    np.testing.assert_array_equal(t.column("label").to_numpy(), y)


def test_import_npy_and_csv(tmp_path):
    X = np.arange(12, dtype=np.float64).reshape(6, 2)
    np.save(tmp_path / "x.npy", X)
    assert main(["data", "import", str(tmp_path / "x.npy"), "--output", str(tmp_path / "a")]) == EXIT_OK
    assert read_dir(tmp_path / "a").column_names == ["id", "vector"]
    (tmp_path / "d.csv").write_text("name,a,b,cls\np,1,2,0\nq,3,4,1\n")
    assert main(["data", "import", str(tmp_path / "d.csv"), "--output", str(tmp_path / "b"),
                 "--label-col", "cls", "--id-col", "name"]) == EXIT_OK
    t = read_dir(tmp_path / "b")
    assert t.column("id").to_pylist() == ["p", "q"] and t.column("label").to_pylist() == [0, 1]


def test_import_rejects_bad_input_and_writes_nothing(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n1,x\n2,y\n")
    assert main(["data", "import", str(tmp_path / "d.csv"), "--output", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert main(["data", "import", str(tmp_path / "none.npy"), "--output", str(tmp_path / "out")]) == EXIT_NOT_FOUND
    assert main(["data", "import", str(tmp_path / "d.csv"), "--output", str(tmp_path / "out"),
                 "--x-key", "X"]) == EXIT_USAGE
    assert sorted(os.listdir(tmp_path)) == ["d.csv"]


def test_synth_without_ray(tmp_path):
    out = tmp_path / "synth"
    args = ["data", "synth", "--n", "700", "--dim", "5", "--centers", "3", "--seed", "2",
            "--shard-rows", "300", "--output", str(out), "--no-ray"]
    assert main(args) == EXIT_OK
    t = read_dir(out)
    assert t.num_rows == 700 and len(os.listdir(out)) == 4  # 3 shards + synth.json
    assert main(["data", "synth", "--n", "0", "--dim", "5", "--output", str(tmp_path / "x"), "--no-ray"]) == EXIT_USAGE


def test_affinities_cli_end_to_end(ray_local, tmp_path, capsys, caplog):
    assert main(["data", "synth", "--n", "600", "--dim", "6", "--centers", "3", "--shard-rows", "250",
                 "--output", str(tmp_path / "in")]) == EXIT_OK
    capsys.readouterr()
    args = ["affinities", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "aff"), "--perplexity", "10",
            "--label-col", "label", "--id-col", "id", "--batch-rows", "200", "--knn-method", "exact"]
    assert main(args) == EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 600 and summary["k"] == 30 and summary["knn_method"] == "exact"
    head, tail, weight = load_edges(str(tmp_path / "aff"))
    assert abs(weight.astype(np.float64).sum() - 1) < 1e-5 and len(head) == summary["n_edges"]
    assert load_features(str(tmp_path / "aff")).column("label").to_numpy().max() == 2
    # A rejected input: exit code 3 and no output.
    pq.write_table(pa.table({"vector": pa.array([[1.0, float("nan")], [1.0, 2.0]])}), tmp_path / "bad.parquet")
    bad = ["affinities", "--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "aff2")]
    assert main(bad) == EXIT_BAD_INPUT
    assert "1 rows have NaN" in caplog.text
    assert not (tmp_path / "aff2").exists()
    assert main(["affinities", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "aff3")]) == EXIT_NOT_FOUND

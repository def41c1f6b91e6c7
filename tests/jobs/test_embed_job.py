"""``ptsne embed`` end to end: a model trained and registered in a real MLflow SQLite store,
a real local Ray, real Parquet shards; the kill test SIGKILLs a real ``ptsne embed`` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from jobs.registry import log_model, register
from jobs.tracking import configure_mlflow
from pipeline.embed import CURRENT_FILE, LEDGER_FILE, Ledger, load_output
from ptsne import ParametricTSNE
from tests.conftest import gaussian_blobs

REPO = Path(__file__).resolve().parents[2]
DIM = 8


def fit(seed):
    X, _ = gaussian_blobs(300, DIM, 3, seed=seed)
    est = ParametricTSNE(n_epochs=2, perplexity=10, hidden_layers=(32, 32), random_state=seed, device="cpu")
    return est.fit(X)


def log_and_register(est, alias="prod", **metrics):
    with mlflow.start_run():
        mlflow.log_metrics(metrics)
        info = log_model(est)
    return register(info.model_uri, "demo", alias)


@pytest.fixture
def store(mlflow_store):
    """A fresh store with ``demo`` version 1 at alias ``prod``."""
    configure_mlflow()
    est = fit(0)
    ref = log_and_register(est, trustworthiness=0.9)
    return SimpleNamespace(est=est, ref=ref, **mlflow_store)


def write_shard(path, ids, X, label=None):
    X = np.asarray(X, dtype=np.float32)
    cols = {"id": pa.array(ids, type=pa.int64()), "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), X.shape[1])}
    if label is not None:
        cols["label"] = pa.array(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)


def make_shards(root, n_shards, rows, start=0, seed=0):
    data = {}
    for i in range(start, start + n_shards):
        X, y = gaussian_blobs(rows, DIM, 3, seed=seed + i)
        ids = np.arange(i * rows, (i + 1) * rows)
        write_shard(root / f"part-{i:03d}.parquet", ids, X, y)
        data[f"part-{i:03d}.parquet"] = (ids, X, y)
    return data


def embed(*args):
    return main(["embed", *map(str, args), "--no-progress", "--num-actors", "1", "--batch-size", "64"])


def embeddings(table):
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_two_batches_then_nothing_new(ray_local, store, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    data = make_shards(inp, 2, 100)
    assert embed("--model", "models:/demo@prod", "--input", inp, "--output", out, "--passthrough", "label", "--json") == EXIT_OK
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["shards_written"], first["rows"], first["model_version"]) == (2, 200, "1")

    data.update(make_shards(inp, 2, 100, start=2))  # the next batch of shards arrives
    assert embed("--model", "demo@prod", "--input", inp, "--output", out, "--passthrough", "label", "--json") == EXIT_OK
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (second["shards_written"], second["shards_skipped"], second["rows"]) == (2, 2, 200)

    assert embed("--model", "demo/1", "--input", inp, "--output", out, "--passthrough", "label", "--json") == EXIT_OK
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (third["shards_written"], third["shards_skipped"], third["rows"]) == (0, 4, 0)

    table = load_output(out / "v1")
    ids = np.concatenate([d[0] for d in data.values()])
    X = np.concatenate([d[1] for d in data.values()])
    assert table.column("id").to_pylist() == ids.tolist()
    np.testing.assert_allclose(embeddings(table), store.est.transform(X), rtol=1e-5, atol=1e-5)
    assert set(table.column("model_name").to_pylist()) == {"demo"}
    assert set(table.column("model_version").to_pylist()) == {"1"}


def test_method_network_differs_from_the_default_refine(ray_local, store, tmp_path):
    assert store.est.reference_ is not None  # fitted with the default reference
    inp = tmp_path / "in"
    (ids, X, _), = make_shards(inp, 1, 80).values()
    out = {}
    for method in ("auto", "network"):
        extra = () if method == "auto" else ("--method", method)
        assert embed("--model", "demo@prod", "--input", inp, "--output", tmp_path / method, *extra) == EXIT_OK
        out[method] = embeddings(load_output(tmp_path / method / "v1"))
        np.testing.assert_allclose(out[method], store.est.transform(X, method=method), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out["auto"], out["network"], atol=1e-3)


def test_refine_for_a_network_only_model_exits_usage_before_ray(store, tmp_path, caplog, monkeypatch):
    import jobs.embed

    X, _ = gaussian_blobs(300, DIM, 3, seed=1)
    plain = ParametricTSNE(n_epochs=1, perplexity=10, hidden_layers=(16,), random_state=1, device="cpu",
                           reference_size=0).fit(X)
    with mlflow.start_run():
        info = log_model(plain)
    register(info.model_uri, "plain", "prod")
    make_shards(tmp_path / "in", 1, 20)

    def no_ray(args):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(jobs.embed, "_init_ray", no_ray)
    code = embed("--model", "plain@prod", "--input", tmp_path / "in", "--output", tmp_path / "out",
                 "--method", "refine")
    assert code == EXIT_USAGE
    assert "--method refine needs a model with a reference; plain version 1 is network-only" in caplog.text
    assert not (tmp_path / "out").exists()


# Four Ray runs (each starts an actor that imports torch): a minute on a busy 2-core machine.
@pytest.mark.slow
def test_alias_move_stays_on_version_until_reembed(ray_local, store, tmp_path, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    data = make_shards(inp, 2, 100)
    assert embed("--model", "models:/demo@prod", "--input", inp, "--output", out, "--passthrough", "label") == EXIT_OK

    # The alias moves to version 2: without --reembed new shards stay on version 1 ...
    est2 = fit(1)
    log_and_register(est2, trustworthiness=0.95)
    data.update(make_shards(inp, 1, 100, start=4))
    # one output directory has one schema: other pass-through columns are refused
    assert embed("--model", "models:/demo@prod", "--input", inp, "--output", out) == EXIT_USAGE
    caplog.clear()
    assert embed("--model", "models:/demo@prod", "--input", inp, "--output", out, "--passthrough", "label") == EXIT_OK
    assert "Run with --reembed" in caplog.text
    assert set(load_output(out / "v1").column("model_version").to_pylist()) == {"1"}
    assert json.loads((out / CURRENT_FILE).read_text())["dir"] == "v1"

    # ... and --reembed writes a fresh, versioned output of every shard, then makes it current.
    assert embed("--model", "models:/demo@prod", "--input", inp, "--output", out, "--reembed") == EXIT_OK
    current = json.loads((out / CURRENT_FILE).read_text())
    assert (current["dir"], current["model_version"]) == ("v2", "2")
    table2 = load_output(out / "v2")
    X = np.concatenate([d[1] for d in data.values()])
    assert len(table2) == len(X) == len(load_output(out / "v1"))
    np.testing.assert_allclose(embeddings(table2), est2.transform(X), rtol=1e-5, atol=1e-5)
    assert set(table2.column("model_version").to_pylist()) == {"2"}


def test_unknown_model_alias_version_exit_not_found(store, tmp_path, caplog):
    inp = tmp_path / "in"
    make_shards(inp, 1, 20)
    cases = {
        "models:/nope@prod": "unknown model 'nope'; registered models: demo",
        "models:/demo@staging": "model 'demo' has no alias 'staging'; versions: 1; aliases: @prod -> 1",
        "demo/7": "model 'demo' has no version 7; versions: 1",
        "runs:/0123456789abcdef/mapper": "unknown run '0123456789abcdef'",
    }
    for uri, message in cases.items():
        caplog.clear()
        assert embed("--model", uri, "--input", inp, "--output", tmp_path / "out") == EXIT_NOT_FOUND, uri
        assert message in caplog.text
    caplog.clear()
    assert embed("--model", "demo@prod", "--input", tmp_path / "missing", "--output", tmp_path / "out") == EXIT_NOT_FOUND
    assert "does not exist" in caplog.text
    assert embed("--model", "a/b/c", "--input", inp, "--output", tmp_path / "out") == EXIT_USAGE
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_bad_input_exit_codes(ray_local, store, tmp_path, caplog):
    inp = tmp_path / "in"
    ids, X = np.arange(50), gaussian_blobs(50, DIM, 3)[0]

    write_shard(inp / "dim" / "a.parquet", ids, X[:, :6])
    assert embed("--model", "demo@prod", "--input", inp / "dim", "--output", tmp_path / "o1") == EXIT_BAD_INPUT
    assert "dimension 6, the model expects 8" in caplog.text
    assert not list((tmp_path / "o1").rglob("*.parquet"))

    write_shard(inp / "schema" / "a.parquet", ids, X)
    pq.write_table(pa.table({"key": ids, "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), DIM)}), inp / "schema" / "b.parquet")
    caplog.clear()
    assert embed("--model", "demo@prod", "--input", inp / "schema", "--output", tmp_path / "o2") == EXIT_BAD_INPUT
    assert "b.parquet: missing column(s) ['id']" in caplog.text
    assert not list((tmp_path / "o2").rglob("*.parquet"))

    X_nan = X.copy()
    X_nan[[1, 2, 3]] = np.nan
    X_nan[4, 0] = np.inf
    write_shard(inp / "nan" / "a.parquet", ids, X_nan)
    caplog.clear()
    assert embed("--model", "demo@prod", "--input", inp / "nan", "--output", tmp_path / "o3") == EXIT_BAD_INPUT
    assert "a.parquet: 4 rows with NaN or Inf (first ids: 1, 2, 3, 4)" in caplog.text
    assert not list((tmp_path / "o3").rglob("*.parquet"))

    assert embed("--model", "demo@prod", "--input", inp / "nan", "--output", tmp_path / "o3", "--on-invalid", "reject") == EXIT_OK
    kept = load_output(tmp_path / "o3" / "v1").column("id").to_pylist()
    assert kept == [0] + list(range(5, 50))
    rejects = pq.read_table(tmp_path / "o3" / "v1" / "_rejects" / "a.parquet")
    assert rejects.column("id").to_pylist() == [1, 2, 3, 4]


def test_duplicate_ids_warn_by_default_or_exit_bad_input(ray_local, store, tmp_path, caplog):
    inp = tmp_path / "in"
    X, _ = gaussian_blobs(40, DIM, 3)
    ids = np.arange(40)
    ids[[5, 6]] = 3  # id 3 on 3 rows: 2 duplicates
    write_shard(inp / "a.parquet", ids, X)

    assert embed("--model", "demo@prod", "--input", inp, "--output", tmp_path / "o1",
                 "--on-duplicate-ids", "error") == EXIT_BAD_INPUT
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "a.parquet: 2 duplicate id(s) in id column 'id' (e.g. 3 on 3 rows)" in error, error
    assert not list((tmp_path / "o1").rglob("*.parquet"))

    caplog.clear()
    assert embed("--model", "demo@prod", "--input", inp, "--output", tmp_path / "o2") == EXIT_OK
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "duplicate" in r.getMessage()]
    assert "id column 'id': 2 duplicate id(s) in 1 shard(s)" in warning, warning
    assert load_output(tmp_path / "o2" / "v1").column("id").to_pylist() == ids.tolist()


def test_watch_polls_until_max_polls(ray_local, store, tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    make_shards(inp, 2, 50)
    args = ("--model", "demo@prod", "--input", inp, "--output", out, "--json", "--watch", "--interval", "0.2", "--max-polls", "2")
    assert embed(*args) == EXIT_OK
    polls = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(p["shards_written"], p["shards_skipped"]) for p in polls] == [(2, 0), (0, 2)]
    assert len(load_output(out / "v1")) == 100


@pytest.mark.slow
def test_killed_three_times_then_rerun_exactly_once(ray_local, store, tmp_path):
    """SIGKILL a real ``ptsne embed`` process at three moments, rerun: every row exactly once."""
    inp, out = tmp_path / "in", tmp_path / "out"
    data = make_shards(inp, 40, 100)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "jobs.cli", "embed", "--model", "models:/demo@prod", "--input", str(inp),
           "--output", str(out), "--no-progress", "--num-actors", "1", "--batch-size", "16", "--block-mb", "0.0625"]
    target = out / "v1"

    def ledger_size():
        try:
            return len(Ledger.load(target).entries)
        except (OSError, ValueError):
            return 0

    def outputs():
        return list(target.glob("*.parquet")) if target.exists() else []

    moments = [
        lambda t: t > 3.0,  # while starting: connecting, resolving and downloading the model
        lambda t: len(outputs()) > ledger_size() or ledger_size() >= 1,  # first shard on disk
        lambda t: ledger_size() >= 20,  # half-way
    ]
    kills = []
    for when in moments:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = time.monotonic()
        while proc.poll() is None and not when(time.monotonic() - start):
            time.sleep(0.01)
        alive = proc.poll() is None
        before = ledger_size()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills.append((alive, before))
        assert alive, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    assert all(before < len(data) for _, before in kills)

    final = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == EXIT_OK, final.stderr[-3000:]
    table = load_output(target)
    ids_in = np.concatenate([d[0] for d in data.values()])
    ids_out = np.asarray(table.column("id").to_pylist())
    assert len(ids_out) == len(ids_in)
    assert set(ids_out.tolist()) == set(ids_in.tolist())
    # and the directory holds nothing but finished shards
    files = sorted(p.name for p in target.rglob("*") if p.is_file())
    assert files == sorted([LEDGER_FILE, *data])
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in target.glob("*.parquet")) == len(ids_in)


def test_cli_defaults_are_the_pipeline_defaults():
    from jobs.cli import build_parser
    from pipeline.embed import EmbedConfig

    args = build_parser().parse_args(["embed", "--model", "m", "--input", "i", "--output", "o"])
    default = EmbedConfig()
    assert args.batch_size == default.batch_size
    assert int(args.block_mb * (1 << 20)) == default.block_bytes
    assert args.cpus_per_actor == default.cpus_per_actor
    assert args.method == default.method
    assert args.on_duplicate_ids == default.on_duplicate_ids


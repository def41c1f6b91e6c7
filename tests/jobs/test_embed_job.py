"""``ptsne embed`` end to end: a model trained and registered in a real MLflow SQLite store,
a real local Ray, real Parquet shards, a real S3-protocol server; the kill tests SIGKILL a real
``ptsne embed`` process, the memory test measures one's peak RSS."""

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
from pipeline.embed import CURRENT_FILE, LEDGER_FILE, LOCK_FILE, Ledger, load_output, output_name
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
    import pipeline.session

    X, _ = gaussian_blobs(300, DIM, 3, seed=1)
    plain = ParametricTSNE(n_epochs=1, perplexity=10, hidden_layers=(16,), random_state=1, device="cpu",
                           reference_size=0).fit(X)
    with mlflow.start_run():
        info = log_model(plain)
    register(info.model_uri, "plain", "prod")
    make_shards(tmp_path / "in", 1, 20)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipeline.session, "start_ray", no_ray)
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
    name = output_name("a.parquet", os.path.realpath(inp / "nan" / "a.parquet"))
    rejects = pq.read_table(tmp_path / "o3" / "v1" / "_rejects" / name)
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


def _kill_three_times_then_rerun(ray_local, inp, out, files, after_kill=lambda: None):
    """SIGKILL a real ``ptsne embed`` from ``inp`` into ``out`` at three moments, rerun: every row exactly once.

    ``files()`` lists the names of the files in ``out/v1``; ``after_kill`` runs after each kill.
    """
    data = make_shards(inp, 40, 100)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "jobs.cli", "embed", "--model", "models:/demo@prod", "--input", str(inp),
           "--output", str(out), "--no-progress", "--num-actors", "1", "--batch-size", "16", "--block-mb", "0.0625"]
    target = f"{out}/v1"

    def ledger_size():
        try:
            return len(Ledger.load(target).entries)
        except (OSError, ValueError):
            return 0

    def outputs():
        return [f for f in files() if f.endswith(".parquet")]

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
            time.sleep(0.02)
        alive = proc.poll() is None
        before = ledger_size()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills.append((alive, before))
        assert alive, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        after_kill()
    assert all(before < len(data) for _, before in kills)

    final = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == EXIT_OK, final.stderr[-3000:]
    table = load_output(target)
    ids_in = np.concatenate([d[0] for d in data.values()])
    ids_out = np.asarray(table.column("id").to_pylist())
    assert len(ids_out) == len(ids_in)
    assert set(ids_out.tolist()) == set(ids_in.tolist())
    # and the directory holds nothing but finished shards, each named after its input
    uris = {rel: os.path.realpath(inp / rel) for rel in data}
    assert sorted(files()) == sorted([LEDGER_FILE, *(output_name(rel, uri) for rel, uri in uris.items())])
    assert sorted(Ledger.load(target).entries) == sorted(uris.values())
    assert sum(e["rows"] for e in Ledger.load(target).entries.values()) == len(ids_in)


@pytest.mark.slow
def test_killed_three_times_then_rerun_exactly_once(ray_local, store, tmp_path):
    """SIGKILL a real ``ptsne embed`` process at three moments, rerun: every row exactly once."""
    out = tmp_path / "out"

    def files():
        target = out / "v1"
        return [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()] if target.exists() else []

    _kill_three_times_then_rerun(ray_local, tmp_path / "in", out, files)


@pytest.mark.slow
def test_killed_three_times_then_rerun_exactly_once_with_the_output_on_s3(ray_local, store, tmp_path, s3):
    out = f"{s3.bucket()}/maps"

    def files():
        return [k.split("/v1/", 1)[1] for k in s3.keys(f"{out}/v1") if not k.endswith("/")]

    def lease_of_the_dead_run():
        # A killed run's lease holds the output for storage.LEASE_SECONDS; whoever knows the run is
        # dead may delete it (as here) instead of waiting.
        bucket, key = out[len("s3://"):].split("/", 1)
        s3.client.delete_object(Bucket=bucket, Key=f"{key}/{LOCK_FILE}")

    _kill_three_times_then_rerun(ray_local, tmp_path / "in", out, files, after_kill=lease_of_the_dead_run)
    assert LOCK_FILE not in [k.rsplit("/", 1)[-1] for k in s3.keys(out)]


def test_cli_defaults_are_the_pipeline_defaults():
    from jobs.cli import build_parser
    from pipeline.embed import EmbedConfig

    args = build_parser().parse_args(["embed", "--model", "m", "--input", "i", "--output", "o"])
    default = EmbedConfig()
    assert args.batch_size == default.batch_size
    assert args.cpus_per_actor == default.cpus_per_actor
    assert args.method == default.method
    assert args.on_duplicate_ids == default.on_duplicate_ids
    assert args.ray_address is None and args.block_mb is None


def test_ray_address_is_the_documented_name_and_address_a_hidden_alias(capsys):
    from jobs.cli import build_parser

    parser = build_parser()
    base = ["embed", "--model", "m", "--input", "i", "--output", "o"]
    assert parser.parse_args([*base, "--ray-address", "10.0.0.5:6379"]).ray_address == "10.0.0.5:6379"
    assert parser.parse_args([*base, "--address", "10.0.0.6:6379"]).ray_address == "10.0.0.6:6379"
    assert parser.parse_args([*base, "--block-mb", "8"]).block_mb == 8.0  # accepted, without effect
    with pytest.raises(SystemExit):
        parser.parse_args(["embed", "--help"])
    text = capsys.readouterr().out
    assert "--ray-address" in text and "--address" not in text.replace("--ray-address", "")
    assert "--block-mb" not in text


def test_input_and_output_that_contain_each_other_exit_usage_and_user_files_survive(
        ray_local, store, tmp_path, caplog):
    out = tmp_path / "maps"
    inside = out / "v1" / "incoming"
    make_shards(inside, 1, 20)
    before = {p.name: p.read_bytes() for p in inside.iterdir()}
    assert embed("--model", "demo@prod", "--input", inside, "--output", out) == EXIT_USAGE
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "--output" in error and "--input" in error and "must not contain each other" in error, error
    inp = tmp_path / "incoming"
    make_shards(inp, 2, 30)
    caplog.clear()
    assert embed("--model", "demo@prod", "--input", inp, "--output", inp / "maps") == EXIT_USAGE
    assert "lies inside --input" in caplog.text
    assert not (inp / "maps").exists()
    assert {p.name: p.read_bytes() for p in inside.iterdir()} == before
    assert not (out / LOCK_FILE).exists() and not (out / "v1" / LEDGER_FILE).exists()  # refused before any work

    # A user's own Parquet file inside OUTPUT/v1/ is not ours: a run leaves it alone.
    stray = out / "v1" / "notes.parquet"
    pq.write_table(pa.table({"note": ["mine"]}), stray)
    stray_bytes = stray.read_bytes()
    assert embed("--model", "demo@prod", "--input", inp, "--output", out) == EXIT_OK
    assert stray.read_bytes() == stray_bytes
    assert len(load_output(out)) == 60


# The driver only plans and commits: its peak RSS must not follow the rows embedded.
_PEAK_RSS_ROWS = {"small": 200_000, "large": 2_000_000}


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_the_rows_embedded(ray_local, tmp_path):
    dim, shard_rows = 8, 100_000
    X, _ = gaussian_blobs(300, dim, 3, seed=0)
    model = ParametricTSNE(n_epochs=1, perplexity=10, hidden_layers=(16,), reference_size=0, random_state=0,
                           device="cpu").fit(X).save(tmp_path / "model")
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    peaks, summaries = {}, {}
    for name, rows in _PEAK_RSS_ROWS.items():
        inp = tmp_path / f"in-{name}"
        inp.mkdir()
        for i in range(rows // shard_rows):
            V = rng.normal(size=(shard_rows, dim)).astype(np.float32)
            write_shard(inp / f"part-{i:03d}.parquet", np.arange(i * shard_rows, (i + 1) * shard_rows), V)
        stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(stdout, "w") as out, open(stderr, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", "embed", "--model", str(model), "--input", str(inp),
                 "--output", str(tmp_path / f"out-{name}"), "--no-progress", "--num-actors", "2", "--json"],
                cwd=REPO, env=env, stdout=out, stderr=err,
            )
            # wait4: the peak RSS of this child alone (it connects to the test's Ray and starts no process).
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout, stderr = stdout.read_text(), stderr.read_text()
        assert proc.returncode == EXIT_OK, stderr[-3000:]
        summaries[name] = json.loads(stdout.strip().splitlines()[-1])
        peaks[name] = usage.ru_maxrss / 1024  # MiB (Linux reports KiB)
    assert [summaries[n]["rows"] for n in _PEAK_RSS_ROWS] == list(_PEAK_RSS_ROWS.values())
    ratio = peaks["large"] / peaks["small"]
    print(f"driver peak RSS: {peaks['small']:.0f} MiB for 200k rows, {peaks['large']:.0f} MiB for 2M rows, "
          f"ratio {ratio:.3f}")
    # Measured 1.000 (819 MiB both); the driver that collected the rows grew 16 % here (546 -> 635 MiB).
    assert ratio < 1.05, peaks


# -- a model is identified by its weights, for local directories, runs:/ URIs and registered versions ----


def _sha(model_dir):
    import hashlib

    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def test_two_local_models_both_named_model_are_refused_into_one_output_and_reembed_switches(
        ray_local, tmp_path, caplog):
    a_dir, b_dir = tmp_path / "runA" / "model", tmp_path / "runB" / "model"  # what two `ptsne train` write
    fit(0).save(a_dir)
    b = fit(1)
    b.save(b_dir)
    sha_a, sha_b = _sha(a_dir), _sha(b_dir)
    inp, out = tmp_path / "in", tmp_path / "out"
    data = make_shards(inp, 2, 50)
    assert embed("--model", a_dir, "--input", inp, "--output", out) == EXIT_OK
    current = json.loads((out / CURRENT_FILE).read_text())
    assert (current["dir"], current["model_name"], current["model_sha256"]) == (f"local-{sha_a[:10]}", "model", sha_a)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))

    data.update(make_shards(inp, 1, 50, start=2))  # new rows arrive; runB/model would mix its map in
    caplog.clear()
    assert embed("--model", b_dir, "--input", inp, "--output", out) == EXIT_USAGE
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and sha_a[:12] in errors[0] and sha_b[:12] in errors[0] and "--reembed" in errors[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == before  # nothing written

    assert embed("--model", b_dir, "--input", inp, "--output", out, "--reembed") == EXIT_OK
    current = json.loads((out / CURRENT_FILE).read_text())
    assert (current["dir"], current["model_sha256"]) == (f"local-{sha_b[:10]}", sha_b)
    table = load_output(out)
    X = np.concatenate([d[1] for d in data.values()])
    np.testing.assert_allclose(embeddings(table), b.transform(X), rtol=1e-5, atol=1e-5)
    assert len(load_output(out / f"local-{sha_a[:10]}")) == 100  # the first map is kept as it was


def test_runs_and_registered_versions_record_the_weights_sha256(ray_local, store, tmp_path):
    inp = tmp_path / "in"
    make_shards(inp, 1, 40)
    weights = store.ref.sha256["model.safetensors"]
    for uri, out, tag in ((f"runs:/{store.ref.run_id}/mapper", tmp_path / "by-run", f"run-{store.ref.run_id}"),
                          ("models:/demo/1", tmp_path / "by-version", "v1")):
        assert embed("--model", uri, "--input", inp, "--output", out) == EXIT_OK
        current = json.loads((out / CURRENT_FILE).read_text())
        assert (current["dir"], current["model_sha256"]) == (tag, weights), uri
        assert {e["model_sha256"] for e in Ledger.load(out / tag).entries.values()} == {weights}


# -- SIGTERM stops --watch cleanly ----------------------------------------------------------------------


def test_watch_stopped_by_sigterm_exits_0_and_keeps_the_finished_shards(ray_local, tmp_path):
    model = tmp_path / "model"
    fit(0).save(model)
    inp, out = tmp_path / "in", tmp_path / "out"
    make_shards(inp, 2, 50)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "jobs.cli", "embed", "--model", str(model), "--input", str(inp), "--output",
           str(out), "--no-progress", "--num-actors", "1", "--watch", "--interval", "120", "--json"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())  # the first poll embedded with Ray: ray.init has run
        assert first["shards_written"] == 2
        proc.send_signal(signal.SIGTERM)  # as cron, systemd or Kubernetes stop a job
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert code == EXIT_OK, stderr[-3000:]
    assert "stopped; finished shards are in the ledger" in stderr and "Traceback" not in stderr
    tag = f"local-{_sha(model)[:10]}"
    assert len(Ledger.load(out / tag).entries) == 2 and len(load_output(out)) == 100

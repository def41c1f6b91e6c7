"""The ``ptsne`` command line used the wrong way: nothing lost, nobody in, each error in its class.

Each case is what a careless or hostile user can type; the answer is an exit
code of the README's table and a one-line message naming the option, with the
user's files intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.cli import EXIT_BAD_INPUT, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from pipeline.shards import write_array_shards
from pipeline.storage import check_disjoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shards(tmp_path):
    """Two small shards in ``tmp_path/in``, and a snapshot of their bytes."""
    X = np.random.default_rng(0).normal(size=(120, 4)).astype(np.float32)
    write_array_shards(str(tmp_path / "in"), X, None, shard_rows=60)
    return tmp_path / "in", _snapshot(tmp_path / "in")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_error(caplog) -> str:
    """The one error a command reported (jobs.cli.Report): one line, no traceback; clears the log."""
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    (error,) = errors
    line = error.getMessage()
    assert error.exc_info is None and "\n" not in line and "RayTaskError" not in line, line
    caplog.clear()
    return line


# -- nobody in: a local Ray started by a command listens on loopback only -----------------------


def test_local_ray_started_by_a_command_is_on_loopback():
    # A fresh process: the test session's own Ray (tests/conftest.py) is left alone.
    code = r"""
import json, socket
import ray
from ray._common.network_utils import node_ip_address_from_perspective
from jobs.cli import build_parser, ray_session

args = build_parser().parse_args(["embed", "--model", "m@a", "--input", "i", "--output", "o", "--num-cpus", "1"])
assert ray_session(args).start()
gcs = ray.get_runtime_context().gcs_address
host = node_ip_address_from_perspective()
with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    reach = s.connect_ex((host, int(gcs.rsplit(":", 1)[1])))
print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "ip": ray.util.get_node_ip_address(),
                  "gcs": gcs, "host": host, "reach": reach}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["nodes"] == ["127.0.0.1"] and info["ip"] == "127.0.0.1", info
    assert info["gcs"].startswith("127.0.0.1:"), info
    if info["host"] != "127.0.0.1":  # a machine with a network address: the GCS does not answer on it
        assert info["reach"] != 0, info


# -- nothing lost: inputs and outputs that contain each other ----------------------------------


def test_affinities_refuses_output_on_or_around_its_input(shards, tmp_path, caplog):
    inp, before = shards
    for output in (inp, inp / "aff", tmp_path):
        assert main(["affinities", "--input", str(inp), "--output", str(output), "--overwrite"]) == EXIT_USAGE
        line = _one_error(caplog)
        assert "--input" in line and "--output" in line, line
    assert _snapshot(inp) == before
    assert not (inp / "aff").exists()


def test_check_disjoint_compares_resolved_paths_and_uris(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    for first, second in [
        (tmp_path / "a", tmp_path / "link"),  # the same directory through a symlink
        (tmp_path / "a", f"file://{tmp_path / 'a'}/"),
        (tmp_path / "a", str(tmp_path / "a" / ".." / "a" / "sub")),
        ("s3://bucket/vectors/", "s3://bucket/vectors"),
        ("s3://bucket/vectors", "S3://bucket/vectors/aff"),
    ]:
        with pytest.raises(ValueError, match="must not contain each other"):
            check_disjoint(first, second)
    check_disjoint(tmp_path / "a", tmp_path / "ab")  # a common prefix is not containment
    check_disjoint("s3://bucket/vectors", "s3://bucket/vectors-aff")
    check_disjoint("s3://bucket/x", str(tmp_path / "x"))


def test_train_refuses_a_workdir_inside_its_input_before_any_work(shards, tmp_path, caplog):
    inp, before = shards
    for workdir in (inp / "work", tmp_path):
        caplog.clear()
        assert main(["train", "--input", str(inp), "--workdir", str(workdir), "--epochs", "1"]) == EXIT_USAGE
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "--input" in errors[0] and "--workdir" in errors[0], errors
    assert main(["train", "--input", str(inp), "--eval-input", str(tmp_path), "--workdir", str(tmp_path / "w"),
                 "--epochs", "1"]) == EXIT_USAGE
    assert _snapshot(inp) == before
    assert not (inp / "work").exists() and not (tmp_path / "w").exists()


def test_train_refuses_a_register_name_the_registry_cannot_search_before_any_work(shards, tmp_path, caplog):
    inp, _ = shards
    bad = "it's \"quoted\""
    assert main(["train", "--input", str(inp), "--workdir", str(tmp_path / "w"), "--epochs", "1",
                 "--register", bad]) == EXIT_USAGE
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--register" in errors[0] and repr(bad) in errors[0], errors
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("--workers", "0", "an integer >= 1"),
    ("--cpus-per-worker", "0", "an integer >= 1"),
    ("--gpus-per-worker", "-0.5", "'auto' or a finite number >= 0"),
    ("--max-failures", "-1", "an integer >= 0"),
    ("--eval-samples", "0", "an integer >= 1"),
    ("--plot-points", "-3", "an integer >= 1"),
    ("--epochs", "0", "an integer >= 1"),
])
def test_train_refuses_a_scaling_value_out_of_bounds_naming_the_option(tmp_path, caplog, option, value, allowed):
    config = tmp_path / "train.toml"
    config.write_text(f'{option[2:]} = {value}\n')
    for argv in ([option, value], ["--config", str(config)]):  # the same check from the file
        assert main(["train", "--input", str(tmp_path / "in"), "--workdir", str(tmp_path / "w"), *argv]) == EXIT_USAGE
        line = _one_error(caplog)
        assert f"{option} must be {allowed}, got {float(value) if '.' in value else int(value)}" in line, line
    assert not (tmp_path / "w").exists()


def test_data_import_refuses_an_output_around_its_source(tmp_path, caplog):
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    assert main(["data", "import", str(tmp_path / "x.npy"), "--output", str(tmp_path), "--overwrite"]) == EXIT_USAGE
    assert "--output" in _one_error(caplog)
    assert (tmp_path / "x.npy").is_file()


# -- each error in its class, on one line ------------------------------------------------------


def test_existing_output_is_bad_usage_in_every_command(shards, tmp_path, caplog):
    inp, _ = shards
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    for argv in (
        ["data", "import", str(tmp_path / "x.npy"), "--output", str(taken)],
        ["data", "synth", "--n", "50", "--dim", "2", "--output", str(taken), "--no-ray"],
        ["affinities", "--input", str(inp), "--output", str(taken)],  # refused before Ray starts
    ):
        assert main(argv) == EXIT_USAGE, argv
        line = _one_error(caplog)
        assert "--overwrite" in line, line
    assert (taken / "notes.txt").read_text() == "keep me"


def test_data_import_unwritable_output_is_one_line_error(tmp_path, caplog):
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    (tmp_path / "file").write_text("")
    targets = [tmp_path / "file" / "shards"]  # a regular file where a directory must go
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        targets.append(tmp_path / "ro" / "shards")
    for output in targets:
        assert main(["data", "import", str(tmp_path / "x.npy"), "--output", str(output)]) == EXIT_ERROR
        line = _one_error(caplog)
        assert "--output" in line and str(output) in line, line


@pytest.mark.parametrize("kind", ["npy", "npz", "csv"])
def test_data_import_of_an_input_without_rows_names_the_file(tmp_path, caplog, kind):
    source = tmp_path / f"empty.{kind}"
    if kind == "npy":
        np.save(source, np.ones((0, 4), np.float32))
    elif kind == "npz":
        np.savez(source, X=np.ones((0, 4), np.float32), y=np.ones(0, np.int64))
    else:
        source.write_text("a,b,label\n")
    args = ["data", "import", str(source), "--output", str(tmp_path / "out")] + (["--label-col", "label"] if kind == "csv" else [])
    assert main(args) == EXIT_BAD_INPUT
    line = _one_error(caplog)
    assert str(source) in line and "has no rows" in line and "at least one vector" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc filesystem")
def test_embed_output_where_nothing_can_be_created_names_the_option_before_any_work(shards, tmp_path, caplog):
    # /proc takes no new files, even from root, for whom os.access says yes everywhere.
    inp, before = shards
    output = "/proc/ptsne-maps"
    (tmp_path / "model").mkdir()  # the output is refused before the model is read
    args = ["embed", "--model", str(tmp_path / "model"), "--input", str(inp), "--output", output]
    assert main(args) == EXIT_ERROR
    line = _one_error(caplog)
    assert "--output" in line and output in line and "cannot be created in '/proc'" in line, line
    assert _snapshot(inp) == before and not os.path.exists(output)


def test_uri_with_dot_segments_is_refused_naming_the_option(s3, tmp_path, caplog):
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    bucket = s3.bucket()
    for output in (f"{bucket}/./in", f"{bucket}/a/../in"):
        assert main(["data", "import", str(tmp_path / "x.npy"), "--output", output]) == EXIT_USAGE
        line = _one_error(caplog)
        assert f"--output {output!r}" in line and "must not contain '.' or '..'" in line, line
    inp = f"{bucket}/in"
    assert main(["data", "import", str(tmp_path / "x.npy"), "--output", inp]) == EXIT_OK
    stored = s3.keys(bucket)
    (tmp_path / "model").mkdir()  # the locations are refused before the model is read
    args = ["embed", "--model", str(tmp_path / "model"), "--input", f"{bucket}/./in", "--output", f"{bucket}/maps"]
    assert main(args) == EXIT_USAGE
    line = _one_error(caplog)
    assert f"--input '{bucket}/./in'" in line, line
    assert s3.keys(bucket) == stored and all(k.startswith("in/") for k in stored), stored


def test_affinities_unwritable_output_is_one_line_error_before_any_work(shards, tmp_path, caplog):
    inp, before = shards
    (tmp_path / "file").write_text("")
    output = tmp_path / "file" / "aff"
    assert main(["affinities", "--input", str(inp), "--output", str(output)]) == EXIT_ERROR
    line = _one_error(caplog)
    assert "--output" in line and str(output) in line and "not a directory" in line, line
    assert _snapshot(inp) == before


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "0", "1e39", "1e-40", "x"])
def test_data_import_rejects_a_scale_that_ruins_the_vectors(tmp_path, capsys, scale):
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    with pytest.raises(SystemExit) as exit_:
        main(["data", "import", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out"), "--scale", scale])
    assert exit_.value.code == EXIT_USAGE
    assert "--scale" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreadable_shard_is_bad_input_naming_the_file(ray_local, shards, tmp_path, caplog):
    inp, _ = shards
    broken = inp / "part-99999.parquet"
    broken.write_bytes(b"this is not parquet" * 10)
    assert main(["affinities", "--input", str(inp), "--output", str(tmp_path / "aff"), "--perplexity", "5",
                 "--knn-method", "exact"]) == EXIT_BAD_INPUT
    line = _one_error(caplog)
    assert str(broken) in line and "unreadable" in line, line
    assert not (tmp_path / "aff").exists()


def test_embed_missing_model_directory_is_not_found(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    for model in ("./missing-dir", str(tmp_path / "missing-dir"), "../missing/model"):
        caplog.clear()
        assert main(["embed", "--model", model, "--input", "in", "--output", "out"]) == EXIT_NOT_FOUND, model
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and model in errors[0], errors
    assert main(["embed", "--model", "models:/x@", "--input", "in", "--output", "out"]) == EXIT_USAGE
    assert not (tmp_path / "out").exists()


# -- kill -9 leftovers: stale ptsne-embed-* directories are removed on the next start ----------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_embed_start_removes_stale_temp_dirs_and_nothing_else(tmp_path, monkeypatch):
    from jobs.embed import TEMP_PREFIX, _ModelCache

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = time.time() - 2 * 3600
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f"{TEMP_PREFIX}{dead}-killed": (old, False),  # a killed run's model copy
        f"{TEMP_PREFIX}legacy_name": (old, False),  # no pid in the name: by age alone
        f"{TEMP_PREFIX}{alive}-running": (old, True),  # its process still runs
        f"{TEMP_PREFIX}{dead}-recent": (time.time(), True),  # too young
        f"{TEMP_PREFIX}legacy_recent": (time.time(), True),
        "ptsne-embedded-notes": (old, True),  # another prefix
        "someone-else": (old, True),
    }
    for name, (mtime, _) in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text("x")
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / f"{TEMP_PREFIX}old-file").write_text("a file, not ours to remove")
    os.utime(tmp_path / f"{TEMP_PREFIX}old-file", (old, old))
    (tmp_path / f"{TEMP_PREFIX}{dead}-link").symlink_to(tmp_path / "someone-else")

    (tmp_path / "in").mkdir()
    assert main(["embed", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")]) == EXIT_NOT_FOUND
    for name, (_, kept) in names.items():
        assert (tmp_path / name).exists() == kept, name
    assert (tmp_path / f"{TEMP_PREFIX}old-file").is_file()
    assert (tmp_path / f"{TEMP_PREFIX}{dead}-link").is_symlink() and (tmp_path / "someone-else" / "weights").is_file()

    cache = _ModelCache()  # what a run makes now carries its pid
    try:
        assert Path(cache.tmp.name).name.startswith(f"{TEMP_PREFIX}{os.getpid()}-")
        assert Path(cache.tmp.name).parent == tmp_path
    finally:
        cache.tmp.cleanup()


_MAKE_AND_WAIT = r"""
import time
from jobs import tempdirs
from jobs.embed import TEMP_PREFIX
from jobs.train import TEMP_PREFIX as RUN_PREFIX
made = [tempdirs.make(TEMP_PREFIX), tempdirs.make(RUN_PREFIX)]
print(" ".join(d.name for d in made), flush=True)
time.sleep(600)
"""


def test_kill_9_leftovers_of_embed_and_train_are_removed_by_their_next_run_and_nothing_else(tmp_path,
                                                                                            monkeypatch):
    import signal

    from jobs.train import TEMP_PREFIX as RUN_PREFIX
    from pipeline.storage import pid_namespace

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _MAKE_AND_WAIT], cwd=repo, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(repo), TMPDIR=str(tmp_path)))
    embed_dir, run_dir = (Path(p) for p in proc.stdout.readline().split())
    (embed_dir / "model.safetensors").write_bytes(b"x")
    proc.send_signal(signal.SIGKILL)  # kill -9: no clean-up runs
    proc.wait(timeout=30)
    assert embed_dir.is_dir() and run_dir.is_dir() and embed_dir.parent == tmp_path

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ns = pid_namespace()
    kept = [
        tmp_path / f"{RUN_PREFIX}{os.getpid()}-n{ns}-live",  # its process runs
        tmp_path / f"{RUN_PREFIX}{proc.pid}-n{ns}0-elsewhere",  # another pid namespace: by age only
        tmp_path / f"{RUN_PREFIX}{proc.pid}-recent",  # an older name: by age only
        tmp_path / "ptsne-runner-notes",  # another prefix
    ]
    for d in kept:
        d.mkdir()
    (tmp_path / f"{RUN_PREFIX}{proc.pid}-n{ns}-file").write_text("a file, not a directory of ours")

    assert main(["train", "--affinities", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")]) \
        == EXIT_NOT_FOUND
    assert not run_dir.exists() and embed_dir.is_dir()  # the run's, not the other command's
    (tmp_path / "in").mkdir()
    assert main(["embed", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")]) == EXIT_NOT_FOUND
    assert not embed_dir.exists()
    assert all(d.is_dir() for d in kept) and (tmp_path / f"{RUN_PREFIX}{proc.pid}-n{ns}-file").is_file()


def test_remove_stale_checks_its_arguments(tmp_path):
    from jobs.tempdirs import remove_stale

    with pytest.raises(ValueError, match="prefix"):
        remove_stale("", root=str(tmp_path))
    with pytest.raises(ValueError, match="max_age_s"):
        remove_stale("ptsne-embed-", max_age_s=float("nan"), root=str(tmp_path))
    assert remove_stale("ptsne-embed-", root=str(tmp_path / "missing")) == []


def test_synth_to_a_fresh_output_still_works(tmp_path, capsys):
    assert main(["data", "synth", "--n", "50", "--dim", "2", "--output", str(tmp_path / "s"), "--no-ray"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["rows"] == 50


def test_named_ray_address(monkeypatch):
    from pipeline.session import named_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert named_address(None) is None and named_address("") is None and named_address("local") is None
    assert named_address("10.0.0.5:6379") == "10.0.0.5:6379" and named_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert named_address(None) == "ray://head:10001"
    assert named_address("10.0.0.5:6379") == "10.0.0.5:6379"  # the option wins over the environment


# -- a broken model is refused before Ray starts, naming its file (exit 4) ----------------------

#: Runs ``ptsne`` command lines in a fresh process and reports, for each, the exit code, the
#: ERROR log lines (with "Traceback" appended to one logged with its exception) and whether it
#: started Ray (spawned a raylet or GCS server).
_RUN_COMMANDS = r"""
import json, logging, sys

spawned, errors = [], []
sys.addaudithook(lambda event, args: spawned.append(repr(args[:2])) if event == "subprocess.Popen" else None)


class _Errors(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage() + ("\nTraceback" if record.exc_info else ""))


logging.getLogger().addHandler(_Errors())
from jobs.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    del spawned[:], errors[:]
    code = main(argv)
    results.append({"code": code, "errors": list(errors),
                    "ray": any("raylet" in s or "gcs_server" in s for s in spawned)})
print(json.dumps(results))
"""


def _run_commands(argvs: list[list[str]]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _RUN_COMMANDS, json.dumps(argvs)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flip_a_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _nan_weights(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    from ptsne import digest
    from ptsne.estimator import CONFIG_FILE, WEIGHTS_FILE

    tensors = load_file(str(model / WEIGHTS_FILE))
    key = next(k for k in sorted(tensors) if k.startswith("mapper.") and k.endswith("weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(model / WEIGHTS_FILE))
    digest.write(model, [CONFIG_FILE, WEIGHTS_FILE])  # consistent sums: the content check must catch it


def test_embed_refuses_a_broken_model_before_ray_starts(shards, tmp_path, mlflow_store):
    import mlflow

    from jobs import registry
    from jobs.tracking import configure_mlflow
    from ptsne import ParametricTSNE, digest
    from ptsne.estimator import CONFIG_FILE, WEIGHTS_FILE

    inp, _ = shards
    X = np.random.default_rng(1).normal(size=(120, 4)).astype(np.float32)
    good = ParametricTSNE(n_epochs=1, perplexity=5, hidden_layers=(8,), reference_size=0, random_state=0,
                          device="cpu").fit(X).save(tmp_path / "good")
    broken = {}  # name -> (model directory, the file the error must name, what it must say)

    def copy(name):
        import shutil

        return shutil.copytree(good, tmp_path / name)

    _flip_a_bit(copy("changed") / WEIGHTS_FILE)
    broken["changed"] = (tmp_path / "changed", WEIGHTS_FILE, "sha256")
    (copy("old-garbled") / digest.SUMS_FILE).unlink()  # saved before sums, and damaged since
    (tmp_path / "old-garbled" / CONFIG_FILE).write_text('{"format_version": 1,')
    broken["old-garbled"] = (tmp_path / "old-garbled", CONFIG_FILE, "not readable JSON")
    (copy("no-weights") / WEIGHTS_FILE).unlink()
    broken["no-weights"] = (tmp_path / "no-weights", WEIGHTS_FILE, "missing")
    _nan_weights(copy("nan"))
    broken["nan"] = (tmp_path / "nan", WEIGHTS_FILE, "non-finite")

    # A registered version whose stored weights and SHA256SUMS were both rewritten: its tags still differ.
    configure_mlflow()
    with mlflow.start_run():
        info = registry.log_model(ParametricTSNE.load(good))
    registry.register(info.model_uri, "demo", "prod")
    (stored,) = Path(mlflow_store["artifact_root"]).rglob(f"data/{registry.ESTIMATOR_DIR}")
    _flip_a_bit(stored / WEIGHTS_FILE)
    digest.write(stored, [CONFIG_FILE, WEIGHTS_FILE])

    def embed(model, output, *extra):
        return ["embed", "--model", str(model), "--input", str(inp), "--output", str(tmp_path / output),
                "--num-cpus", "2", "--no-progress", *extra]

    argvs = [embed(model, f"out-{name}") for name, (model, _, _) in broken.items()]
    argvs.append(embed(broken["changed"][0], "out-watch", "--watch", "--max-polls", "1", "--interval", "1"))
    argvs.append(embed("models:/demo@prod", "out-registered"))
    argvs.append(embed(good, "out-good"))  # the control: a good model does start Ray, and embeds
    *failed, registered, control = _run_commands(argvs)

    expected = [*broken.values(), broken["changed"]]
    for result, argv, (model, name, what) in zip(failed, argvs, expected):
        assert result["code"] == EXIT_NOT_FOUND and not result["ray"], (argv, result)
        (error,) = result["errors"]
        assert error.startswith(f"ptsne embed: {model / name}: ") and what in error and "Traceback" not in error, error
    assert registered["code"] == EXIT_NOT_FOUND and not registered["ray"], registered
    (error,) = registered["errors"]
    assert WEIGHTS_FILE in error and "recorded in the tags of models:/demo/1" in error, error
    assert control == {"code": EXIT_OK, "errors": [], "ray": True}
    assert sorted(p.name for p in tmp_path.glob("out-*")) == ["out-good"]


# -- a refused or idle embed run starts no Ray -------------------------------------------------


def test_embed_refused_or_idle_runs_start_no_ray(shards, tmp_path):
    """Output, lock and input are checked, and the ledger read, before Ray starts (exit codes of the README)."""
    import fcntl

    from pipeline.embed import LOCK_FILE
    from ptsne import ParametricTSNE

    inp, before = shards
    X = np.random.default_rng(1).normal(size=(120, 4)).astype(np.float32)
    model = ParametricTSNE(n_epochs=1, perplexity=5, hidden_layers=(8,), reference_size=0, random_state=0,
                           device="cpu").fit(X).save(tmp_path / "model")
    (tmp_path / "file").write_text("")
    unwritable = [tmp_path / "file" / "out", tmp_path / "file"]  # under a regular file; a regular file
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        (tmp_path / "ro-out").mkdir(mode=0o500)  # an existing output this user may not write to
        unwritable += [tmp_path / "ro" / "out", tmp_path / "ro-out"]
    (tmp_path / "empty").mkdir()  # nothing has arrived yet
    locked = tmp_path / "locked"
    locked.mkdir()

    def embed(input, output):
        return ["embed", "--model", str(model), "--input", str(input), "--output", str(output),
                "--num-cpus", "2", "--no-progress"]

    argvs = [embed(inp, out) for out in unwritable]
    argvs += [
        embed(tmp_path / "empty", tmp_path / "out-empty"),
        embed(tmp_path / "missing", tmp_path / "out-missing"),
        embed(inp, locked),
        embed(inp, tmp_path / "out"),  # the control: embeds both shards, so it starts Ray
        embed(inp, tmp_path / "out"),  # an idle cron run: nothing new
    ]
    fd = os.open(locked / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds that output
        *refused, empty, missing, busy, first, idle = _run_commands(argvs)
    finally:
        os.close(fd)

    for result, out in zip(refused, unwritable):
        assert result["code"] == EXIT_ERROR and not result["ray"], (out, result)
        (error,) = result["errors"]
        assert error.startswith(f"ptsne embed: --output: cannot write to {str(out)!r}: ") and "Traceback" not in error, error
    assert empty == {"code": EXIT_OK, "errors": [], "ray": False}
    assert missing["code"] == EXIT_NOT_FOUND and not missing["ray"], missing
    (error,) = missing["errors"]
    assert str(tmp_path / "missing") in error and "does not exist" in error, error
    assert busy["code"] == EXIT_ERROR and not busy["ray"], busy
    (error,) = busy["errors"]
    assert "another `ptsne embed` is writing to" in error and str(locked) in error, error
    assert first == {"code": EXIT_OK, "errors": [], "ray": True}
    assert idle == {"code": EXIT_OK, "errors": [], "ray": False}

    assert _snapshot(inp) == before
    assert (tmp_path / "file").read_text() == "" and sorted(p.name for p in locked.iterdir()) == [LOCK_FILE]
    if os.geteuid() != 0:
        assert not (tmp_path / "ro" / "out").exists() and not any((tmp_path / "ro-out").iterdir())

"""pipeline.storage on the local filesystem and on a real S3-protocol server."""

from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """``(filesystem, path, uri)`` of an empty directory on each kind of filesystem."""
    if request.param == "local":
        location = str(tmp_path / "root")
    else:
        location = request.getfixturevalue("s3").bucket() + "/root"
    fs, path = storage.resolve(location)
    return fs, path, location


def _files(fs, path) -> list[str]:
    if not storage.exists(fs, path):
        return []
    return sorted(
        f.path[len(path) + 1:] for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File
    )


def test_uri_round_trips(root):
    fs, path, location = root
    assert storage.uri(fs, path) == location
    again, again_path = storage.resolve(storage.uri(fs, storage.join(path, "a/b.parquet")))
    assert again_path == storage.join(path, "a/b.parquet")
    assert type(again) is type(fs)


def test_parquet_writer_streams_and_hashes(root):
    fs, path, _ = root
    target = storage.join(path, "sub", "t.parquet")
    table = pa.table({"a": list(range(1000)), "b": [float(i) for i in range(1000)]})
    with storage.parquet_writer(fs, target, table.schema) as sink:
        for batch in table.to_batches(max_chunksize=100):
            sink.write(batch)
    assert sink.rows == 1000
    data = storage.read_bytes(fs, target)
    assert sink.sha256 == hashlib.sha256(data).hexdigest() and sink.bytes == len(data)
    with fs.open_input_file(target) as f:
        assert pq.read_table(f).equals(table)
    assert _files(fs, path) == ["sub/t.parquet"]


def test_failed_write_leaves_nothing_and_keeps_the_old_file(root):
    fs, path, _ = root
    target = storage.join(path, "t.parquet")
    old = pa.table({"a": [1, 2, 3]})
    storage.write_parquet_atomic(fs, target, old)
    with pytest.raises(RuntimeError, match="boom"):
        with storage.parquet_writer(fs, target, old.schema) as sink:
            sink.write(pa.table({"a": [9] * 100}))
            raise RuntimeError("boom")
    assert _files(fs, path) == ["t.parquet"]
    with fs.open_input_file(target) as f:
        assert pq.read_table(f).equals(old)


def test_staged_dir_appears_whole(root):
    fs, path, _ = root
    final = storage.join(path, "out")
    with storage.StagedDir(fs, final, commit=("manifest.json",)) as stage:
        storage.write_bytes_atomic(fs, storage.join(stage, "edges", "part-0.parquet"), b"edges")
        storage.write_bytes_atomic(fs, storage.join(stage, "manifest.json"), b"{}")
        assert not storage.exists(fs, storage.join(final, "manifest.json"))
    assert _files(fs, final) == ["edges/part-0.parquet", "manifest.json"]
    assert storage.read_bytes(fs, storage.join(final, "edges", "part-0.parquet")) == b"edges"
    # Nothing is left beside it: the staging directory is gone.
    assert _files(fs, path) == ["out/edges/part-0.parquet", "out/manifest.json"]
    with pytest.raises(FileExistsError, match="not empty"):
        with storage.StagedDir(fs, final):
            pass


def test_failed_staged_dir_leaves_the_target_alone(root):
    fs, path, _ = root
    final = storage.join(path, "out")
    with pytest.raises(ValueError):
        with storage.StagedDir(fs, final) as stage:
            storage.write_bytes_atomic(fs, storage.join(stage, "x"), b"x")
            raise ValueError("stop")
    assert _files(fs, path) == []


def test_lock_refuses_a_second_writer(root):
    fs, path, _ = root
    with storage.lock(fs, path, ".lock", what="a test"):
        with pytest.raises(storage.LockedError, match=r"a test is writing to .* \(lea|lock"):
            with storage.lock(fs, path, ".lock"):
                pass
    with storage.lock(fs, path, ".lock"):  # released: free again
        pass


def test_expired_lease_is_taken_over(s3, monkeypatch):
    fs, path = storage.resolve(s3.bucket() + "/out")
    storage.write_bytes_atomic(fs, storage.join(path, ".lock"), b'{"holder": "dead:1:x", "expires": 0}')
    with storage.lock(fs, path, ".lock"):
        held = storage.read_json(fs, storage.join(path, ".lock"))
        assert held["holder"] != "dead:1:x"
    assert not storage.exists(fs, storage.join(path, ".lock"))


def test_is_ours_marks_only_our_names():
    assert storage.is_ours(".a.parquet.tmp-0123456789ab")
    assert storage.is_ours(".aff.partial-0123")
    for name in ("a.parquet", ".hidden.parquet", "x.tmp-1", "_ledger.jsonl"):
        assert not storage.is_ours(name)


# -- who holds a lock, and leases of killed holders ----------------------------------------------

_HOLD = r"""
import sys, time
from pipeline import storage
fs, path = storage.resolve(sys.argv[1])
with storage.lock(fs, path, ".lock", what="a holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holding_process(location):
    """A real process holding the lock ``location/.lock``, started and waited for."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, location], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(repo)))
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    return proc


def test_a_lock_held_by_another_process_names_it_and_is_free_once_it_is_killed(root):
    import signal
    import socket

    fs, path, location = root
    proc = _holding_process(location)
    try:
        with pytest.raises(storage.LockedError, match=rf"held by '?{socket.gethostname()}:{proc.pid}\b"):
            with storage.lock(fs, path, ".lock"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # A flock dies with its process; a lease of a process of this host that is gone is broken at once.
    with storage.lock(fs, path, ".lock"):
        held = storage.read_bytes(fs, storage.join(path, ".lock")).decode()
        assert f"{socket.gethostname()}:{__import__('os').getpid()}" in held


def test_a_live_or_remote_holders_lease_keeps_its_expiry(s3):
    import json
    import os
    import socket
    import time

    fs, path = storage.resolve(s3.bucket() + "/out")
    lease = storage.join(path, ".lock")
    dead = _dead_pid()
    future = time.time() + 60
    ns = storage.pid_namespace()
    for doc in (
        {"holder": f"other-host:{dead}:x", "expires": future, "pidns": ns},  # elsewhere: its pid means nothing here
        {"holder": f"{socket.gethostname()}:{os.getpid()}:x", "expires": future, "pidns": ns},  # alive
        {"holder": f"{socket.gethostname()}:{dead}:x", "expires": future},  # older lease: no namespace to judge by
        {"holder": f"{socket.gethostname()}:{dead}:x", "expires": future, "pidns": ns + "0"},  # another namespace
    ):
        storage.write_bytes_atomic(fs, lease, json.dumps(doc).encode())
        with pytest.raises(storage.LockedError, match=doc["holder"]):
            with storage.lock(fs, path, ".lock"):
                pass
        assert json.loads(storage.read_bytes(fs, lease)) == doc  # untouched


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- what counts as a changed file -----------------------------------------------------------------


def test_change_token_tells_a_rewrite_of_the_same_size_and_mtime(root):
    import os
    import time

    fs, path, _ = root
    storage.makedirs(fs, path)
    file = storage.join(path, "a.bin")
    if storage.is_local(fs):
        with open(file, "wb") as f:
            f.write(b"first")
        before_info = fs.get_file_info(file)
        (before,) = storage.change_tokens(fs, [file])
        time.sleep(0.01)
        with open(file, "r+b") as f:  # rewritten in place, then its mtime set back (as cp -p or rsync -t do)
            f.write(b"other")
        os.utime(file, ns=(before_info.mtime_ns, before_info.mtime_ns))
    else:
        # An object store's mtime has whole seconds: two writes within one second share it.
        while time.time() % 1 > 0.5:
            time.sleep(0.05)
        with fs.open_output_stream(file) as f:
            f.write(b"first")
        before_info = fs.get_file_info(file)
        (before,) = storage.change_tokens(fs, [file])
        with fs.open_output_stream(file) as f:
            f.write(b"other")
    after_info = fs.get_file_info(file)
    assert (after_info.size, after_info.mtime_ns) == (before_info.size, before_info.mtime_ns)
    (after,) = storage.change_tokens(fs, [file])
    assert before is not None and after is not None and before != after
    assert storage.change_tokens(fs, [file, file]) == [after, after]  # unchanged: the same token


@pytest.mark.parametrize("location", ["s3://b/./in", "s3://b/a/../in", "s3://b/in/.", "gs://b/x/.."])
def test_resolve_refuses_dot_segments_in_a_uri_naming_the_parameter(location):
    with pytest.raises(ValueError, match=r"^input '.+' has a '\.\.?' path segment; a URI's path must not contain"):
        storage.resolve(location, "input")
    with pytest.raises(ValueError, match="output"):
        storage.check_disjoint("data/in", location)


def test_local_dot_segments_are_normalised(tmp_path):
    fs, path = storage.resolve(str(tmp_path / "a" / ".." / "b" / "."))
    assert path == str(tmp_path / "b")
    storage.resolve("file://" + str(tmp_path / "a" / ".."))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a /proc filesystem")
def test_a_directory_that_takes_no_files_is_not_writable_even_for_root(tmp_path):
    local = pafs.LocalFileSystem()
    with pytest.raises(storage.OutputLocationError, match=r"cannot write to '/proc/x': files cannot be created in '/proc'"):
        storage.check_writable_dir(local, "/proc/x")
    storage.check_writable_dir(local, str(tmp_path / "new" / "dir"))
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind

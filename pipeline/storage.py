"""Files on any pyarrow filesystem: one I/O layer for every stage.

Every location a user gives (input shards, ``--workdir``, ``--affinities``,
``--storage-path``, a model directory, ``--output``) is a local path or a URI
of a pyarrow filesystem (``s3://``, ``gs://``, ``file://``, ...):
:func:`resolve` turns it into ``(filesystem, path)`` and :func:`uri` back.

Writes are never seen half done:

- a file is written under a hidden temporary name (``.NAME.tmp-XXXX``) next to
  its final name and moved into place. On a local or POSIX filesystem the move
  is a rename; on an object store (S3, GCS) it is a server-side copy, and the
  object appears whole or not at all. A failed write deletes its temporary
  file. Parquet is streamed (:func:`parquet_writer`): no whole-file buffer.
- a directory is built in a hidden staging sibling and moved into place at the
  end (:class:`StagedDir`); on an object store, where directories cannot be
  renamed, its files are copied into place with the ``commit`` files (the
  manifest) last, so a reader that waits for the manifest never sees a partial
  directory.
- one writer at a time per location (:func:`lock`): a ``flock`` on local
  filesystems, a lease object refreshed while the writer lives elsewhere; both
  name their holder (``host:pid``).

Names starting with ``.`` and containing ``.tmp-`` or ``.partial-`` are this
module's own; clean-up code may delete them and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import filelock
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

#: Marks of the hidden names this module creates (see :func:`is_ours`).
TMP_MARK = ".tmp-"
PARTIAL_MARK = ".partial-"
#: Seconds a lease on an object store stays valid without being refreshed.
LEASE_SECONDS = 120.0
#: Threads asking an object store for the ETags of a listing (one HEAD request per file).
TOKEN_THREADS = 16


def resolve(uri: str | os.PathLike, name: str = "path") -> tuple[pafs.FileSystem, str]:
    """Filesystem and path of a local path or URI (``s3://``, ``gs://``, ``file://``, ...).

    ``name`` names the parameter (or command-line option) in the messages.
    Raises :class:`ValueError` for a URI with ``.`` or ``..`` path segments
    (see :func:`check_segments`).
    """
    uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"{name} must be a non-empty string or path, got {uri!r}")
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    check_segments(uri, name)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def check_segments(uri: str | os.PathLike, name: str = "path") -> None:
    """Raise :class:`ValueError` when a URI's path has ``.`` or ``..`` segments.

    Local paths (and ``file://``) are normalised by the operating system. An
    object store keeps such a segment as part of the key: ``s3://b/./in`` would
    be another location than ``s3://b/in`` to every comparison, and S3 refuses
    to copy objects there. ``..`` could also leave the bucket's prefix the user
    meant, so the location is refused rather than rewritten.
    """
    uri = os.fspath(uri)
    if not isinstance(uri, str) or "://" not in uri:
        return
    scheme, rest = uri.split("://", 1)
    if scheme.lower() == "file":
        return
    bad = [s for s in rest.split("?", 1)[0].split("/") if s in (".", "..")]
    if bad:
        raise ValueError(
            f"{name} {uri!r} has a {bad[0]!r} path segment; a URI's path must not contain '.' or '..' "
            "segments (write the location without them)"
        )


def _location(uri: str | os.PathLike) -> str:
    """A comparable form of a path or URI: local paths (and ``file://``) resolved, other URIs as text."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return os.path.realpath(uri)
    scheme, rest = uri.split("://", 1)
    if scheme.lower() == "file":
        return os.path.realpath(rest or "/")
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def check_disjoint(first: str | os.PathLike, second: str | os.PathLike,
                   names: tuple[str, str] = ("input", "output")) -> None:
    """Raise :class:`ValueError` when two locations are the same or one lies inside the other.

    An output inside its input is read back as input by the next run; an input
    inside an output is deleted when that output is replaced. ``names`` name the
    two parameters (or command-line options) in the message.
    """
    check_segments(first, names[0])
    check_segments(second, names[1])
    a, b = _location(first), _location(second)
    if a == b:
        relation = "is the same location as"
    elif b.startswith(a.rstrip("/") + "/"):
        relation = "lies inside"
    elif a.startswith(b.rstrip("/") + "/"):
        relation = "contains"
    else:
        return
    raise ValueError(
        f"{names[1]} {os.fspath(second)!r} {relation} {names[0]} {os.fspath(first)!r}; "
        f"{names[0]} and {names[1]} must not contain each other (choose another {names[1]})"
    )


def join(*parts: str) -> str:
    """Join path parts with ``/`` (pyarrow filesystems use POSIX paths)."""
    return posixpath.join(*parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_empty_dir(fs: pafs.FileSystem, path: str) -> bool:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, recursive=False))


def fingerprint(fs: pafs.FileSystem, paths: Sequence[str]) -> list[list]:
    """``[path, size, mtime_ns]`` of each file, to tell whether an input changed."""
    out = []
    for info in fs.get_file_info(list(paths)):
        mtime = info.mtime_ns if info.mtime_ns is not None else None
        out.append([info.path, info.size, mtime])
    return out


def change_tokens(fs: pafs.FileSystem, paths: Sequence[str]) -> list[str | None]:
    """For each file, a token that changes whenever its content is rewritten, beyond its size and mtime.

    On an object store it is the object's ETag (one HEAD request per file, asked
    by :data:`TOKEN_THREADS` threads): a rewrite within the second of its
    modification time, with the same size, has another ETag. On a local
    filesystem it is the inode and the change time (``ctime``), which a rewrite
    sets and which neither ``touch`` nor copies that keep the mtime (``cp -p``,
    ``rsync -t``) can set back. None where the filesystem tells neither.
    """
    paths = list(paths)
    if is_local(fs) or len(paths) <= 1:
        return [_change_token(fs, p) for p in paths]
    with ThreadPoolExecutor(min(TOKEN_THREADS, len(paths)), thread_name_prefix="ptsne-etag") as pool:
        return list(pool.map(lambda p: _change_token(fs, p), paths))


def _change_token(fs: pafs.FileSystem, path: str) -> str | None:
    if is_local(fs):
        st = os.stat(path)
        return f"ino:{st.st_ino}:ctime:{st.st_ctime_ns}"
    with fs.open_input_file(path) as f:
        meta = f.metadata() or {}
    for key in ("ETag", b"ETag", "etag", b"etag"):
        value = meta.get(key) if hasattr(meta, "get") else None
        if value:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return "etag:" + text.strip('"')
    return None


def uri(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` on ``fs`` as one string: a local path, or ``scheme://path``."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if isinstance(fs, pafs.SubTreeFileSystem):
        return uri(fs.base_fs, join(fs.base_path, path))
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path.lstrip('/')}"


def is_local(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` is this machine's filesystem (where renames are atomic and flock works)."""
    return isinstance(fs, pafs.LocalFileSystem)


def renames(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` moves a directory by renaming it (local, HDFS) rather than not at all (object stores)."""
    return fs.type_name in ("local", "hdfs")


def is_ours(name: str) -> bool:
    """Whether a file or directory name is one of this module's temporary or staging names."""
    return name.startswith(".") and (TMP_MARK in name or PARTIAL_MARK in name)


def _tmp_sibling(path: str) -> str:
    head, name = posixpath.split(path)
    return join(head, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")


def makedirs(fs: pafs.FileSystem, path: str) -> None:
    """Create ``path`` and its parents (object stores have no directories: nothing to do there)."""
    fs.create_dir(path, recursive=True)


@contextlib.contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[pa.NativeFile]:
    """A stream to write ``path`` whole or not at all.

    Written under a hidden temporary sibling and moved to ``path`` when the block
    ends without an exception (replacing a file there); on an exception the
    temporary file is deleted and ``path`` is untouched. A kill leaves at most
    the temporary file (see :func:`is_ours`).
    """
    parent = posixpath.dirname(path)
    if parent:
        makedirs(fs, parent)
    tmp = _tmp_sibling(path)
    try:
        with fs.open_output_stream(tmp) as out:
            yield out
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if exists(fs, tmp):
                fs.delete_file(tmp)
        raise


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary name; return its sha256."""
    with atomic_output(fs, path) as out:
        out.write(data)
    return hashlib.sha256(data).hexdigest()


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def read_json(fs: pafs.FileSystem, path: str) -> object | None:
    """The JSON document at ``path``, or None when there is no file."""
    try:
        return json.loads(read_bytes(fs, path).decode())
    except FileNotFoundError:
        return None


class _HashingStream:
    """A file-like wrapper that hashes what passes through it (for :func:`parquet_writer`)."""

    def __init__(self, out: pa.NativeFile):
        self.out, self.sha, self.bytes = out, hashlib.sha256(), 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.bytes += view.nbytes
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def close(self) -> None:  # the outer context closes the real stream
        self.closed = True

    def tell(self) -> int:
        return self.bytes

    def writable(self) -> bool:
        return True


class ParquetSink:
    """What :func:`parquet_writer` yields: ``write(table)``, and after the block ``sha256``, ``bytes``, ``rows``."""

    def __init__(self, stream: _HashingStream, schema: pa.Schema, **options):
        self._stream = stream
        self._writer = pq.ParquetWriter(stream, schema, **options)
        self.rows = 0
        self.sha256: str | None = None
        self.bytes = 0

    def write(self, table: pa.Table | pa.RecordBatch, row_group_size: int | None = None) -> None:
        """Append ``table``; ``row_group_size`` caps the rows per row group (default: pyarrow's)."""
        self._writer.write(table, row_group_size=row_group_size)
        self.rows += table.num_rows

    def _close(self) -> None:
        self._writer.close()
        self.sha256, self.bytes = self._stream.sha.hexdigest(), self._stream.bytes


@contextlib.contextmanager
def parquet_writer(fs: pafs.FileSystem, path: str, schema: pa.Schema, **options) -> Iterator[ParquetSink]:
    """Stream Parquet to ``path`` (whole or not at all, as :func:`atomic_output`).

    ``options`` go to ``pyarrow.parquet.ParquetWriter`` (default zstd). After the
    block the sink knows the file's sha256, size and rows.
    """
    options.setdefault("compression", "zstd")
    with atomic_output(fs, path) as out:
        sink = ParquetSink(_HashingStream(out), schema, **options)
        try:
            yield sink
        finally:
            # Always close the writer (it holds the stream); an exception still discards the file.
            sink._close()


def write_parquet_atomic(
    fs: pafs.FileSystem, path: str, table: pa.Table, use_dictionary: bool | list[str] = True
) -> str:
    """Write ``table`` as Parquet to ``path`` through a temporary name; return its sha256.

    ``use_dictionary``: dictionary-encode every column (Parquet's default) or only those named.
    """
    with parquet_writer(fs, path, table.schema, use_dictionary=use_dictionary) as sink:
        sink.write(table)
    return sink.sha256


def sha256_file(fs: pafs.FileSystem, path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class OutputLocationError(OSError):
    """An output cannot be created where it was asked for; the message says why (one line)."""


def check_creatable(fs: pafs.FileSystem, path: str) -> None:
    """Raise :class:`OutputLocationError` when a local ``path`` and its hidden siblings cannot be created.

    Checked before any work: the nearest existing ancestor of ``path``'s parent
    must be a directory this user may write to. Other filesystems answer only
    when written to.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    problem = _uncreatable(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise OutputLocationError(f"cannot create {path!r}: {problem}")


def check_writable_dir(fs: pafs.FileSystem, path: str) -> None:
    """Raise :class:`OutputLocationError` unless files can be created in the local directory ``path``.

    ``path`` may exist (a directory this user may write to) or not (then its
    nearest existing ancestor must be). Checked before any work; other
    filesystems answer only when written to.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return
    problem = _uncreatable(os.path.abspath(path))
    if problem:
        raise OutputLocationError(f"cannot write to {path!r}: {problem}")


def _uncreatable(directory: str) -> str | None:
    """Why ``directory`` (created with its parents when missing) could not take new files, or None."""
    probe = directory
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no permission to write in {probe!r}"
    # os.access answers yes to root everywhere, also where nothing can be created (/proc, /sys, a
    # read-only mount): creating one of this module's hidden names there is the only real answer.
    try:
        fd, name = tempfile.mkstemp(prefix=f".probe{TMP_MARK}", dir=probe)
    except OSError as exc:
        return f"files cannot be created in {probe!r}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(name)
    return None


class StagedDir:
    """Build a directory in a hidden sibling and move it to ``path`` on success.

    On an exception the staging directory is deleted unless ``keep_on_error``
    (used to resume long jobs); ``path`` is never touched then. ``path`` must
    not exist, or be an empty directory, or ``overwrite`` must be true.

    Where the filesystem cannot rename directories (object stores) the staged
    files are copied into place, the names in ``commit`` (e.g. the manifest)
    last, and the staging directory is deleted afterwards.

    Parameters
    ----------
    fs, path : the final location.
    staging : str, optional
        Fixed staging path (to resume); default a fresh hidden sibling.
    commit : sequence of str
        Relative names copied last where directories are copied.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        path: str,
        staging: str | None = None,
        keep_on_error: bool = False,
        overwrite: bool = False,
        commit: Sequence[str] = (),
    ):
        self.fs, self.path = fs, path
        self.staging = staging or _tmp_sibling(path)
        self.keep_on_error = keep_on_error
        self.overwrite = overwrite
        self.commit = tuple(commit)

    def check_target(self) -> None:
        check_creatable(self.fs, self.path)
        if exists(self.fs, self.path) and not is_empty_dir(self.fs, self.path) and not self.overwrite:
            raise FileExistsError(
                f"output {self.path!r} exists and is not empty; choose another output or pass overwrite"
            )

    def __enter__(self) -> str:
        self.check_target()
        self.fs.create_dir(self.staging, recursive=True)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if not self.keep_on_error and exists(self.fs, self.staging):
                self.fs.delete_dir(self.staging)
            return
        self.check_target()
        if exists(self.fs, self.path):
            self.fs.delete_dir(self.path)
        if renames(self.fs):
            self.fs.move(self.staging, self.path)
            return
        files = [f.path for f in self.fs.get_file_info(pafs.FileSelector(self.staging, recursive=True))
                 if f.type == pafs.FileType.File]
        rel = {p: posixpath.relpath(p, self.staging) for p in files}
        for p in sorted(files, key=lambda p: (rel[p] in self.commit, rel[p])):
            self.fs.copy_file(p, join(self.path, rel[p]))
        self.fs.delete_dir(self.staging)


# --------------------------------------------------------------------------- one writer at a time


class LockedError(RuntimeError):
    """Another writer holds the location (the message names it and the lock)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is alive; True when that cannot be told (another user's)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def pid_namespace() -> str:
    """The id of this process's pid namespace ('' where the OS does not tell).

    Two processes with one hostname (containers sharing the host's network) may
    live in different pid namespaces, where a pid means another process: a pid
    is judged dead only by a process of the same namespace.
    """
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        return ""


def _holder_is_gone(lease: dict) -> bool:
    """Whether a lease's holder (``host:pid:...``) ran on this host, in this pid namespace, and is gone."""
    host, _, rest = str(lease.get("holder", "")).partition(":")
    pid = rest.split(":", 1)[0]
    ns = str(lease.get("pidns") or "")
    return (host == socket.gethostname() and ns != "" and ns == pid_namespace() and pid.isdigit()
            and not pid_alive(int(pid)))


def _local_holder(path: str) -> str:
    """The holder a local lock file names (written by the process that holds the flock)."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4096).decode())
        return str(doc["holder"])
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _name_local_holder(path: str, holder: str) -> None:
    # Written in place: the flock belongs to this inode, which a rename would replace.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"holder": holder, "since": time.time()}).encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock(fs: pafs.FileSystem, directory: str, name: str, what: str = "a writer") -> Iterator[None]:
    """Hold the lock ``directory/name`` for the block, or raise :class:`LockedError` at once.

    Local filesystems: an exclusive lock on the file through ``filelock``
    (``flock`` on Unix, released by the OS when the process dies; the file
    stays), which names its holder (``host:pid``) for the message of the next
    writer refused. Elsewhere: a lease object naming its holder and expiry,
    refreshed every ``LEASE_SECONDS / 4`` by a thread and deleted at the end; a
    lease not refreshed for ``LEASE_SECONDS`` (its holder died) is taken over,
    and so at once is a lease whose holder ran on this host, in this pid
    namespace, and is gone (killed with SIGKILL). Object stores cannot create a
    file only if it is absent, so two writers starting within the same second
    could both win: the lease guards against overlapping scheduled runs, not
    against a race.
    """
    makedirs(fs, directory)
    path = join(directory, name)
    if is_local(fs):
        local = filelock.FileLock(path)
        try:
            local.acquire(blocking=False)
        except filelock.Timeout:
            raise LockedError(
                f"{what} is writing to {directory!r} (lock {name} held by {_local_holder(path)}); "
                "wait for it or stop it"
            ) from None
        try:
            _name_local_holder(path, f"{socket.gethostname()}:{os.getpid()}")
            yield
        finally:
            local.release()
        return
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        current = read_json(fs, path)
    except ValueError:  # a damaged lease names no holder that could still be writing
        log.warning("the lease %s is not readable JSON; taking it over", uri(fs, path))
        current = None
    if isinstance(current, dict) and current.get("holder") != holder and float(current.get("expires", 0)) > time.time():
        if not _holder_is_gone(current):
            raise LockedError(
                f"{what} is writing to {directory!r} (lease {name} held by {current.get('holder')!r} until "
                f"{time.strftime('%H:%M:%S', time.gmtime(float(current['expires'])))} UTC); wait for it or stop it"
            )
        log.warning("taking over the lease %s of %s: that process of this host is gone",
                    uri(fs, path), current.get("holder"))
    namespace = pid_namespace()

    def renew() -> None:
        doc = {"holder": holder, "expires": time.time() + LEASE_SECONDS, "pidns": namespace}
        write_bytes_atomic(fs, path, json.dumps(doc).encode())

    renew()
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LEASE_SECONDS / 4):
            try:
                renew()
            except OSError:
                log.warning("could not refresh the lease %s", path, exc_info=True)

    thread = threading.Thread(target=refresh, name="ptsne-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError, ValueError):
            mine = read_json(fs, path)
            if isinstance(mine, dict) and mine.get("holder") == holder:
                fs.delete_file(path)

"""sha256 sums of a saved model's files: written by ``ParametricTSNE.save``, checked on every load.

A model directory holds ``SHA256SUMS`` in the format of coreutils' ``sha256sum``
(``<hex>  <file name>``, one line per file), so ``sha256sum -c SHA256SUMS`` checks
it as well. The sums catch a file changed or damaged after the save. Whoever can
rewrite the files can rewrite the sums too; a registered model therefore keeps a
copy of them in its MLflow model version (``jobs.registry``), against which the
downloaded files are checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ptsne.errors import DigestMismatchError, ModelFileError

log = logging.getLogger(__name__)

#: Name of the sums file inside a saved model directory.
SUMS_FILE = "SHA256SUMS"

_LINE = re.compile(r"^(?P<hex>[0-9a-f]{64}) [ *](?P<name>[^/\\]+)$")
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def compute(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: hex sha256}`` of the files ``names`` in ``directory``."""
    return {name: file_sha256(Path(directory, name)) for name in sorted(names)}


def write(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, str]:
    """Write ``SHA256SUMS`` for the files ``names`` of ``directory``; returns the sums.

    Meant for a directory still under its temporary name (``ParametricTSNE.save``
    renames the whole directory into place).
    """
    sums = compute(directory, names)
    Path(directory, SUMS_FILE).write_text("".join(f"{h}  {name}\n" for name, h in sums.items()))
    return sums


def read(directory: str | os.PathLike) -> dict[str, str] | None:
    """The sums recorded in ``directory``'s ``SHA256SUMS``; None when it has none.

    Raises
    ------
    ModelFileError
        ``SHA256SUMS`` exists but is not in ``sha256sum``'s format.
    """
    file = Path(directory, SUMS_FILE)
    if not file.is_file():
        return None
    try:
        lines = file.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(file, f"not readable ({exc})") from None
    sums = {}
    for number, line in enumerate(lines, 1):
        m = _LINE.match(line)
        if m is None:
            raise ModelFileError(file, f"line {number} is not '<64 hex digits>  <file name>': {line[:80]!r}")
        sums[m["name"]] = m["hex"]
    return sums


def verify(
    directory: str | os.PathLike,
    names: Iterable[str],
    expected: Mapping[str, str] | None = None,
    source: str = SUMS_FILE,
) -> bool:
    """Check the files ``names`` of ``directory`` against their recorded sha256.

    Parameters
    ----------
    directory : path
        A saved model directory.
    names : iterable of str
        The files that must match (each must have a recorded sum).
    expected : mapping, optional
        ``{name: hex sha256}`` recorded elsewhere (a registered model version);
        default: the directory's own ``SHA256SUMS``.
    source : str
        Where ``expected`` was recorded, for the messages.

    Returns
    -------
    bool
        True when every file matched; False (with a warning) when ``expected`` is
        not given and the directory has no ``SHA256SUMS`` (a model saved before
        sums were recorded), so nothing could be checked.

    Raises
    ------
    DigestMismatchError
        A file whose sha256 differs from the recorded one, or that has none recorded.
    ModelFileError
        A file that is missing or unreadable.
    """
    directory = Path(directory)
    if expected is None:
        expected = read(directory)
        if expected is None:
            log.warning(
                "%s has no %s (saved before model files carried sha256 sums): its files are not "
                "checked for changes; save it again to add them", directory, SUMS_FILE,
            )
            return False
    for name in sorted(names):
        file = directory / name
        want = expected.get(name)
        if want is None:
            raise DigestMismatchError(file, f"no sha256 recorded for it in {source}")
        try:
            got = file_sha256(file)
        except FileNotFoundError:
            raise ModelFileError(file, "missing: the model directory is incomplete") from None
        except OSError as exc:
            raise ModelFileError(file, f"not readable ({exc})") from None
        if got != want.lower():
            raise DigestMismatchError(
                file,
                f"sha256 {got} differs from {want} recorded in {source}: the file was changed or "
                "damaged after the model was saved; restore it or save the model again",
            )
    return True


def recorded_sha256(directory: str | os.PathLike, name: str) -> str:
    """The sha256 of file ``name`` of a model directory: as its ``SHA256SUMS`` records it, else computed.

    The recorded sum is what every load checks the file against, so it names the
    file's content without reading it again; a model saved before sums were
    recorded has its file hashed here.

    Raises
    ------
    ModelFileError
        The file is missing (and has no recorded sum), or ``SHA256SUMS`` is malformed.
    """
    recorded = (read(directory) or {}).get(name)
    if recorded is not None:
        return recorded.lower()
    file = Path(directory, name)
    try:
        return file_sha256(file)
    except FileNotFoundError:
        raise ModelFileError(file, "missing: the model directory is incomplete") from None

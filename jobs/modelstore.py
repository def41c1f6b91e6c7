"""Saved models at any location: a local directory or a URI of a pyarrow filesystem (``s3://...``).

:meth:`ptsne.estimator.ParametricTSNE.save` and ``ParametricTSNE.load`` work on
local directories (the core package knows no filesystem layer). Here a model is
saved into a private temporary directory and its files reach the location as one
directory through :class:`pipeline.storage.StagedDir`: renamed into place on a
local filesystem; copied on an object store, ``SHA256SUMS`` and the ``extra``
files last, so that a reader who finds those finds the whole model. Loading
from a URI downloads the model's files into a temporary directory first; its
errors name the files at the location, not the temporary copies.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping, Sequence

import pyarrow.fs as pafs

from jobs import tempdirs
from pipeline import storage
from ptsne import digest
from ptsne.errors import ModelFileError
from ptsne.estimator import CONFIG_FILE, MODEL_FILES, ParametricTSNE

log = logging.getLogger(__name__)

#: Prefix of the temporary directories of saves and downloads (see :mod:`jobs.tempdirs`).
TEMP_PREFIX = "ptsne-model-"


def save_model(estimator: ParametricTSNE, location: str, extra: Mapping[str, bytes] | None = None) -> str:
    """Write the fitted ``estimator`` as a model directory at ``location``, whole or not at all.

    Parameters
    ----------
    estimator : ParametricTSNE
        A fitted estimator.
    location : str
        Local path or URI of the model directory. An existing one is replaced
        only when it holds a saved model (and the ``extra`` files) and nothing
        else; any other content is left alone (``FileExistsError``).
    extra : mapping of str to bytes, optional
        Further files of the directory (for example a stamp of how the model was
        made), ``{file name: content}``; written last.

    Returns
    -------
    str
        ``location``.
    """
    extra = dict(extra or {})
    for name in extra:
        if not isinstance(name, str) or not name or "/" in name or name in MODEL_FILES or name.startswith("."):
            raise ValueError(
                f"save_model: extra file name {name!r} must be a plain, non-hidden file name other than "
                f"{sorted(MODEL_FILES)}"
            )
    fs, path = storage.resolve(location)
    _check_replaceable(fs, path, location, set(extra))
    with tempdirs.make(TEMP_PREFIX) as tmp:
        saved = estimator.save(os.path.join(tmp, "model"))
        commit = (digest.SUMS_FILE, *sorted(extra))
        with storage.StagedDir(fs, path, overwrite=True, commit=commit) as staging:
            pafs.copy_files(str(saved), staging, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            for name, data in sorted(extra.items()):
                storage.write_bytes_atomic(fs, storage.join(staging, name), data)
    log.debug("saved the model to %s", location)
    return location


def check_saveable(location: str, extra: Sequence[str] = ()) -> None:
    """Raise ``FileExistsError`` when :func:`save_model` would refuse ``location`` (checked before any work).

    ``extra`` names the extra files the save will write (they may be there already).
    """
    fs, path = storage.resolve(location)
    _check_replaceable(fs, path, location, set(extra))


def load_model(location: str, device: str = "cpu") -> ParametricTSNE:
    """Load the model directory at ``location`` (local path or URI) onto ``device``.

    Checks as :meth:`ParametricTSNE.load` does (sha256 sums, config, weights).

    Raises
    ------
    FileNotFoundError
        ``location`` holds no ``config.json``.
    ptsne.errors.ModelFileError
        A model file is missing, corrupt or does not fit the rest; the message
        starts with the file's path at ``location``.
    """
    fs, path = storage.resolve(location)
    if storage.is_local(fs):
        return ParametricTSNE.load(path, device=device)
    with tempdirs.make(TEMP_PREFIX) as tmp:
        local = pafs.LocalFileSystem()
        present = {posixpath.basename(f.path) for f in fs.get_file_info(
            [storage.join(path, name) for name in sorted(MODEL_FILES)]) if f.type == pafs.FileType.File}
        if CONFIG_FILE not in present:
            raise FileNotFoundError(f"load_model: no {CONFIG_FILE} in {location!r}")
        for name in sorted(present):
            pafs.copy_files(storage.join(path, name), os.path.join(tmp, name),
                            source_filesystem=fs, destination_filesystem=local)
        try:
            return ParametricTSNE.load(tmp, device=device)
        except ModelFileError as exc:
            problem = exc.problem.replace(tmp, location)
            raise type(exc)(storage.join(location, os.path.basename(exc.file)), problem) from None


def _check_replaceable(fs: pafs.FileSystem, path: str, location: str, allowed: set[str]) -> None:
    """Refuse to replace anything at ``path`` but a saved model (with the ``allowed`` extra files)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise FileExistsError(f"{location!r} exists and is not a model directory; choose another location or remove it")
    keep = MODEL_FILES | allowed
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    other = sorted(
        rel for rel in (posixpath.relpath(f.path, path) for f in found if f.type == pafs.FileType.File)
        if rel not in keep and not storage.is_ours(posixpath.basename(rel))
    )
    if other:
        shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
        raise FileExistsError(
            f"{location!r} holds files other than a saved model ({shown}); it is left as it is: "
            "choose another location"
        )

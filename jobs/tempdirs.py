"""Private temporary directories of ``ptsne`` commands, named so that a later run can remove what a killed one left.

A directory is named ``PREFIX<pid>-n<namespace>-<random>`` after the process
that made it and its pid namespace (:func:`pipeline.storage.pid_namespace`).
Nothing but a process's own clean-up removes it on a normal exit; a process
killed with SIGKILL leaves it behind. :func:`remove_stale` removes, in the
system temp directory, only directories whose name starts with the prefix and
that belong to this user: at once when their process, of this pid namespace, is
gone; otherwise (a name of another namespace, whose pid means another process
here, or of older versions: ``PREFIX<pid>-<random>``, or no pid) only when
older than ``max_age_s`` and, where the name has a pid, that pid is gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time

from pipeline.storage import pid_alive, pid_namespace

log = logging.getLogger(__name__)

#: Leftovers younger than this are kept (a run may still be starting).
STALE_AFTER_S = 3600.0


def make(prefix: str) -> tempfile.TemporaryDirectory:
    """A fresh ``PREFIX<pid>-n<namespace>-<random>`` directory in the system temp directory."""
    namespace = pid_namespace()
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-" + (f"n{namespace}-" if namespace else ""))


def remove_stale(prefix: str, max_age_s: float = STALE_AFTER_S, root: str | None = None) -> list[str]:
    """Remove this user's ``prefix*`` directories under ``root`` (default: the system temp directory)
    whose process is gone: at once when the name says it ran in this pid namespace, else once older
    than ``max_age_s`` seconds; return their paths."""
    if not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    if not max_age_s >= 0:
        raise ValueError(f"max_age_s must be >= 0, got {max_age_s!r}")
    root = root or tempfile.gettempdir()
    named_pid = re.compile(rf"^{re.escape(prefix)}(\d+)-(?:n(\d+)-)?")
    namespace = pid_namespace()
    now = time.time()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        log.debug("cannot list %s: %s", root, exc)
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
                continue
        except OSError:
            continue
        m = named_pid.match(entry.name)
        if m is not None and pid_alive(int(m.group(1))):
            continue
        ours_here = m is not None and namespace != "" and m.group(2) == namespace
        if not ours_here and now - st.st_mtime < max_age_s:
            continue
        try:
            shutil.rmtree(entry.path)
        except OSError as exc:
            log.warning("could not remove the stale temporary directory %s: %s", entry.path, exc)
            continue
        removed.append(entry.path)
    if removed:
        log.info("removed %d stale temporary director%s left by killed runs: %s",
                 len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed

"""Private temporary directories of ``ptsne`` commands, named so that a later run can remove what a killed one left.

A directory is named ``PREFIX<pid>-<random>`` after the process that made it.
Nothing but a process's own clean-up removes it on a normal exit; a process
killed with SIGKILL leaves it behind. :func:`remove_stale` removes, in the
system temp directory, only directories whose name starts with the prefix,
that belong to this user, are older than ``max_age_s`` and whose process is
gone (for names without a pid, written by older versions: by age alone).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time

log = logging.getLogger(__name__)

#: Leftovers younger than this are kept (a run may still be starting).
STALE_AFTER_S = 3600.0


def make(prefix: str) -> tempfile.TemporaryDirectory:
    """A fresh ``PREFIX<pid>-<random>`` directory in the system temp directory."""
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid we can ask about: keep it
    return True


def remove_stale(prefix: str, max_age_s: float = STALE_AFTER_S, root: str | None = None) -> list[str]:
    """Remove this user's ``prefix*`` directories under ``root`` (default: the system temp directory)
    that are older than ``max_age_s`` seconds and whose process is gone; return their paths."""
    if not prefix:
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
    if not max_age_s >= 0:
        raise ValueError(f"max_age_s must be >= 0, got {max_age_s!r}")
    root = root or tempfile.gettempdir()
    named_pid = re.compile(rf"^{re.escape(prefix)}(\d+)-")
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
        if now - st.st_mtime < max_age_s:
            continue
        m = named_pid.match(entry.name)
        if m is not None and _pid_alive(int(m.group(1))):
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

"""Guarding the cache: one writer at a time, disk faults named with their fix, folder faults diagnosed.

* :func:`cache_lock` — an exclusive ``fcntl.flock`` on ``<folder>.lock`` around each fetch
  and conversion: one process works, the others wait (up to ``$CYCLELAB_LOCK_TIMEOUT`` seconds, default
  900) and then reuse its result; the lock file names the process holding it, so a timeout says who.
* :func:`disk_message` — a full disk (ENOSPC) or a refused write (EACCES, EPERM, EROFS) as a
  :class:`ModelFileError` naming the folder, the cause and the fix.
* :func:`diagnose` — what is wrong with a cache folder (missing, a file, a dangling link, a loop,
  unreadable, unwritable, partly written), in one sentence with a fix that works; the loader's errors and
  ``cyclelab doctor`` both use it, so they say the same thing.

Standard library only (no torch): ``doctor`` imports it cheaply.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from cyclelab.loading.checksums import ModelFileError

LOCK_TIMEOUT_ENV = "CYCLELAB_LOCK_TIMEOUT"
CACHE_ENV = "CYCLELAB_CACHE"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
PARTIAL = ".partial"  # suffix of a folder being built (a conversion's staging folder)


def lock_timeout() -> float:
    """Seconds to wait for another process's fetch or conversion: ``$CYCLELAB_LOCK_TIMEOUT`` or 900."""
    try:
        return float(os.environ.get(LOCK_TIMEOUT_ENV) or 900)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {os.environ[LOCK_TIMEOUT_ENV]!r}")


_HELD: set[Path] = set()  # locks this process holds (taking one again inside it is a no-op)


def lock_path(folder: Path) -> Path:
    """The lock file guarding ``folder``: ``<folder>.lock`` beside it."""
    return folder.with_name(folder.name + ".lock")


@contextmanager
def cache_lock(folder: Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock on ``folder`` (its file :func:`lock_path`) inside the block; wait for another holder.

    A lock dies with its process (the kernel drops a ``flock`` when the file is closed), so a killed run
    never leaves the cache locked; the holder removes the file when done. :class:`ModelFileError` names
    the holder after ``timeout`` seconds (default :func:`lock_timeout`).
    """
    path = lock_path(folder)
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (lock_timeout() if timeout is None else timeout)
    f = _acquire(path, deadline, folder)
    _HELD.add(path)
    try:
        f.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}) since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        _HELD.discard(path)
        path.unlink(missing_ok=True)  # before unlocking: a waiter then sees its file is stale and opens anew
        f.close()


def _acquire(path: Path, deadline: float, folder: Path) -> IO[str]:
    """The lock file, open and locked: the one at ``path`` now (not one its last holder removed)."""
    while True:
        f = open(path, "a+")  # noqa: SIM115 - closed by cache_lock
        try:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ModelFileError(_busy(folder, f)) from None
                    time.sleep(0.05)
            if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                f.truncate(0)
                return f
        except BaseException:
            f.close()
            raise
        f.close()


def _busy(folder: Path, f: IO[str]) -> str:
    f.seek(0)
    holder = f.read().strip() or "another process"
    return (
        f"{folder} is being written by {holder}, which still holds {lock_path(folder)}: wait for it "
        f"to finish (or stop it), then run the command again; set {LOCK_TIMEOUT_ENV} to wait longer than "
        f"{lock_timeout():.0f} s"
    )


def holder(folder: Path) -> str | None:
    """Who is writing ``folder`` now (the line its lock file holds), or None when nobody is."""
    try:
        with open(lock_path(folder)) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def free_mb(folder: Path) -> int:
    """Megabytes free on the disk that holds ``folder`` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free // 2**20


def disk_message(err: OSError, folder: Path, need_mb: int, repair: str) -> str | None:
    """A full disk or a refused write under ``folder`` as a sentence naming the cause and the fix; None otherwise.

    ``need_mb`` is about what the operation writes; ``repair`` is the command that retries it.
    """
    where = err.filename or folder
    if err.errno in NO_SPACE:
        return (
            f"the disk holding {folder} is full ({err.strerror}: {where}; {free_mb(folder)} MB free now): "
            f"free at least {need_mb} MB there, or set {CACHE_ENV} to a folder on a disk with room, then {repair}"
        )
    if err.errno in REFUSED:
        return (
            f"cannot write in {folder} ({err.strerror}: {where}): fix the permissions (`chmod -R u+w {folder}`, "
            f"or ask its owner), or set {CACHE_ENV} to a folder you can write, then {repair}"
        )
    return None


def as_os_error(text: str, path: Path) -> OSError | None:
    """The full-disk or refused-write OSError that an error's text reports (safetensors' ``SafetensorError``
    and pip's messages carry the errno as ``code: 28`` or ``[Errno 28]``), or None."""
    for found in re.findall(r"(?:code: |\[Errno )(\d+)", text):
        if int(found) in NO_SPACE + REFUSED:
            return OSError(int(found), os.strerror(int(found)), str(path))
    if "No space left" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


SET_CACHE = f"or `export {CACHE_ENV}=<a folder you can write>`"


def diagnose(folder: Path, repair: str, root: Path | None = None) -> str | None:
    """What is wrong with the cache folder ``folder``, as a sentence ending in a fix that works; None if nothing.

    Checks ``root`` (the cache) and each folder between it and ``folder`` first (a file, a link that
    loops or leads nowhere, no access), then ``folder`` itself, which must also hold ``.complete``.
    ``repair`` is the command that (re)builds it (e.g. "run `cyclelab fetch smollm2`"): the fix for a
    missing or partly written folder; a file, a link or a permission in the way gets its own fix first.
    """
    writer = holder(folder)
    if writer:
        return f"{folder} is being written now by {writer}: wait for it to finish, then `cyclelab doctor` again"
    above = [root / p for p in reversed(folder.relative_to(root).parents)] if root else []
    for path in [*above, folder]:
        problem = _structure(path, repair, path == folder)
        if problem:
            return f"{problem}: {_writable(folder, repair)}" if problem.endswith(" is missing") else problem
    if not (folder / ".complete").exists():
        return f"{folder} is partly written (an interrupted fetch or conversion): {_writable(folder, repair)}"
    return None


def blocking(folder: Path, repair: str, root: Path | None = None) -> str | None:
    """The fault of :func:`diagnose` that ``repair`` alone cannot fix (a file, a link, a permission in the
    way), or None: a missing or partly written folder is what a fetch or conversion rebuilds."""
    above = [root / p for p in reversed(folder.relative_to(root).parents)] if root else []
    return next((p for p in (_structure(path, repair, False) for path in [*above, folder]) if p), None)


def _structure(path: Path, repair: str, needed: bool) -> str | None:
    """A file, a looping or dangling link, or a refused read in place of the folder ``path``.

    A missing ``path`` is a fault only when ``needed`` (the folder itself, not the cache above it).
    """
    try:
        os.stat(path)
    except OSError as err:
        problem = _unreachable(path, err, repair)
        return problem if needed or not problem.endswith("missing") else None
    if not path.is_dir():
        return f"{path} is a file, not a folder: move it away (`mv {path} {path}.bak`), then {repair}"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{path} is not readable for you: `chmod -R u+rX {path}` (or ask its owner), {SET_CACHE}"
    return None


def _unreachable(folder: Path, err: OSError, repair: str) -> str:
    """A folder that ``stat`` refuses: a link loop, a dangling link, a file above it, or simply absent."""
    if err.errno == errno.ELOOP:
        return f"{folder} is a symbolic link that loops (it leads back to itself): `rm {folder}`, then {repair}"
    if folder.is_symlink():
        return (
            f"{folder} is a symbolic link to {os.readlink(folder)}, which does not exist: "
            f"`rm {folder}` (or restore what it points to), then {repair}"
        )
    blocker = next((p for p in reversed(folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{folder} cannot exist: {blocker} is a file, not a folder: move the file away, {SET_CACHE}"
    if err.errno in REFUSED:
        return f"{folder} cannot be reached ({err.strerror}): `chmod u+rx` the folders above it, {SET_CACHE}"
    return f"{folder} is missing"


def _writable(folder: Path, repair: str) -> str:
    """``repair``, or, when the folder (or its nearest existing parent) is read-only, what must come first."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if "read-only" in repair or os.access(parent, os.W_OK):
        return repair
    return (
        f"{parent} is read-only for you, so first `chmod u+w {parent}` (or ask its owner), {SET_CACHE}; then {repair}"
    )

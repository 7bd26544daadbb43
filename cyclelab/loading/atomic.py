"""Saving files safely: a crash or a full disk never leaves half a file, and JSON is always strict.

:func:`write_atomic` is what every ``save`` in cyclelab goes through; :func:`strict_json` refuses
NaN and infinity (which ``json.dumps`` would write as the non-JSON ``NaN``), naming the field.
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash or a full disk leaves the old file whole.

    The bytes go to a temporary file beside ``path``, are flushed and fsynced, and only then
    renamed over ``path`` (``os.replace``); on any error the temporary file is removed and
    the error raised, with ``path`` untouched.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise _named(err, path) from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tmp: Path) -> None:
    """Remove a temporary file if there is one (where it could not be made, removing fails too: EACCES, EROFS)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


_FIXES = {
    errno.ENOSPC: "the disk is full: free some space, or save to another disk",
    errno.EDQUOT: "your disk quota is used up: free some space, or save to another disk",
    errno.EROFS: "the file system is read-only: save to a folder you can write, e.g. your home folder",
    errno.EACCES: "permission denied: save to a folder you can write, or fix its permissions (chmod u+w)",
    errno.EPERM: "permission denied: save to a folder you can write, or fix its permissions (chmod u+w)",
    errno.ENOENT: "its folder does not exist: create it first (mkdir -p), or save elsewhere",
    errno.ENOTDIR: "a part of its path is a file, not a folder: save elsewhere",
    errno.EISDIR: "it is a folder: give the name of a file to save",
}


def _named(err: OSError, path: Path) -> OSError:
    """``err`` (same type and errno, so callers that look at either still can) with a message naming ``path``,
    the cause and its fix; the old file, if any, is untouched."""
    cause = _FIXES.get(err.errno or 0, f"{err.strerror or err}: check the folder and the disk")
    named = type(err)(f"cannot save {path}: {cause} (nothing was written; an old file there is untouched)")
    named.errno = err.errno  # (a strerror or filename would put back the raw "[Errno N]" form)
    return named


_READ_CAUSES = {
    errno.ENOENT: "there is no such file: check the path",
    errno.EISDIR: "it is a folder: give the path of a file in it",
    errno.ELOOP: "it is a symbolic link that loops: point the link at the real file",
    errno.EACCES: "permission denied: fix its permissions (chmod u+r) or copy it somewhere you can read",
    errno.EPERM: "permission denied: fix its permissions (chmod u+r) or copy it somewhere you can read",
}


def read_text(path: Path, what: str) -> str:
    """``path``'s text (UTF-8); an OSError of the same type and errno, whose message names ``what``, the path,
    the cause and its fix, when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        cause = _READ_CAUSES.get(err.errno or 0, f"{err.strerror or err}: check the file and the disk")
        named = type(err)(f"cannot read the {what} {path}: {cause}")
        named.errno = err.errno  # (a strerror or filename would put back the raw "[Errno N]" form)
        raise named from None


def strict_loads(text: str):
    """Parse standard JSON only: ``NaN``/``Infinity`` and a key given twice in one object are ``ValueError``
    (Python's json would accept both: the second key silently winning)."""
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def strict_json(data, what: str, **options) -> str:
    """``data`` as standard JSON; ``ValueError`` naming the first NaN or infinite number and its field."""
    bad = _non_finite(data, "")
    if bad is not None:
        field, value = bad
        raise ValueError(
            f"cannot save {what} as JSON: {field or 'the value'} is {value!r}, which JSON cannot hold "
            f"(give a finite number, then save again)"
        )
    return json.dumps(data, allow_nan=False, **options)


def _non_finite(value, field: str) -> tuple[str, float] | None:
    """The first (field, value) in ``value`` that is a NaN or infinite float, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return field, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(
            item,
            f"{field}.{key}"
            if isinstance(key, str) and field
            else str(key)
            if isinstance(key, str)
            else f"{field}[{key}]",
        )
        if found:
            return found
    return None

"""Saving files safely: a crash or a full disk never leaves half a file, and JSON is always strict.

:func:`write_atomic` is what every ``save`` in cyclelab goes through; :func:`strict_json` refuses
NaN and infinity (which ``json.dumps`` would write as the non-JSON ``NaN``), naming the field.
"""

from __future__ import annotations

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
        tmp.unlink(missing_ok=True)
        if err.filename == str(tmp):  # name the file the caller asked for, not the temporary one
            raise type(err)(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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

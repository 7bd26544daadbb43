"""The plumbing of the debugger's user commands: the :func:`command` decorator and argument checks."""

from __future__ import annotations

import functools
from collections.abc import Callable

from cyclelab.loading.schema import is_int


def command(method: Callable) -> Callable:
    """A user command: clears the last error, records a new one, and tells the listeners (the widget)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        self.error = ""
        self._before = self._shown  # State.changed: the views that differ from those shown before this command
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            for listener in self._listeners:
                listener()

    return run


def check_int(value, low: int, high: int, name: str) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value

"""Numbers that print the same on every machine.

A notebook's checked outputs (cells tagged ``nbval-check-output``) must not depend on the CPU, the
thread count or the device. Float arithmetic does: the last bits of a sum change with the
order in which threads add it up. So a checked cell prints a tolerance check (a boolean),
an integer, a greedy token, or a value rounded well above that noise. These helpers do
the rounding for the cases where a fixed number of decimals is not enough: values that
are zero up to noise (whose sign flips) and values that span many orders of magnitude.
"""

from __future__ import annotations

import math


def round_sig(value: float, digits: int = 2) -> float:
    """``value`` rounded to ``digits`` significant digits (``22712.3 -> 23000.0``).

    A large value keeps its magnitude while dropping the low digits that noise can move.
    """
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an integer >= 1, got {digits!r}")
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value)))) + 0.0


def sig(value: float, digits: int = 2) -> str:
    """:func:`round_sig` as text without a trailing ``.0``: ``sig(22712.3) == "23000"``."""
    rounded = round_sig(value, digits)
    return f"{rounded:.0f}" if abs(rounded) >= 10 ** (digits - 1) else f"{rounded:.{digits}g}"


def signed(value: float, decimals: int = 3) -> str:
    """``value`` with a sign and ``decimals`` places, where noise around zero prints ``+0.000``
    (never ``-0.000``, whose sign would depend on the machine)."""
    return f"{round(float(value), decimals) + 0.0:+.{decimals}f}"

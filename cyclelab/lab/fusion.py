"""Fusion and compilation: the same arithmetic in fewer torch ops.

Each torch op pays a fixed dispatch cost and, on a large tensor, writes its result to memory for
the next op to read back (chapter 07, section 1). :func:`gelu_by_ops` writes GPT-2's tanh GELU as
separate elementwise ops; ``torch.nn.functional.gelu(x, approximate="tanh")`` is the same formula
in one fused kernel; :func:`try_compile` asks ``torch.compile`` to fuse the separate ops itself.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

_C = math.sqrt(2 / math.pi)


def gelu_by_ops(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, one elementwise torch op at a time."""
    cube = x * x * x
    inner = (x + 0.044715 * cube) * _C
    return 0.5 * x * (1 + torch.tanh(inner))


def gelu_fused(x: torch.Tensor) -> torch.Tensor:
    """The same function as one torch op (one kernel)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def try_compile(fn: Callable, *example) -> tuple[Callable | None, float, str]:
    """``(compiled fn, seconds of the first call, "")``; or ``(None, 0.0, why)`` where ``torch.compile``
    cannot run here (no C++ compiler, unsupported platform). The first call is where compiling happens."""
    start = time.perf_counter()
    try:
        compiled = torch.compile(fn)
        compiled(*example)
    except Exception as error:  # inductor raises many types (BackendCompilerFailed, OSError, ...)
        return None, 0.0, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return compiled, time.perf_counter() - start, ""

"""The engine's own kernels, in C (``kernels.c``): decode's matrix-vector products (float32 weights, and int8
weights with a float32 scale per row), attention for one query position, RMSNorm and RoPE.

Decode multiplies one vector by every weight matrix, so its time is the time to *read* the matrices; the rest
of a decode step is small arithmetic on a few vectors, where each torch op costs more in dispatch than in work.
On some CPUs a plain AVX2 loop reads weights faster than torch's own GEMV, and torch ships no fast weight-only
int8 kernel for x86 CPUs without AVX-512; on others torch is faster. So:

* :mod:`.build` compiles ``kernels.c`` once, into a private per-user folder, and loads it only after proving
  that no other user could have changed it (``CYCLELAB_KERNELS=auto|own|torch`` chooses);
* :mod:`.choice` times the own kernel against torch's once per shape (``auto``) and keeps the faster;
* :mod:`.products` calls a kernel where it applies (few rows of float32 on the CPU, no gradient) and torch
  elsewhere: the same numbers, to float rounding;
* :mod:`.int8` is the int8 weight format that ``load(..., dtype="int8")`` makes.
"""

from .build import SOURCE, KernelStatus, KernelsWarning, compiled, status
from .choice import choice_report
from .int8 import Int8Linear, is_int8, quantize_symmetric, to_int8
from .products import (
    MANY_ROWS,
    PER_THREAD,
    f32_conv1d,
    f32_linear,
    f32_linears,
    fused_mix,
    fused_rms_norm,
    fused_rope,
    fused_scores,
    fused_softmax,
    int8_linear,
    int8_linears,
    settle_step,
    torch_float32,
)

__all__ = [
    "SOURCE",
    "KernelStatus",
    "KernelsWarning",
    "choice_report",
    "compiled",
    "status",
    "Int8Linear",
    "is_int8",
    "quantize_symmetric",
    "to_int8",
    "MANY_ROWS",
    "PER_THREAD",
    "f32_conv1d",
    "f32_linear",
    "f32_linears",
    "fused_mix",
    "fused_rms_norm",
    "fused_rope",
    "fused_scores",
    "fused_softmax",
    "int8_linear",
    "int8_linears",
    "settle_step",
    "torch_float32",
]

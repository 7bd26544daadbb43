"""The sha256 of a model's weights, hashed in full only when a byte may have changed since the last time.

A trace, a lesson and a cached :func:`~cyclelab.load` record or check the sha256 of every weight byte (SmolLM2:
538 MB, about 0.3 s at sha256's 1.7 GB/s). Every ``generate()`` asks for it, and most of those asks find the
weights as they were. So each model keeps, beside its last digest, a *stamp* of its weights taken just before
that digest: per tensor its name, shape, strides, dtype, address, version counter and CRC-32 of all its bytes,
the CRCs computed in a few threads (zlib releases the GIL), at about memory speed. A stamp equal to the one kept
gives back the digest kept; any other stamp hashes every byte again. Why an unchanged stamp means unchanged weights:

* a tensor replaced, moved or reshaped changes its address, shape or strides;
* every in-place torch op on a weight (an optimizer step, ``copy_``, ``load_state_dict``, ``w[0, 0] += 1``)
  bumps its version counter, whatever it writes;
* an edit that bypasses the counter (through ``.data``, ``.numpy()`` or a pointer) changes the bytes, and the CRC
  sees every change confined to 32 consecutive bits (one float32 value, four int8 codes) without fail; a wider
  one escapes only if the XOR of old and new bytes is a multiple of the CRC polynomial: odds of 2^-32 for an edit
  not built to collide. (The digest guards against mistakes, not forgers: a trace file's recorded fingerprint is
  plain JSON that anyone can rewrite.)

The stamp is taken *before* the bytes are hashed, so an edit made meanwhile leaves a stamp that no later one
matches: the next call hashes again. Weights off the CPU are hashed in full every time. The recorded value is the
same sha256 as ever, so the fingerprints of saved traces and lessons still match.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (stamp, sha256 hex)
_LOCK = threading.Lock()
THREADED = 32 << 20  #: weights of more bytes than this are CRC'd in several threads


def weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A model's parameters by name, and the codes and scales of its int8 Linears (buffers ``.q``, ``.scale``)."""
    return list(model.named_parameters()) + [
        (name, b) for name, b in model.named_buffers() if name.endswith((".q", ".scale"))
    ]


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of every weight's name, shape, dtype and bytes: any change to any value changes it. Hashed again only
    when the weights' stamp (see the module's docstring) differs from the one taken at the last hash."""
    tensors = weight_tensors(model)
    if not all(t.device.type == "cpu" for _, t in tensors):
        return full_sha256(tensors)
    stamp = _stamp(tensors)
    with _LOCK:
        kept = _KEPT.get(model)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    digest = full_sha256(tensors)
    with _LOCK:
        _KEPT[model] = (stamp, digest)
    return digest


def full_sha256(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 of each tensor's name, shape and dtype and all of its bytes, in order."""
    h = hashlib.sha256()
    for name, p in tensors:
        h.update(f"{name} {tuple(p.shape)} {p.dtype};".encode())
        h.update(_bytes(p))
    return h.hexdigest()


def _bytes(p: torch.Tensor) -> memoryview:
    return p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _stamp(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    """Per tensor: name, shape, strides, dtype, address, version counter, then the CRC-32 of its bytes."""
    fields = [(name, tuple(p.shape), p.stride(), p.dtype, p.data_ptr(), p._version) for name, p in tensors]
    buffers = [_bytes(p) for _, p in tensors]
    if sum(b.nbytes for b in buffers) > THREADED and _workers() > 1:
        with ThreadPoolExecutor(_workers()) as pool:
            crcs = list(pool.map(zlib.crc32, buffers))
    else:
        crcs = [zlib.crc32(b) for b in buffers]
    return tuple(fields), tuple(crcs)


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores, 8))

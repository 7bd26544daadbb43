"""Fingerprints that tell models apart: sha256 digests of every weight byte and of the vocabulary. A trace or a
lesson records its model's fingerprint, and replaying it on another model (or one edited in place) is refused."""

from __future__ import annotations

import hashlib
import weakref

import torch

from cyclelab.loading.digest import weight_tensors as _weight_tensors
from cyclelab.loading.digest import weights_sha256
from cyclelab.loading.loader import Loaded

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> digest


def fingerprint(loaded: Loaded) -> dict[str, str]:
    """sha256 digests that tell models apart: ``weights`` (every parameter's name, shape, dtype and all of
    its bytes; an int8 Linear's codes and scales likewise) and ``tokenizer`` (its vocabulary).

    Every call checks every weight byte, so any change shows, even one made through ``.data``: by a CRC and the
    version counters (about 0.1 s for SmolLM2), hashing in full (0.3 s) only when they moved
    (:mod:`cyclelab.loading.digest` says why that is exact); a run computes it once, never per token.
    """
    return {"weights": weights_sha256(loaded.model), "tokenizer": tokenizer_digest(loaded.tokenizer)}


def legacy_weights_digest(model: torch.nn.Module) -> str:
    """The weights digest of cyclelab before full-byte hashing (a strided sample of ~1,000 values per
    parameter): lessons and trace files recorded then carry it, and still open on their model."""
    h = hashlib.sha256()
    for name, p in _weight_tensors(model):
        flat = p.detach().reshape(-1)
        h.update(f"{name} {tuple(p.shape)} {p.dtype};".encode())
        h.update(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the vocabulary (of the class name, for a stand-in tokenizer without one)."""
    if tokenizer not in _TOKENIZERS:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {type(tokenizer).__qualname__: 0}
        text = "\n".join(f"{i} {token}" for token, i in sorted(vocab.items(), key=lambda item: item[1]))
        _TOKENIZERS[tokenizer] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return _TOKENIZERS[tokenizer]

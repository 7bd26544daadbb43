"""What crosses between a check and the learner's process: values as JSON, tensors as raw bytes, never pickle.

A message is one frame: the length of a JSON header, the header, then each tensor's bytes (dtype and shape
are in the header). Plain data (None, bool, int, float, str, list, tuple, dict with any such keys, set) is
encoded as tagged JSON; a tensor or numpy array as its bytes; an object that cannot travel by value (a model,
an engine, an optimizer, a gradient function) by the ``ref`` the caller gives for it (see
:mod:`cyclelab.checks.recipes`), and a value that is none of these (a learner's own object) as its type name
and ``repr``, an :class:`Opaque` on the other side.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable

import torch

LENGTH = struct.Struct("<Q")
MAX_FRAME = 1 << 30  # a header or a tensor larger than this is a broken stream, not a value


class Opaque:
    """A value that could not travel: its ``repr`` is the learner's, its type is named like the learner's."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


def _opaque(type_name: str, text: str) -> Opaque:
    return type(type_name if type_name.isidentifier() else "object", (Opaque,), {})(text)


class Encoder:
    """Encode one message; ``ref(obj)`` is the JSON for an object that travels by reference, or None."""

    def __init__(self, ref: Callable[[object], object | None] = lambda obj: None) -> None:
        self.ref, self.blobs = ref, []

    def __call__(self, value):  # noqa: C901, PLR0911 - one branch per kind of value
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value if abs(value) < 2**53 else {"int": str(value)}
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, (list, tuple, set, frozenset)):
            kind = {list: "list", tuple: "tuple"}.get(type(value), "set")
            return {kind: [self(v) for v in value]}
        if isinstance(value, dict):
            return {"dict": [[self(k), self(v)] for k, v in value.items()]}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        ref = self.ref(value)
        if ref is not None:
            return {"ref": ref}
        if type(value).__module__ == "numpy":
            if hasattr(value, "shape") and value.shape != ():
                return {"numpy": self.tensor(torch.from_numpy(value.copy()))}
            return self(value.item())
        return {"opaque": [type(value).__name__, _repr(value)]}

    def tensor(self, value: torch.Tensor) -> dict:
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        data = b"" if flat.numel() == 0 else flat.view(torch.uint8).numpy().tobytes()
        self.blobs.append(data)
        dtype = str(flat.dtype).removeprefix("torch.")
        return {"tensor": [len(self.blobs) - 1, dtype, list(value.shape), value.requires_grad]}


def _repr(value) -> str:
    try:
        return repr(value)[:300]
    except Exception as err:  # noqa: BLE001 - a learner's __repr__ may raise anything
        return f"<{type(value).__name__} whose repr raised {type(err).__name__}>"


class Decoder:
    """Decode one message; ``ref(json)`` makes the object a reference names."""

    def __init__(self, blobs: list[bytes], ref: Callable[[object], object] | None = None) -> None:
        self.blobs, self.ref = blobs, ref

    def __call__(self, data):  # noqa: PLR0911
        if not isinstance(data, dict):
            return data
        ((kind, body),) = data.items()
        if kind in ("list", "tuple", "set"):
            items = [self(v) for v in body]
            return {"list": list, "tuple": tuple, "set": set}[kind](items)
        if kind == "dict":
            return {self(k): self(v) for k, v in body}
        if kind == "int":
            return int(body)
        if kind == "float":
            return float(body)
        if kind == "tensor":
            return self.tensor(body)
        if kind == "numpy":
            return self.tensor(body["tensor"]).numpy()
        if kind == "ref" and self.ref is not None:
            return self.ref(body)
        if kind == "opaque":
            return _opaque(str(body[0]), str(body[1]))
        raise ValueError(f"a message holds an unknown kind of value {kind!r}")

    def tensor(self, body) -> torch.Tensor:
        index, dtype, shape, grad = body
        kind = getattr(torch, dtype)
        if not isinstance(kind, torch.dtype):
            raise ValueError(f"not a tensor dtype: {dtype}")
        data = self.blobs[index]
        if not data:
            out = torch.empty(shape, dtype=kind)
        else:
            out = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(kind).reshape(shape)
        return out.requires_grad_(grad) if grad and out.is_floating_point() else out


def send(stream, header: dict, blobs: list[bytes] = ()) -> None:
    """Write one frame: the header (JSON) and the blobs it names."""
    text = json.dumps(header).encode()
    parts = [LENGTH.pack(len(text)), text, LENGTH.pack(len(blobs))]
    for blob in blobs:
        parts += [LENGTH.pack(len(blob)), blob]
    stream.write(b"".join(parts))
    stream.flush()


def receive(stream) -> tuple[dict, list[bytes]]:
    """Read one frame; EOFError when the stream ended, ValueError when it is not a frame."""

    def exactly(n: int) -> bytes:
        if n > MAX_FRAME:
            raise ValueError(f"a frame of {n} bytes is past the limit")
        data = bytearray()
        while len(data) < n:  # a pipe may give a frame in parts
            part = stream.read(n - len(data))
            if not part:
                raise EOFError("the other process ended mid-frame" if data else "the other process ended")
            data += part
        return bytes(data)

    header = json.loads(exactly(LENGTH.unpack(exactly(LENGTH.size))[0]))
    count = LENGTH.unpack(exactly(LENGTH.size))[0]
    if count > 1 << 16:
        raise ValueError(f"a frame of {count} tensors is past the limit")
    blobs = [exactly(LENGTH.unpack(exactly(LENGTH.size))[0]) for _ in range(count)]
    if not isinstance(header, dict):
        raise ValueError("a frame's header is not an object")
    return header, blobs

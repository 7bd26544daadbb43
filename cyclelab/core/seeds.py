"""Seeding torch's CPU generator from the whole documented range, 0..2**64 - 1.

``torch.Generator.manual_seed`` on the CPU initialises its Mersenne Twister (MT19937) from the
low 32 bits of the seed only, so ``seed`` and ``seed + 2**32`` would draw the same numbers.
A seed below 2**32 is passed to ``manual_seed`` as before (stored runs keep their tokens); a larger
one fills the twister's state with MT19937's reference ``init_by_array`` of the seed's two 32-bit
halves, which gives every seed its own stream. Other devices (CUDA's Philox) use all 64 bits already.
"""

from __future__ import annotations

import functools
import hashlib
import struct

import torch

_MASK = 0xFFFFFFFF
_N = 624
_STATE_AT = 24  # byte offset of the 624 uint64 words of state in the CPU generator's get_state()


def seed_generator(generator: torch.Generator, seed: int) -> torch.Generator:
    """Seed ``generator`` with ``seed`` (0..2**64 - 1) so that different seeds give different streams."""
    generator.manual_seed(seed)
    if seed <= _MASK or generator.device.type != "cpu":
        return generator
    if not layout_ok():  # another torch: hash the seed onto the 2**32 seeds manual_seed tells apart
        digest = hashlib.sha256(seed.to_bytes(8, "little")).digest()
        return generator.manual_seed(int.from_bytes(digest[:4], "little"))
    state = generator.get_state().clone()
    words = struct.pack(f"<{_N}Q", *_init_by_array([seed & _MASK, seed >> 32]))
    state[_STATE_AT : _STATE_AT + len(words)] = torch.frombuffer(bytearray(words), dtype=torch.uint8)
    generator.set_state(state)
    return generator


@functools.cache
def layout_ok() -> bool:
    """True when this torch's CPU generator state has the layout :func:`seed_generator` writes into."""
    generator = torch.Generator().manual_seed(5)
    head = bytes(generator.get_state()[: _STATE_AT + 16].tolist())
    return struct.unpack_from("<2Q", head, _STATE_AT) == tuple(_init_genrand(5)[:2])


def _init_genrand(seed: int) -> list[int]:
    mt = [seed & _MASK] + [0] * (_N - 1)
    for i in range(1, _N):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & _MASK
    return mt


def _init_by_array(key: list[int]) -> list[int]:
    """MT19937's reference seeding from an array of 32-bit words (Matsumoto and Nishimura, 2002)."""
    mt, i, j = _init_genrand(19650218), 1, 0
    for _ in range(max(_N, len(key))):
        mt[i] = ((mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525)) + key[j] + j) & _MASK
        i, j = i + 1, (j + 1) % len(key)
        if i >= _N:
            mt[0], i = mt[_N - 1], 1
    for _ in range(_N - 1):
        mt[i] = ((mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941)) - i) & _MASK
        i += 1
        if i >= _N:
            mt[0], i = mt[_N - 1], 1
    mt[0] = 0x80000000
    return mt

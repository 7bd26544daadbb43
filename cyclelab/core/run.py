"""The state of one forward pass (core): its cycle, what it captures and what it ablates.

:class:`RunContext` travels through the blocks of :mod:`cyclelab.core.blocks`; :class:`Ablation` names the heads
and MLPs switched off; :func:`capture_rule` turns a capture spec into a predicate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter

import torch

from cyclelab.core.events import Event
from cyclelab.core.ops import REGISTRY
from cyclelab.loading.schema import is_int


@dataclass(frozen=True)
class Ablation:
    """Parts of the model switched off: attention heads as (layer, head), MLPs by layer."""

    heads: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    mlps: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        """Any collections of ints become frozensets; anything else is a TypeError.
        (Whether a layer or head exists is checked by the engine, which knows the model.)"""
        heads, mlps = _int_collection(self.heads, "heads", pairs=True), _int_collection(self.mlps, "mlps")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "mlps", mlps)

    def __bool__(self) -> bool:
        return bool(self.heads or self.mlps)


def _int_collection(items, name: str, pairs: bool = False) -> frozenset:
    """``items`` as a frozenset of ints (of (int, int) tuples if ``pairs``); else a TypeError naming ``name``."""

    def valid(item) -> bool:
        return isinstance(item, (tuple, list)) and len(item) == 2 and all(map(is_int, item)) if pairs else is_int(item)

    given = items
    items = list(items) if isinstance(items, Iterable) and not isinstance(items, (str, bytes, dict)) else None
    if items is None or not all(map(valid, items)):
        what = "(layer, head) pairs of integers" if pairs else "layer numbers (integers)"
        raise TypeError(f"ablation {name} must be a collection of {what}, got {given!r}")
    return frozenset(tuple(i) for i in items) if pairs else frozenset(items)


Capture = Callable[[str, int | None], bool]


def capture_rule(spec) -> Capture:
    """Turn a capture spec into a predicate ``(op, layer) -> bool``.

    ``None`` captures nothing, ``"all"`` everything, a collection of op names those
    ops, and a callable is used as it is.
    """
    if spec is None:
        return lambda op, layer: False
    if spec == "all":
        return lambda op, layer: True
    if callable(spec):
        return spec
    names = frozenset(spec)
    return lambda op, layer: op in names


@dataclass
class RunContext:
    """The state of one forward pass: its cycle, what to capture, what is ablated, and (RoPE
    families) the rotary tables of its positions.

    It travels through ``forward``, ``embed``, ``block`` and ``unembed``; nothing of a run is
    stored on the shared :class:`Architecture`, so two runs on one engine can interleave.
    """

    cycle: int = 0
    capture: Capture = field(default_factory=lambda: capture_rule(None))
    ablation: Ablation = field(default_factory=Ablation)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), set by a RoPE family's embed

    def event(
        self, op: str, layer: int | None, start: float, flops: int = 0, nbytes: int = 0, **tensors: torch.Tensor
    ) -> Event:
        """An event for ``op`` (its stage from the op registry) that began at ``start``;
        tensors kept only if captured."""
        keep = tensors if self.capture(op, layer) else {}
        return Event(self.cycle, REGISTRY[op].stage, layer, op, perf_counter() - start, flops, nbytes, keep)

"""Which kernels run, chosen by measurement: the own C kernel or torch's, per kernel family and shape.

An own kernel is only worth using where it is faster than torch's *on this machine*: a plain AVX2 loop beats
torch's GEMV on some CPUs (an AMD EPYC) and loses on others (an AVX-512 Xeon). So in ``CYCLELAB_KERNELS=auto``
(the default) the first call of each shape times both (the fastest of a few runs each, taking turns: a few ms;
the fastest, not the median, since another process on a shared machine only ever adds time)
and keeps the faster; the engine is thus never slower than on torch's kernels, to the timing's noise. Each later
call is one dict lookup. ``own`` forces the own kernels, ``torch`` forces torch's.

The timings are kept in ``choices.json`` in the private kernels folder (:func:`build.private_folder`, proven
private as the library is), keyed by the CPU model, torch's version and thread count, and the kernels' source
digest: when any of them changes, everything is measured again. A damaged file, or one another user could have
written, is ignored (and replaced).

A shape timed alone runs cache-hot, and can win or lose differently inside a whole decode step (where the weights
stream through the caches between ops). So the engine also times whole steps of the model at hand, once
(:meth:`Chooser.settle_step`): its shapes as chosen one by one, all on the own kernels, all on torch's, in turns;
the fastest of the three decides every shape the step used. Torch's path is one of the three, so the engine
stays never slower than on torch's kernels, to the timing's noise.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from . import build

FAMILIES = {"f32": "float32 GEMV", "int8": "int8 GEMV", "fused": "fused attention/norm/rope"}
REPEATS = 7  #: timed runs of each side (the fastest counts), after one warm-up run each
STEP_REPEATS = 5  #: timed decode steps of each variant in :meth:`Chooser.settle_step`, after one warm-up each
SLOW_STEP = 0.05  #: a warm-up step slower than this (seconds) is timed twice per variant, not STEP_REPEATS times
STEP_VARIANTS = ("auto", "own", "torch")  #: each shape as chosen alone, all own kernels, all torch's
CACHE_NAME = "choices.json"
MARGIN = 0.1  #: closer than this, a timing is measured again and not kept on disk (either side is as good)
Timer = Callable[[str, Callable[[], object]], float]  # (side: "own" | "torch", run) -> seconds of one run


def wall_timer(side: str, run: Callable[[], object]) -> float:
    """Seconds of one call of ``run`` (``side`` names it, for a test's stand-in)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key() -> dict:
    """What the timings depend on; a cache made under another key is measured again."""
    return {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "source": build.source_digest(),
    }


class Chooser:
    """Decides own vs torch per ``(family, shape)`` by timing both once; remembers it in memory and in ``folder``
    (None: in memory only). ``timer`` is injectable (tests pass a fake one)."""

    def __init__(self, folder: Path | None, timer: Timer = wall_timer, key: dict | None = None):
        self.folder, self.timer, self.key = folder, timer, key
        self.decided: dict[tuple, bool] = {}
        self.timings: dict[str, tuple[float, float]] = {}  # str(family, shape) -> (own s, torch s)
        self.steps: dict[str, dict] = {}  # step name -> {"seconds": {variant: s}, "winner": variant, "shapes": [..]}
        self._recording: set[tuple] | None = None  # the shapes a step asks for, while settle_step records them
        self._overrides: dict[str, bool] = {}  # shape name -> own?, as a timed step decided it
        self._loaded, self._lock = False, threading.Lock()

    def use_own(self, family: str, shape: tuple, own: Callable[[], object], theirs: Callable[[], object]) -> bool:
        """True where the own kernel is faster for this shape: measured (``own()`` vs ``theirs()``) at first use,
        unless a whole step's timing (:meth:`settle_step`) decided it."""
        found = self.decided.get((family, shape))
        if found is None:
            found = self._decide(family, shape, own, theirs)
        if self._recording is not None:
            self._recording.add((family, shape))
        return found

    def settle_step(self, name: str, step: Callable[[], object]) -> str:
        """Time whole decode steps (``step()`` runs one; ``name`` says of which model) in the three
        :data:`STEP_VARIANTS`, in turns, the fastest of :data:`STEP_REPEATS` each; the fastest variant decides every
        shape the step used, in this process and (a clear result) in later ones. Returns the variant chosen."""
        self._load()
        known = self.steps.get(name)
        if known is not None:
            self._apply(known)
            return known["winner"]
        self._recording = set()
        try:
            step()  # each shape decided alone (and timed, at its first use), and recorded
        finally:
            used, self._recording = sorted(self._recording, key=repr), None
        chosen = {key: self.decided[key] for key in used}
        variants = {"auto": chosen, "own": dict.fromkeys(used, True), "torch": dict.fromkeys(used, False)}
        seconds = dict.fromkeys(variants, float("inf"))
        try:
            rounds, round_ = STEP_REPEATS + 1, 0
            while round_ < rounds:
                for variant, decisions in variants.items():
                    self.decided.update(decisions)
                    took = self.timer(variant, step)
                    if round_:  # round 0 warms each variant up
                        seconds[variant] = min(seconds[variant], took)
                    elif took > SLOW_STEP:  # a slow model: fewer rounds keep the first run short
                        rounds = 3
                round_ += 1
        finally:
            self.decided.update(chosen)
        winner = min(seconds, key=lambda v: seconds[v])
        found = {"seconds": seconds, "winner": winner, "shapes": [_name(f, s) for f, s in used]}
        self.steps[name] = found
        self._apply(found)
        if clear(seconds[winner], min(s for v, s in seconds.items() if v != winner)):
            self._save()
        return winner

    def _apply(self, step: dict) -> None:
        """Decide each shape of a timed step as its winning variant does (``auto``: as each shape chose alone)."""
        if step["winner"] != "auto":
            names = set(step["shapes"])
            for key in [k for k in self.decided if _name(*k) in names]:
                self.decided[key] = step["winner"] == "own"
            self._overrides.update(dict.fromkeys(names, step["winner"] == "own"))

    def _decide(self, family: str, shape: tuple, own: Callable, theirs: Callable) -> bool:
        with self._lock:
            self._load()
            name = _name(family, shape)
            if name in self._overrides:  # a whole step's timing decided it
                self.decided[(family, shape)] = self._overrides[name]
                return self._overrides[name]
            if name not in self.timings:
                own_s, torch_s = self.measure(own, theirs)
                if not clear(own_s, torch_s):  # a near tie may be noise: measure once more, keep the faster of both
                    again = self.measure(own, theirs)
                    own_s, torch_s = min(own_s, again[0]), min(torch_s, again[1])
                self.timings[name] = (own_s, torch_s)
                if clear(own_s, torch_s):  # only a clear result is kept for later processes
                    self._save()
            own_s, torch_s = self.timings[name]
            self.decided[(family, shape)] = own_s < torch_s
            return own_s < torch_s

    def measure(self, own: Callable, theirs: Callable) -> tuple[float, float]:
        """The fastest seconds of ``own`` and of ``theirs``, run in turns after a warm-up each (fewer runs for slow ones):
        interference from other processes only ever adds time, so the minimum is the least noisy estimate."""
        warm = self.timer("own", own) + self.timer("torch", theirs)
        repeats = REPEATS if warm < 0.02 else 3
        own_s, torch_s = [], []
        for _ in range(repeats):
            own_s.append(self.timer("own", own))
            torch_s.append(self.timer("torch", theirs))
        return min(own_s), min(torch_s)

    # --- the cache file ----------------------------------------------------------
    def _key(self) -> dict:
        if self.key is None:
            self.key = machine_key()
        return self.key

    def _load(self) -> None:
        """Read the cache file once (the timings of an earlier process on this machine), if it is sound and ours."""
        if self._loaded:
            return
        self._loaded = True
        data = read_cache(self.folder)
        if data is not None and data.get("key") == self._key():
            self.timings.update(data["timings"])
            self.steps.update(data["steps"])
            for step in data["steps"].values():
                self._apply(step)

    def _save(self) -> None:
        if self.folder is None:
            return
        try:
            folder = build.verified_folder(self.folder, create=True)
            earlier = read_cache(folder)
            same = earlier is not None and earlier.get("key") == self._key()
            timings = dict(earlier["timings"]) if earlier and same else {}
            steps = dict(earlier["steps"]) if earlier and same else {}
            timings.update(self.timings)
            steps.update(self.steps)
            text = json.dumps(
                {"key": self._key(), "timings": {k: list(v) for k, v in timings.items()}, "steps": steps}, indent=1
            )
            build.write_private(folder / CACHE_NAME, text)
        except (OSError, build.UnsafeKernels):
            pass  # no cache: the next process measures again

    def report_lines(self) -> list[str]:
        """One line per measured shape: both timings and the choice; then one per timed decode step."""
        self._load()
        lines = []
        for name, (own_s, torch_s) in sorted(self.timings.items()):
            pick = "own" if self._overrides.get(name, own_s < torch_s) else "torch"
            by = " (by its step's timing)" if name in self._overrides else ""
            lines.append(
                f"  {name}: own {own_s * 1e3:.3f} ms, torch {torch_s * 1e3:.3f} ms -> {pick}{by} "
                f"(own is {torch_s / own_s:.2f}x torch's speed)"
                if own_s > 0
                else f"  {name}: {pick}{by}"
            )
        for name, step in sorted(self.steps.items()):
            each = ", ".join(f"{v} {step['seconds'][v] * 1e3:.2f} ms" for v in STEP_VARIANTS)
            lines.append(f"  {name}: {each} -> {step['winner']} for its {len(step['shapes'])} shapes")
        return lines

    def summary(self) -> str:
        """Per family: how many measured shapes use the own kernel, and the own kernels' speed ratio."""
        self._load()
        parts = []
        for family, label in FAMILIES.items():
            ratios = [t / o for name, (o, t) in self.timings.items() if name.startswith(family + " ") and o > 0]
            if ratios:
                own = sum(r > 1 for r in ratios)
                parts.append(
                    f"{label}: own on {own}/{len(ratios)} shapes (own/torch speed "
                    f"{min(ratios):.2f}x to {max(ratios):.2f}x)"
                )
        return "; ".join(parts) if parts else "nothing measured yet (each shape is timed at its first use)"


def clear(own_s: float, torch_s: float, margin: float = MARGIN) -> bool:
    """True when one side is faster by more than ``margin`` (a fraction): a result worth keeping on disk."""
    return max(own_s, torch_s) > (1 + margin) * min(own_s, torch_s)


def _name(family: str, shape: tuple) -> str:
    return f"{family} {shape}"


def read_cache(folder: Path | None) -> dict | None:
    """The cache file's content if it is a regular file of this user's that no one else can write, in a private
    folder, and well formed; else None."""
    if folder is None:
        return None
    try:
        fd = build.open_private_file(build.verified_folder(folder) / CACHE_NAME)
        try:
            data = json.loads(os.read(fd, 1 << 22).decode("utf-8"))
        finally:
            os.close(fd)
        timings = {str(k): (float(v[0]), float(v[1])) for k, v in data["timings"].items()}
        if not isinstance(data["key"], dict) or any(o < 0 or t < 0 for o, t in timings.values()):
            return None
        return {"key": data["key"], "timings": timings, "steps": _steps(data.get("steps", {}))}
    except (OSError, build.UnsafeKernels, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _steps(raw: dict) -> dict:
    """The cache file's timed steps, each proven well formed (a ValueError, TypeError or KeyError otherwise)."""
    steps = {}
    for name, step in raw.items():
        seconds = {v: float(step["seconds"][v]) for v in STEP_VARIANTS}
        if step["winner"] not in STEP_VARIANTS or not all(isinstance(s, str) for s in step["shapes"]):
            raise ValueError(f"a damaged step timing: {name}")
        steps[str(name)] = {"seconds": seconds, "winner": step["winner"], "shapes": list(step["shapes"])}
    return steps


_CHOOSER: list[Chooser] = []  # the process's chooser, made at first use
_MODE: list[str | None] = [None]  # CYCLELAB_KERNELS, read at the first product (as build.status reads it once)


def chooser() -> Chooser:
    """The process's :class:`Chooser`, caching in the private kernels folder."""
    if not _CHOOSER:
        _CHOOSER.append(Chooser(build.private_folder()))
    return _CHOOSER[0]


def reset(new: Chooser | None = None) -> None:
    """Forget the process's decisions and the mode read (or put ``new`` in place: tests)."""
    _CHOOSER[:] = [] if new is None else [new]
    _MODE[0] = None


@contextmanager
def forced(mode: str) -> Iterator[None]:
    """Inside the block (every thread), ``"own"`` runs the own kernels wherever they apply, ``"auto"`` the faster;
    the decisions measured are kept (the benchmarks time the engine both ways in turns)."""
    if mode not in ("own", "auto"):
        raise ValueError(f"forced() takes 'own' or 'auto', got {mode!r} (torch_float32() turns the kernels off)")
    before, _MODE[0] = _MODE[0], mode
    try:
        yield
    finally:
        _MODE[0] = before


def use_own(family: str, shape: tuple, own: Callable[[], object], theirs: Callable[[], object]) -> bool:
    """True where the own kernel should run: always under ``CYCLELAB_KERNELS=own``, else (``auto``) where it
    measured faster than torch for this family and shape. (Called only where the own kernel applies and is built.)"""
    if (_MODE[0] or _read_mode()) == "own":
        return True
    return (_CHOOSER[0] if _CHOOSER else chooser()).use_own(family, shape, own, theirs)


def settle(name: str, step: Callable[[], object]) -> bool:
    """In ``auto``, let whole decode steps of a model (``step()`` runs one) decide its shapes, once per model
    ``name`` and machine (:meth:`Chooser.settle_step`); False in another mode. (Called only where the own kernels
    are built and on.)"""
    if (_MODE[0] or _read_mode()) != "auto":
        return False
    (_CHOOSER[0] if _CHOOSER else chooser()).settle_step(name, step)
    return True


def status_line() -> str:
    """Which kernels run where (``CYCLELAB_KERNELS``), and why: the measured own/torch speed ratios (doctor)."""
    if (_MODE[0] or build.mode()) == "own":
        return "CYCLELAB_KERNELS=own: the own kernels run wherever they apply"
    return f"CYCLELAB_KERNELS=auto, the faster per shape: {chooser().summary()}"


def _read_mode() -> str:
    mode = _MODE[0] = build.mode()
    return mode


def choice_report() -> str:
    """What chapter 07 prints: the mode, the machine, and each shape's timings and choice."""
    status, mode = build.status(), _MODE[0] or build.mode()
    key = machine_key()
    head = (
        f"kernels: CYCLELAB_KERNELS={mode}; {key['cpu']}, torch {key['torch']}, {key['threads']} threads; "
        f"own kernels {'built' if status.library is not None else 'not used: ' + status.reason}"
    )
    if status.library is None or mode == "torch":
        return head + "\n  every product runs on torch's kernels"
    if mode == "own":
        return head + "\n  every product runs on the own kernels"
    lines = chooser().report_lines() or ["  nothing measured yet: each shape is timed at its first use"]
    return "\n".join([head + "; each shape timed once, the faster kept:", *lines])

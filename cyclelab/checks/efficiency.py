"""Chapter 07's checks: int8 quantization of a row, and the roofline."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cyclelab.checks.harness import Failed, call, checker


def _int8_rows(seed: int = 7) -> list[torch.Tensor]:
    """Rows to quantize: random scales, one large outlier, all negative, a single value, all zeros."""
    gen = torch.Generator().manual_seed(seed)
    outlier = torch.randn(16, generator=gen) * 0.1
    outlier[5] = 3.0
    return [
        torch.randn(32, generator=gen),
        torch.randn(64, generator=gen) * 0.02,
        outlier,
        -torch.rand(8, generator=gen) - 0.5,
        torch.tensor([0.3]),
        torch.zeros(6),
    ]


def _int8_hint(row: torch.Tensor, q: torch.Tensor, scale: float) -> str | None:
    """The symptom of a wrong (q, scale) for ``row``, or None when it is right."""
    absmax = float(row.abs().max())
    if absmax == 0:
        if scale != scale or not torch.isfinite(q).all() or q.abs().max() != 0:
            return "a row of zeros must give codes 0 (and a finite scale): do not divide by a scale of 0"
        return None
    want = absmax / 127
    if not torch.equal(q, torch.round(q)):
        return "the codes must be whole numbers: return round(x / scale), not the dequantized values"
    if abs(scale - 127 / absmax) < 1e-6 * max(1.0, 127 / absmax) and abs(scale - want) > 1e-9:
        return "the scale is upside down: scale = max|x| / 127, so that x / scale fills [-127, 127]"
    if abs(scale - absmax / 128) < 1e-9 or abs(scale - absmax / 255) < 1e-9:
        return "symmetric int8 uses [-127, 127]: scale = max|x| / 127"
    if abs(scale - want) > 1e-6 * want:
        if abs(scale - float(row.max()) / 127) < 1e-9:
            return "use the largest ABSOLUTE value, max|x|, or negative values fall outside [-127, 127]"
        return f"the scale should be max|x| / 127 = {want:.6g}, got {scale:.6g}"
    if q.abs().max() > 127:
        return "codes fall outside [-127, 127]: scale = max|x| / 127"
    if torch.equal(q, torch.trunc(row / scale)) and not torch.equal(q, torch.round(row / scale)):
        return "you cut off the fraction: ROUND x / scale to the nearest integer, so the error stays within scale / 2"
    if not torch.equal(q, torch.round(row / scale)):
        return "the codes should be round(x / scale) for every value of the row"
    return None


@checker
def check_int8_row(fn: Callable[[torch.Tensor], tuple[torch.Tensor, float]]) -> str:
    """Check ``fn(row) -> (q, scale)``: symmetric int8 with ``scale = max|x| / 127`` and
    ``q = round(x / scale)``, so that ``|x - q × scale| <= scale / 2``."""
    for row in _int8_rows():
        answer = call(fn, row.clone(), case=f"a row of {len(row)} values")
        try:
            q, scale = torch.as_tensor(answer[0]), float(answer[1])
            if q.is_complex() or q.dtype == torch.bool:
                raise TypeError(f"codes of dtype {q.dtype}")
            q = q.float()
        except (TypeError, ValueError, IndexError, RuntimeError):
            raise Failed(f"return (q, scale): the codes as a tensor and the scale as a number, got {answer!r:.80}")
        if q.shape != row.shape:
            raise Failed(f"q should have the row's shape {tuple(row.shape)}, got {tuple(q.shape)}")
        hint = _int8_hint(row, q, scale)
        if hint is not None:
            raise Failed(f"on a row of {len(row)} values: {hint}")
    return "correct: one scale max|x| / 127 per row, codes round(x / scale); each value comes back within scale / 2"


def _roofline_cases() -> list[tuple[float, float, float, float]]:
    """(flops, bytes, peak FLOP/s, bandwidth bytes/s): memory-bound, compute-bound, at the ridge, a GEMV."""
    return [
        (2e6, 4e6, 50e9, 20e9),
        (2e9, 3e6, 50e9, 20e9),
        (5e6, 2e6, 50e9, 20e9),
        (2 * 576 * 576, 4 * 576 * 576, 33e9, 12e9),
    ]


@checker
def check_attainable(fn: Callable[[float, float, float, float], float]) -> str:
    """Check ``fn(flops, nbytes, peak, bandwidth) -> FLOP/s``: the roofline's
    ``min(peak, flops / nbytes × bandwidth)``."""
    for flops, nbytes, peak, bw in _roofline_cases():
        case = f"an op of {flops:.3g} FLOPs and {nbytes:.3g} bytes on peak {peak:.3g} FLOP/s, bandwidth {bw:.3g} B/s"
        answer = call(fn, flops, nbytes, peak, bw, case=case)
        try:
            got = float(answer)
        except (TypeError, ValueError, RuntimeError):
            raise Failed(f"return the attainable FLOP/s as a number, got {answer!r}")
        intensity = flops / nbytes
        want = min(peak, intensity * bw)

        def near(x: float) -> bool:
            return abs(got - x) <= 1e-6 * abs(x)

        if near(want):
            continue
        if near(intensity * bw):
            raise Failed(f"for {case} you exceed the peak: the roof is flat at peak FLOP/s — take min(peak, ...)")
        if near(peak):
            raise Failed(
                f"for {case} memory is the limit: intensity × bandwidth is below the peak — take min(peak, ...)"
            )
        if near(max(peak, intensity * bw)):
            raise Failed("the roof is the LOWER of the two limits: min, not max")
        if near(min(peak, nbytes / flops * bw)):
            raise Failed("arithmetic intensity is FLOPs per byte (flops / nbytes), not bytes per FLOP")
        if near(intensity):
            raise Failed("that is the intensity itself: multiply by the bandwidth to get FLOP/s")
        raise Failed(f"for {case} the roof is min(peak, flops / nbytes × bandwidth) = {want:.4g}, got {got:.4g}")
    return "correct: below the ridge an op is held by memory (intensity × bandwidth), above it by the peak"

"""The Python side of the own kernels: each function checks that its tensors fit the C kernel (float32 on the
CPU, no gradient, few rows, packed memory) and calls it, or returns what torch computes (or None, for the fused
steps, so the caller runs its torch formula). The numbers are the same either way, to float rounding. A fused
step is given the caller's torch formula (``formula=``): in ``auto`` the two are timed against each other."""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch

from . import build as _build
from . import choice as _choice
from .choice import use_own

_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64
Formula = Callable[..., torch.Tensor] | None  # the torch formula a fused kernel stands in for


class _Switch(threading.local):
    own = True  # False inside torch_float32() (this thread only): every product goes to torch


_SWITCH = _Switch()
PER_THREAD = 1 << 16  #: multiply-adds a thread is worth waking for
MANY_ROWS = 8  #: from this many input rows on, use torch's float32 matmul (an int8 weight dequantized first)


@contextmanager
def torch_float32() -> Iterator[None]:
    """Inside the block every product of this thread (float32, int8 and the fused steps) runs on torch's
    kernels instead of these (chapter 07 and the benchmarks time the engine both ways); other threads keep theirs."""
    before, _SWITCH.own = _SWITCH.own, False
    try:
        yield
    finally:
        _SWITCH.own = before


def settle_step(name: str, step: Callable[[], object]) -> bool:
    """Where the own kernels are built and on (``auto``), time whole decode steps of the model ``name`` (``step()``
    runs one) once, and let the fastest way decide its shapes (:func:`cyclelab.kernels.choice.settle`); False
    where nothing was decided (another mode, kernels off in this thread, a dispatch mode watching)."""
    if _SWITCH.own and not torch._C._len_torch_dispatch_stack() and _build.compiled() is not None:
        return _choice.settle(name, step)
    return False


def f32_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a weight stored (out, in), as ``torch.nn.functional.linear`` computes it: by the
    C kernel for fewer than :data:`MANY_ROWS` rows of float32 on the CPU when no gradient is wanted, else by torch."""
    return f32_linears(x, [(w, bias)])[0]


def f32_linears(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    """:func:`f32_linear` of ``x`` with each ``(weight, bias)`` of ``layers``: one C call reads all the weights
    (decode's q, k and v) where the kernel applies to every one of them, else torch computes each."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"f32_linear: x must be a torch.Tensor of shape (..., in), got {type(x).__name__}")
    if not _fits_f32_kernel(x, layers, 1):
        _check_linears(x, layers)  # only off the kernel's path: decode pays nothing for it
        return _torch_linears(x, layers)
    shape = (x.numel() // x.shape[-1], x.shape[-1], *[w.shape[0] for w, _ in layers])
    if not use_own("f32", shape, lambda: _own_f32_linears(x, layers), lambda: _torch_linears(x, layers)):
        return _torch_linears(x, layers)
    return _own_f32_linears(x, layers)


def _library() -> ctypes.CDLL:
    """The loaded kernels; called only where :func:`_build.compiled` was found not None."""
    library = _build.compiled()
    assert library is not None, "an own kernel was called without the kernels loaded"
    return library


def _torch_linears(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    return [torch.nn.functional.linear(x, w, b) for w, b in layers]


def _own_f32_linears(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    ns = [w.shape[0] for w, _ in layers]
    outs, total = [torch.empty(*x.shape[:-1], n) for n in ns], sum(ns)
    weights, biases, sizes = _weight_arrays(ns, *zip(*layers))
    _library().f32_linear(
        x.data_ptr(),
        weights,
        biases,
        sizes,
        total,
        _pointers(outs),
        x.numel() // x.shape[-1],
        x.shape[-1],
        _threads(x.numel() * total),
    )
    return outs


def f32_conv1d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w + bias`` for a weight stored (in, out), GPT-2's ``Conv1D``: by the C kernel where
    :func:`f32_linear` would use it, else by torch (``addmm``)."""
    if not _fits_f32_kernel(x, [(w, bias)], 0):
        return _torch_conv1d(x, w, bias)
    shape = ("conv1d", x.numel() // w.shape[0], *w.shape)
    if not use_own("f32", shape, lambda: _own_conv1d(x, w, bias), lambda: _torch_conv1d(x, w, bias)):
        return _torch_conv1d(x, w, bias)
    return _own_conv1d(x, w, bias)


def _torch_conv1d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if bias is None else torch.addmm(bias, flat, w)
    return out.view(*x.shape[:-1], w.shape[-1])


def _own_conv1d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k, n = w.shape
    out = torch.empty(*x.shape[:-1], n)
    _library().f32_conv1d(
        x.data_ptr(),
        w.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        x.numel() // k,
        k,
        n,
        _threads(x.numel() * n),
    )
    return out


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, formula: Formula = None) -> torch.Tensor | None:
    """:func:`cyclelab.core.norms.rms_norm`'s formula in one C call for a few float32 rows (decode); None where
    the kernel does not apply (the caller runs that function)."""
    _tensors("fused_rms_norm", x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"fused_rms_norm: eps must be a finite number >= 0 (e.g. 1e-5), got {eps!r}")
    d = x.shape[-1] if x.dim() else 0
    if not (weight.shape == (d,) and 0 < x.numel() < MANY_ROWS * d and _plain_f32(x, weight)):
        return None
    if not _fused_chosen(("rms_norm", *x.shape), _own_rms_norm, formula, x, weight, eps):
        return None
    return _own_rms_norm(x, weight, eps)


def _own_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    out = torch.empty_like(x)
    _library().f32_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
    return out


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, formula: Formula = None) -> torch.Tensor | None:
    """:func:`cyclelab.core.rope.apply_rope` in one C call for float32 heads at one position (decode), to the last
    bit (each product and sum rounds as torch's do); None where the kernel does not apply."""
    d = x.shape[-1] if x.dim() else 0
    one_position = x.dim() == 4 and x.shape[-2] == 1 and cos.shape == sin.shape == (1, d) and d % 2 == 0
    if not (one_position and _plain_f32(x, cos, sin)):
        return None
    if not _fused_chosen(("rope", *x.shape), _own_rope, formula, x, cos, sin):
        return None
    return _own_rope(x, cos, sin)


def _own_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    out = torch.empty_like(x)
    _library().f32_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), x.numel() // d, d)
    return out


def fused_scores(q: torch.Tensor, keys: torch.Tensor, formula: Formula = None) -> torch.Tensor | None:
    """:func:`cyclelab.core.attention.attention_scores` for one query position (decode) in one C call: ``q``
    ``(b, h, 1, d)``, ``keys`` ``(b, kv_h, t, d)`` as the KV cache hands them out; None where it does not apply."""
    if not _one_query(q, keys):
        return None
    if not _fused_chosen(("scores", *q.shape, keys.shape[1]), _own_scores, formula, q, keys):
        return None  # keyed without the context length, which grows every cycle
    return _own_scores(q, keys)


def _own_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    b, h, _, d = q.shape
    scores = torch.empty(b, h, 1, keys.shape[-2])
    _library().f32_scores(
        q.data_ptr(),
        keys.data_ptr(),
        scores.data_ptr(),
        b,
        h,
        h // keys.shape[1],
        keys.shape[-2],
        d,
        keys.stride(0),
        keys.stride(1),
    )
    return scores


def fused_softmax(scores: torch.Tensor, formula: Formula = None) -> torch.Tensor | None:
    """The softmax over the last dimension of one query position's float32 scores ``(b, h, 1, t)`` in one C
    call; None where it does not apply."""
    _tensors("fused_softmax", scores=scores)
    if not (scores.dim() == 4 and scores.shape[-2] == 1 and scores.shape[-1] > 0 and _plain_f32(scores)):
        return None
    if not _fused_chosen(("softmax", *scores.shape[:3]), _own_softmax, formula, scores):
        return None
    return _own_softmax(scores)


def _own_softmax(scores: torch.Tensor) -> torch.Tensor:
    probs = torch.empty_like(scores)
    _library().f32_softmax(scores.data_ptr(), probs.data_ptr(), scores.numel() // scores.shape[-1], scores.shape[-1])
    return probs


def fused_mix(probs: torch.Tensor, values: torch.Tensor, formula: Formula = None) -> torch.Tensor | None:
    """:func:`cyclelab.core.attention.attention_mix` for one query position in one C call: ``probs`` ``(b, h, 1, t)``,
    ``values`` ``(b, kv_h, t, d)`` as the KV cache hands them out; None where it does not apply."""
    t = values.shape[-2] if values.dim() == 4 else -1
    if not _one_query(probs, values, width=t):  # a weight for each of the t values
        return None
    if not _fused_chosen(("mix", *probs.shape[:3], *values.shape[1::2]), _own_mix, formula, probs, values):
        return None
    return _own_mix(probs, values)


def _own_mix(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    t = values.shape[-2]
    (b, h), d = probs.shape[:2], values.shape[-1]
    out = torch.empty(b, h, 1, d)
    _library().f32_mix(
        probs.data_ptr(),
        values.data_ptr(),
        out.data_ptr(),
        b,
        h,
        h // values.shape[1],
        t,
        d,
        values.stride(0),
        values.stride(1),
    )
    return out


def _tensors(function: str, **tensors) -> None:
    """TypeError naming the first argument of ``function`` that is not a torch.Tensor."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{function}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _fused_chosen(shape: tuple, own: Callable[..., torch.Tensor], formula: Formula, *args) -> bool:
    """True where the own fused kernel should run for this shape: timed against ``formula``, the torch formula the
    caller runs instead (see :func:`use_own`); without one there is nothing to time against, and the kernel runs."""
    return formula is None or use_own("fused", shape, lambda: own(*args), lambda: formula(*args))


def _one_query(q: torch.Tensor, kv: torch.Tensor, width: int | None = None) -> bool:
    """True where the attention kernels read ``q`` ``(b, h, 1, width)`` against a cache slice ``kv``
    ``(b, kv_h, t, d)``: kv_h divides h, ``q`` is :func:`_plain_f32`, and ``kv``'s rows are float32 d values apart."""
    if not (q.dim() == kv.dim() == 4 and q.shape[-2] == 1 and q.shape[0] == kv.shape[0] and kv.shape[1]):
        return False
    d = kv.shape[-1]
    if q.shape[1] % kv.shape[1] or q.shape[-1] != (d if width is None else width) or kv.shape[-2] == 0:
        return False
    rows_packed = kv.stride(-1) == 1 and kv.stride(-2) == d
    return rows_packed and _plain_f32(q) and _plain_f32(kv, contiguous=False)


def _pointers(tensors: Iterable[torch.Tensor | None]) -> ctypes.Array:
    """The tensors' data pointers as a C array (None for a missing bias)."""
    addresses = [None if t is None else t.data_ptr() for t in tensors]
    return (_PTR * len(addresses))(*addresses)


_WEIGHT_ARRAYS: dict[tuple, tuple[ctypes.Array, ...]] = {}  # sizes and addresses -> the C arrays of them


def _weight_arrays(sizes: Sequence[int], *columns: Sequence[torch.Tensor | None]) -> tuple[ctypes.Array, ...]:
    """The C arrays of a product's weights: the addresses of each column of tensors (weights, scales, biases),
    then the matrices' output sizes. Decode passes the same weights every cycle, so each set of addresses
    and sizes is turned into arrays once (building a C array costs microseconds)."""
    key = (*sizes, *(None if t is None else t.data_ptr() for column in columns for t in column))
    arrays = _WEIGHT_ARRAYS.get(key)
    if arrays is None:
        if len(_WEIGHT_ARRAYS) >= 4096:  # weights that keep moving (a training loop's new tensors): start over
            _WEIGHT_ARRAYS.clear()
        arrays = _WEIGHT_ARRAYS[key] = (*map(_pointers, columns), (_I64 * len(sizes))(*sizes))
    return arrays


def _threads(multiply_adds: int) -> int:
    """Threads for one kernel call: torch's setting, but never more than the cores this process may run on
    (an extra thread would wait for a core at every call) nor than the work is worth."""
    return max(1, min(torch.get_num_threads(), _cores(), multiply_adds // PER_THREAD))


@lru_cache(maxsize=1)
def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_linears(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """ValueError/TypeError naming the argument where ``x`` times a ``(weight, bias)`` of ``layers`` is undefined
    (torch would say only "mat1 and mat2 shapes cannot be multiplied", or broadcast a 1-D weight)."""
    for i, (w, bias) in enumerate(layers):
        if not (isinstance(w, torch.Tensor) and w.dim() == 2):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"f32_linear: weight {i} must be a 2-D tensor (out, in), got {got}")
        if not (x.is_floating_point() and x.dtype == w.dtype):
            raise TypeError(
                f"f32_linear: x and weight {i} must be floating-point tensors of one dtype, got x {x.dtype} and "
                f"weight {w.dtype} (convert x, e.g. x.to({w.dtype}))"
            )
        if x.dim() == 0 or x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"f32_linear: x's last dimension must be the weight's input width {w.shape[1]} "
                f"(weight {i} is (out, in) = {tuple(w.shape)}), got x of shape {tuple(x.shape)}"
            )
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (w.shape[0],)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"f32_linear: bias {i} must be a tensor of shape ({w.shape[0]},), got {got}")


def _fits_f32_kernel(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]], in_dim: int) -> bool:
    """True where a float32 product's C kernel computes ``x`` times every ``(weight, bias)`` of ``layers``: fewer than
    :data:`MANY_ROWS` rows of ``x``, each weight's dimension ``in_dim`` as wide as a row and its bias as long as its
    other, all :func:`_plain_f32`. (A few µs: it runs on every call of decode; torch raises the shape errors of the
    other calls.)"""
    width = x.shape[-1] if x.dim() else 0
    if not (layers and 0 < x.numel() < MANY_ROWS * width):
        return False
    tensors = [x]
    for w, bias in layers:
        if not (w.dim() == 2 and w.shape[in_dim] == width):
            return False
        if bias is not None:
            if bias.shape != (w.shape[1 - in_dim],):
                return False
            tensors.append(bias)
        tensors.append(w)
    return _plain_f32(*tensors)


def _plain_f32(*tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """True if the C kernels may read these tensors' memory: contiguous (unless told otherwise) float32 on the
    CPU, no gradient to record, no dispatch mode watching torch's ops (FlopCounterMode, fake tensors), kernels
    compiled and on."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu or (contiguous and not t.is_contiguous()):
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return _SWITCH.own and not torch._C._len_torch_dispatch_stack() and _build.compiled() is not None


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (q × scale).T + bias`` for float32 ``x`` ``(..., in)``, int8 ``q`` ``(out, in)``, float32 ``scale`` ``(out,)``."""
    return int8_linears(x, [(q, scale, bias)])[0]


def int8_linears(
    x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
) -> list[torch.Tensor]:
    """:func:`int8_linear` of ``x`` with each ``(q, scale, bias)`` of ``layers``, all the weights read by one C call
    for a few rows (decode) where the own kernel is on and chosen; else torch's weight-only int8 op, and for many
    rows torch's matrix product, each weight dequantized. Bad layers or inputs raise TypeError/ValueError."""
    if not layers:
        raise ValueError("int8_linears needs at least one (q, scale, bias) layer")
    width = check_int8_layers(layers)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"an int8 Linear takes float32 inputs, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(
            f"an int8 Linear of {width} inputs got a tensor of shape {tuple(x.shape)}: "
            f"its last dimension must be {width}"
        )
    rows, ns = x.numel() // width, [q.shape[0] for q, _, _ in layers]
    x = x.contiguous()
    if (
        rows < MANY_ROWS
        and _SWITCH.own
        and x.is_cpu
        and _build.compiled() is not None
        and use_own("int8", (rows, width, *ns), lambda: _own_int8(x, layers, rows), lambda: _torch_int8(x, layers))
    ):
        return _own_int8(x, layers, rows)
    return _torch_int8(x, layers)


def _own_int8(x: torch.Tensor, layers: Sequence, rows: int) -> list[torch.Tensor]:
    ns = [q.shape[0] for q, _, _ in layers]
    outs, total = [torch.empty(*x.shape[:-1], n) for n in ns], sum(ns)
    _library().int8_linear(
        x.data_ptr(),
        *_weight_arrays(ns, *zip(*layers)),
        total,
        _pointers(outs),
        rows,
        x.shape[-1],
        _threads(x.numel() * total),
    )
    return outs


def _torch_int8(x: torch.Tensor, layers: Sequence) -> list[torch.Tensor]:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= MANY_ROWS:  # many rows: torch's matrix product, each weight dequantized
        outs = [torch.nn.functional.linear(flat, q.float() * scale[:, None], b) for q, scale, b in layers]
    else:  # few rows: torch's own weight-only int8 op
        outs = [torch._weight_int8pack_mm(flat, q, scale) for q, scale, _ in layers]
        outs = [out if b is None else out + b for out, (_, _, b) in zip(outs, layers)]
    return [out.view(*x.shape[:-1], q.shape[0]) for out, (q, _, _) in zip(outs, layers)]


def check_int8_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> int:
    """The common input width of int8 layers ``(q, scale, bias)``, once each is proven what the C kernel reads:
    ``q`` contiguous int8 ``(out, in)``, ``scale`` float32 ``(out,)``, ``bias`` None or float32 ``(out,)``; else a
    TypeError or ValueError that says which. (About a microsecond a layer: it runs on every decode call.)"""
    width = None
    for i, (q, scale, bias) in enumerate(layers):
        if not isinstance(q, torch.Tensor) or q.dtype is not torch.int8:
            raise TypeError(
                f"int8 layer {i}: the codes q must be an int8 tensor, got "
                f"{getattr(q, 'dtype', type(q).__name__)} (quantize float weights with to_int8 or "
                "quantize_symmetric first)"
            )
        if q.dim() != 2 or not q.is_contiguous():
            raise ValueError(
                f"int8 layer {i}: the codes q must be a contiguous (out, in) matrix, got shape "
                f"{tuple(q.shape)}{'' if q.is_contiguous() else ', not contiguous (call .contiguous())'}"
            )
        if not isinstance(scale, torch.Tensor) or scale.dtype is not torch.float32:
            raise TypeError(
                f"int8 layer {i}: the scale must be a float32 tensor, got "
                f"{getattr(scale, 'dtype', type(scale).__name__)}"
            )
        for name, t in (("scale", scale), ("bias", bias)):
            if t is not None and (t.shape != (q.shape[0],) or not t.is_contiguous() or t.dtype is not torch.float32):
                raise ValueError(
                    f"int8 layer {i}: the {name} must be a contiguous float32 vector of {q.shape[0]} "
                    f"values (one per output row), got {t.dtype} of shape {tuple(t.shape)}"
                )
        if width is not None and q.shape[1] != width:
            raise ValueError(f"int8 layer {i} takes {q.shape[1]} inputs, layer 0 takes {width}")
        width = q.shape[1]
    assert width is not None  # layers is not empty
    return width

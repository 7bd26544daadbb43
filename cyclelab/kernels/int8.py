"""Weights stored as int8 codes with a float32 scale per row: the layer, the quantizer, and the conversion of a
whole model (the format ``load(..., dtype="int8")`` makes)."""

from __future__ import annotations

import torch

from .products import check_int8_layers, int8_linear


class Int8Linear(torch.nn.Module):
    """A Linear whose weight is stored as int8 codes ``q`` ``(out, in)`` with a float32 scale per row
    (:func:`cyclelab.lab.quantize.int8_linear_of` makes one from a float weight); it computes
    ``x @ (q × scale).T + bias`` with :func:`int8_linear`, without a float copy of the weight.

    ``q`` must be contiguous int8, ``scale`` float32 with one value per row (``(out,)`` or ``(out, 1)``), ``bias``
    None or one float value per row; anything else raises a TypeError or ValueError here, once."""

    q: torch.Tensor  # buffers, declared for the type checker
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if isinstance(scale, torch.Tensor) and scale.dim() == 2 and scale.shape[1:] == (1,):
            scale = scale.reshape(-1)  # quantize_symmetric's (out, 1)
        if isinstance(bias, torch.Tensor) and bias.is_floating_point():
            bias = bias.detach().float().contiguous()
        check_int8_layers([(q, scale, bias)])
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, float32 scale per row"


def quantize_symmetric(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in [-levels, levels] and one scale per row of ``w`` (a zero row gets scale 1); the codes contiguous.
    A row holding NaN or inf has no scale: ValueError."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(
            f"quantize_symmetric quantizes a float tensor w (e.g. a Linear's weight), "
            f"got {getattr(w, 'dtype', type(w).__name__)}"
        )
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= 127:
        raise ValueError(
            f"quantize_symmetric: levels must be a whole number from 1 to 127 (codes in [-levels, levels] fit "
            f"in int8; 127 for int8, 7 for int4), got {levels!r}"
        )
    if w.dim() == 0 or w.numel() == 0:
        raise ValueError(f"quantize_symmetric: w must hold at least one row of numbers, got shape {tuple(w.shape)}")
    finite = torch.isfinite(w)
    if not finite.all():
        rows = (~finite).reshape(-1, w.shape[-1]).any(dim=-1).nonzero().flatten().tolist() if w.dim() else [0]
        raise ValueError(
            f"quantize_symmetric: {len(rows)} row(s) hold NaN or inf (the first: row {rows[0]}), "
            "which no scale can represent; fix the weights first"
        )
    absmax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
    q = torch.round(w / scale).clamp(-levels, levels).to(torch.int8).contiguous()
    return q, scale


def is_int8(module: torch.nn.Module) -> bool:
    """True for a Linear whose weight is stored as int8 (:class:`Int8Linear`)."""
    return isinstance(module, Int8Linear)


def to_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Linear (and GPT-2 ``Conv1D``) of ``model``, in place, by an :class:`Int8Linear`; return ``model``.

    Each weight is quantized per output row, symmetric (``scale = max|w| / 127``, codes
    ``round(w / scale)``: :func:`quantize_symmetric`, the chapter-07 recipe); the float weight
    is dropped. Embeddings and norms stay float32. A tied unembedding (GPT-2's and SmolLM2's ``lm_head``
    shares the embedding's matrix) gets int8 codes of its own, a quarter of the float matrix's bytes,
    and the embedding keeps the float matrix for its row lookups.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_int8 converts a torch.nn.Module (e.g. load('tiny').model), got {type(model).__name__}")
    if any(is_int8(m) for m in model.modules()):
        raise ValueError("the model is already int8: to_int8 converts a float32 model once")
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        found = sorted({f"{p.dtype} on {p.device}" for p in params})
        raise ValueError(
            f"to_int8 needs a float32 model on the CPU (the int8 kernel is a CPU kernel), "
            f"got {', '.join(found)}; load it with dtype=torch.float32, device='cpu'"
        )
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind in ("Linear", "Conv1D"):
                weight, bias = child.get_parameter("weight").detach(), getattr(child, "bias", None)
                setattr(
                    parent, name, _rows_to_int8(weight.t() if kind == "Conv1D" else weight, bias)
                )  # Conv1D: (in, out)
    for p in model.parameters():  # what stays float leaves the weights file's memory map, and the float
        p.data = p.data.clone()  # matrices' pages go with the map instead of staying resident
    return model


def _rows_to_int8(w: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    """``w`` ``(out, in)`` quantized per row, symmetric, as an :class:`Int8Linear` (a zero row gets scale 1)."""
    if not torch.isfinite(w).all():
        raise ValueError("to_int8: a weight holds inf or NaN, which no scale can represent")
    return Int8Linear(*quantize_symmetric(w, 127), bias)

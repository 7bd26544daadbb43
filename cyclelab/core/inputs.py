"""The engine's argument checks: prompts, token ids, flags and capture rules, each a clear TypeError or ValueError."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from cyclelab.core.ops import OPS
from cyclelab.loading.schema import is_int

PROMPT_TYPES = "a prompt is a str, a list or tuple of token ids (ints), or a 1-D integer torch tensor"


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def ids_of(prompt) -> list[int]:
    """Token ids given as a list or tuple of ints or a 1-D integer tensor; anything else is a TypeError."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise TypeError(f"{PROMPT_TYPES}; got a tensor of shape {tuple(prompt.shape)} and dtype {prompt.dtype}")
        return prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{PROMPT_TYPES}; got {type(prompt).__name__}")
    bad = [i for i in prompt if not is_int(i)]
    if bad:
        raise TypeError(f"{PROMPT_TYPES}; the prompt holds {bad[0]!r} ({type(bad[0]).__name__})")
    return list(prompt)


def id_tensor(input_ids) -> torch.Tensor:
    """``input_ids`` (ids, rows of ids, or a tensor) as an integer tensor; TypeError for anything else."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    else:
        try:
            ids = torch.tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"input_ids must be token ids (a list of ints, or of equal-length lists): {err}") from None
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise TypeError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    return ids.long()


def check_capture(capture) -> None:
    """TypeError/ValueError unless ``capture`` is None, "all", a function, or a collection of op names."""
    if capture is None or callable(capture) or (isinstance(capture, str) and capture == "all"):
        return
    if isinstance(capture, Iterator):
        raise TypeError(
            f"capture must be a set, list or tuple of op names, not a one-pass {type(capture).__name__} "
            "(it would be used up by the first check): write capture={...} or capture=list(...)"
        )
    if (
        isinstance(capture, (str, bytes))
        or not isinstance(capture, Iterable)
        or not all(isinstance(op, str) for op in capture)
    ):
        raise TypeError(
            f'capture must be None, "all", a set of op names or a function (op, layer) -> bool, got {capture!r}'
        )
    unknown = sorted(set(capture) - set(OPS))
    if unknown:
        raise ValueError(f"capture names unknown op(s) {unknown}; ops are {', '.join(OPS)}")

"""Device choice in one place: nothing else in cyclelab names ``cuda``."""

from __future__ import annotations

import os

import torch

DEVICE_ENV = "CYCLELAB_DEVICE"


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    Order: the ``prefer`` argument, then ``$CYCLELAB_DEVICE``, then a GPU when one is
    available, else the CPU. An unavailable choice raises a clear error instead of
    failing later inside torch.
    """
    choice = prefer if prefer is not None else os.environ.get(DEVICE_ENV)
    if choice is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as err:
        raise ValueError(f"unknown device {choice!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {choice!r} was asked for, but torch sees no CUDA GPU; use 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {choice!r} was asked for, but MPS is not available; use 'cpu'")
    return device

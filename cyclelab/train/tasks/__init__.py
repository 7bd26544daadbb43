"""Chapter 06's fine-tuning tasks on the course's own data (no downloads), one module per task.

1. :mod:`.sonnets` — causal LM adaptation of ``tiny`` toward the Sonnets, and the comparison of
   full fine-tuning, LoRA, adapters and prefix tuning on it;
2. :mod:`.which_play` — sequence classification with ``minilm``: which play is a line from?
3. :mod:`.who_speaks` — span extraction with ``minilm``: who speaks this line?
4. :mod:`.folio` — First Folio spelling to modern spelling, as edit tagging with ``tiny``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stack_batch(examples: Sequence[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``input_ids`` and ``attention_mask`` of ``examples`` stacked into one batch on ``device``."""
    ids = torch.stack([e["input_ids"] for e in examples]).to(device)
    mask = torch.stack([e["attention_mask"] for e in examples]).to(device)
    return ids, mask


def unpadded(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``mask`` and ``tensors`` (batch × T each) cut after the last column where any row of ``mask``
    is 1: on a right-padded batch the positions dropped are padding in every row, so a causal or a
    masked model computes the same thing for the real tokens, on fewer positions."""
    real = mask.any(0).nonzero()
    n = int(real.max()) + 1 if len(real) else 1
    return tuple(t[:, :n] for t in (mask, *tensors))

"""Activation patching on the engine's event stream: where in the run does the answer live?

A clean run ("The capital of France is") and a corrupted one ("The capital of Italy is") differ in one
token. Write one of the clean run's residual-stream vectors (after layer ``L``, at position ``i``) into
the corrupted run and see how much of the clean answer (" Paris") comes back: that cell of the grid
says how much of the answer the stream carries at that layer and position.

The engine pauses after every op and hands over the op's output in ``event.tensors`` when it is
captured; a consumer that writes into that tensor before asking for the next event changes what the
rest of the forward pass reads, the way a debugger writes a register. :func:`patch_layer` does exactly
that at the ``residual_mlp`` op (the stream after a whole layer); the engine itself is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cyclelab.core.attention import KVCache
from cyclelab.core.engine import Engine, drain
from cyclelab.loading.schema import is_int


def resid_post(engine: Engine, prompt) -> torch.Tensor:
    """The residual stream after each layer (``blocks.{L}.hook_resid_post``; :func:`cyclelab.lab.forward_by_hand.residual_stream` also has the embedding before layer 0), ``(layers, positions, width)``, from one run of ``prompt``."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(engine.arch.n_layers)]
    _, found = engine.run_with_cache(prompt, names)
    return torch.stack([found[name][0] for name in names])


def patch_layer(
    engine: Engine, ids: Sequence[int], layer: int, clean: torch.Tensor, positions: Sequence[int]
) -> torch.Tensor:
    """Run ``ids`` once per position of ``positions`` (as one batch), writing ``clean[p]`` (the clean
    run's stream after ``layer``, ``(positions, width)``) over the stream at position ``p`` after
    ``layer``. Returns the last position's logits of each patched run, ``(len(positions), vocab)``."""
    rows, cols = torch.arange(len(positions)), torch.tensor(list(positions), dtype=torch.long)

    def write(event) -> None:
        if event.op == "residual_mlp" and event.layer == layer:
            event.tensors["out"][rows, cols] = clean[cols].to(event.tensors["out"].dtype)

    batch = torch.tensor([list(ids)] * len(positions), device=engine.device)
    steps = engine.forward(
        batch, KVCache(engine.arch.n_layers, len(ids)), capture=lambda op, at: op == "residual_mlp" and at == layer
    )
    return drain(steps, write)[:, -1]


@dataclass
class PatchGrid:
    """The target's probability with each (layer, position) patched, and without patching."""

    probs: torch.Tensor  # (layers, positions): the corrupted run with one clean vector written in
    layers: list[int]
    positions: list[int]
    tokens: list[str]  # the corrupted prompt's tokens, all positions
    clean: float  # the target's probability in the clean run
    corrupt: float  # and in the corrupted run

    def restored(self) -> torch.Tensor:
        """The fraction of the clean probability each cell brings back: 0 = corrupted, 1 = clean."""
        return (self.probs - self.corrupt) / (self.clean - self.corrupt)


def patching_grid(
    engine: Engine,
    clean_prompt,
    corrupt_prompt,
    target: str | int,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PatchGrid:
    """Patch the clean run's stream into the corrupted run at every (layer, position) asked for
    (default: all) and measure the probability of ``target`` (one token: its text or id) at the end."""
    clean_ids, corrupt_ids = engine.encode(clean_prompt), engine.encode(corrupt_prompt)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupt_ids)}: "
            "patching pairs positions one to one, so give prompts of the same length in tokens"
        )
    if clean_ids == corrupt_ids:
        raise ValueError(
            "the clean and corrupted prompts are the same tokens: patching measures how much of the "
            "difference a patch restores, so change the corrupted prompt (e.g. swap the key word)"
        )
    target_id = target_token_id(engine, target)
    layers = _indices(layers, engine.arch.n_layers, "layers")
    positions = _indices(positions, len(corrupt_ids), "positions")
    stream = resid_post(engine, clean_ids)

    def prob(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), -1)[..., target_id]

    probs = torch.stack([prob(patch_layer(engine, corrupt_ids, layer, stream[layer], positions)) for layer in layers])
    return PatchGrid(
        probs,
        layers,
        positions,
        [engine.token_text(i) for i in corrupt_ids],
        float(prob(engine.logits(clean_ids)[0, -1])),
        float(prob(engine.logits(corrupt_ids)[0, -1])),
    )


def target_token_id(engine: Engine, token: str | int) -> int:
    """The id of one token given as its text (leading space included) or id; else a ValueError saying why."""
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise TypeError(f"give the target token as its text (' Paris') or id, got {type(token).__name__}")
    if isinstance(token, int):
        engine._check_ids([token], "target token id")
        return token
    ids = engine.tokenizer.encode(token, add_special_tokens=False) if token else []
    if len(ids) != 1:
        raise ValueError(
            f"the target {token!r} is {len(ids)} tokens for {engine.loaded.name!r}, not one: "
            "give a single token (with its leading space, ' Paris')"
        )
    return ids[0]


def _indices(given: Sequence[int] | None, n: int, name: str) -> list[int]:
    """``given`` (negative counts from the end; None: all of ``range(n)``) as a checked list of indices."""
    if given is None:
        return list(range(n))
    if isinstance(given, (str, bytes)) or not all(is_int(i) for i in given):
        raise TypeError(f"{name} must be a list of integers, got {given!r}")
    bad = [i for i in given if not -n <= i < n]
    if bad or not given:
        raise ValueError(
            f"{name} {bad or 'list is empty'}: there are {n} {name} (0..{n - 1}, or negative from the end)"
        )
    return [i % n for i in given]


def plot_patching(grid: PatchGrid, ax=None, title: str = ""):
    """Heat map of the restored fraction, layers down, positions (tokens) across."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(1.2 * len(grid.positions) + 2.5, 0.22 * len(grid.layers) + 1.5))[1]
    image = ax.imshow(grid.restored().numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(grid.positions)), [repr(grid.tokens[p]) for p in grid.positions], rotation=30)
    ax.set_yticks(range(len(grid.layers)), [str(layer) for layer in grid.layers], fontsize=7)
    ax.set(
        xlabel="position patched (the corrupted prompt's token)",
        ylabel="layer patched (stream after it)",
        title=title or "fraction of the clean probability restored",
    )
    ax.figure.colorbar(image, ax=ax, fraction=0.05)
    return ax


__all__ = ["PatchGrid", "patch_layer", "patching_grid", "plot_patching", "resid_post", "target_token_id"]

"""Activation patching through the engine's event stream, against a plain transformers forward with hooks."""

from __future__ import annotations

import pytest
import torch

from cyclelab.lab.patching import patch_layer, patching_grid, resid_post, target_token_id

CLEAN, CORRUPT, TARGET = "KING RICHARD:\nNow, my lord of", "KING HENRY:\nNow, my lord of", " York"


def hooked_prob(model, clean_ids, corrupt_ids, layer, position, target):
    """The target's probability when transformers runs ``corrupt_ids`` with the output of block ``layer`` at
    ``position`` replaced by that of the clean run: forward hooks only, no cyclelab code."""
    block = model.transformer.h[layer]
    kept = {}

    def hidden_of(output):  # a tensor, or a tuple led by it (transformers versions differ)
        return output[0] if isinstance(output, tuple) else output

    def record(module, args, output):
        kept["clean"] = hidden_of(output).detach().clone()

    def replace(module, args, output):
        hidden = hidden_of(output).clone()
        hidden[:, position] = kept["clean"][:, position]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        handle = block.register_forward_hook(record)
        model(torch.tensor([clean_ids]))
        handle.remove()
        handle = block.register_forward_hook(replace)
        logits = model(torch.tensor([corrupt_ids])).logits
        handle.remove()
    return float(torch.softmax(logits[0, -1], -1)[target])


@pytest.mark.parametrize(
    "layer, position", [(0, 1), (2, 8), (3, 1)], ids=["first-layer", "middle-last-pos", "last-layer"]
)
def test_a_cell_of_the_grid_matches_a_transformers_hook(tiny_engine, layer, position):
    grid = patching_grid(tiny_engine, CLEAN, CORRUPT, TARGET, layers=[layer], positions=[position])
    ids = tiny_engine.encode(CLEAN), tiny_engine.encode(CORRUPT)
    want = hooked_prob(tiny_engine.loaded.model, *ids, layer, position, target_token_id(tiny_engine, TARGET))
    assert float(grid.probs[0, 0]) == pytest.approx(want, abs=1e-5)


def test_patching_the_last_layer_at_the_last_position_restores_the_clean_run(tiny_engine):
    # after the last layer the last position's stream is all the unembedding reads: the clean answer comes back
    grid = patching_grid(tiny_engine, CLEAN, CORRUPT, TARGET, layers=[-1], positions=[-1])
    assert float(grid.probs[0, 0]) == pytest.approx(grid.clean, abs=1e-5)
    assert grid.clean != pytest.approx(grid.corrupt, abs=1e-3)


def test_positions_before_the_change_restore_nothing(tiny_engine):
    # position 0 ("KING") is the same token in both prompts and sees nothing later: patching it changes nothing
    grid = patching_grid(tiny_engine, CLEAN, CORRUPT, TARGET, positions=[0])
    assert torch.allclose(grid.probs[:, 0], torch.full((4,), grid.corrupt), atol=1e-5)


def test_a_batched_layer_equals_one_run_per_position(tiny_engine):
    ids, stream = tiny_engine.encode(CORRUPT), resid_post(tiny_engine, CLEAN)
    both = patch_layer(tiny_engine, ids, 1, stream[1], [1, 5])
    one = torch.cat([patch_layer(tiny_engine, ids, 1, stream[1], [p]) for p in (1, 5)])
    assert torch.allclose(both, one, atol=1e-5)


def test_the_engine_is_unchanged_after_patching(tiny_engine):
    before = tiny_engine.logits(tiny_engine.encode(CORRUPT))
    patching_grid(tiny_engine, CLEAN, CORRUPT, TARGET, layers=[1], positions=[1])
    assert torch.equal(tiny_engine.logits(tiny_engine.encode(CORRUPT)), before)


BAD = [
    ("lengths differ", dict(corrupt_prompt="KING HENRY:\nNow"), ValueError, r"same length in tokens"),
    ("two-token target", dict(target=" Tybalt"), ValueError, r"2 tokens .* single token"),
    ("target id out of range", dict(target=99999), ValueError, r"target token id.*outside the vocabulary"),
    ("target a float", dict(target=1.5), TypeError, r"target token as its text"),
    ("layer out of range", dict(layers=[4]), ValueError, r"layers \[4\].*0\.\.3"),
    ("position out of range", dict(positions=[-10]), ValueError, r"positions \[-10\].*0\.\.8"),
    ("no positions", dict(positions=[]), ValueError, r"positions list is empty"),
    ("layers as a string", dict(layers="12"), TypeError, r"layers must be a list of integers"),
]


@pytest.mark.parametrize("change, error, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_explained(tiny_engine, change, error, message):
    args = dict(clean_prompt=CLEAN, corrupt_prompt=CORRUPT, target=TARGET) | change
    with pytest.raises(error, match=message):
        patching_grid(tiny_engine, **args)

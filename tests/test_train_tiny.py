"""The trainer of the course's small models: masking, schedule, and resuming from a checkpoint."""

import pytest
import torch

from cyclelab.loading import corpus as data
from cyclelab.train.tiny import TinyConfig, lr_at, mask_tokens, train


def test_masking_follows_bert_proportions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (64, 128), generator=gen)
    inputs, labels = mask_tokens(x, mask_id=50, vocab_size=51, rate=0.15, gen=gen)
    chosen = labels != -100
    assert chosen.float().mean().item() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[chosen], x[chosen])  # labels are the original tokens
    assert (inputs[chosen] == 50).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.equal(inputs[~chosen], x[~chosen])  # positions not chosen are untouched


def test_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TinyConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=0.01)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


@pytest.fixture
def short_plays(monkeypatch):
    """The first 20,000 characters of two plays per split: resuming does not depend on the corpus size,
    and encoding and evaluating every play three times would take most of this test's time."""
    plays = data.plays

    def first_two(split: str) -> dict[str, str]:
        return {name: text[:20_000] for name, text in list(plays(split).items())[:2]}

    monkeypatch.setattr(data, "plays", first_two)


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_result(tmp_path, objective, short_plays):
    small = dict(
        vocab_size=300,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        batch_size=2,
        warmup=2,
        eval_every=2,
        eval_batches=1,
        threads=1,
        objective=objective,
    )
    straight = train(TinyConfig(steps=4, **small), tmp_path / "a-out", tmp_path / "a-work")
    train(TinyConfig(steps=2, **small), tmp_path / "b-out", tmp_path / "b-work")
    resumed = train(TinyConfig(steps=4, **small), tmp_path / "b-out", tmp_path / "b-work")
    assert resumed["valid_loss"] == pytest.approx(straight["valid_loss"], abs=1e-5)
    assert (tmp_path / "b-out" / "model.safetensors").exists() and (tmp_path / "b-out" / "README.md").exists()

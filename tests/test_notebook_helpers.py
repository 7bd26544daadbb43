"""Small helpers the chapters call for tables and figures: what they draw or print, checked
against hand-computed cases (not against the helpers' own output)."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cyclelab.core.events import Event, Stage, format_events  # noqa: E402
from cyclelab.lab.attention_heads import causal_mask, plot_attention  # noqa: E402
from cyclelab.lab.embedding import plot_rope_angles, plot_similarity  # noqa: E402
from cyclelab.lab.tokenization import BPE, train_timed  # noqa: E402
from cyclelab.train.finetune import History, plot_schedule  # noqa: E402
from cyclelab.train.tasks.sonnets import best_per_method, compare_methods, plot_losses, sonnets  # noqa: E402
from cyclelab.train.tasks.which_play import plot_confusion  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_causal_mask_hides_the_future_of_the_last_queries():
    # 2 queries, the last of 4 positions: position 2 sees 0..2, position 3 sees 0..3
    assert causal_mask(2, 4).tolist() == [[False, False, False, True], [False, False, False, False]]
    assert causal_mask(1, 3).tolist() == [[False, False, False]]
    with pytest.raises(ValueError, match="cannot be the last"):
        causal_mask(3, 2)


def test_format_events_lists_shapes_and_optional_times():
    events = [
        Event(0, Stage.READ, 1, "qkv", 0.0025, tensors={"q": torch.zeros(1, 6, 3, 32)}),
        Event(0, Stage.WRITEBACK, None, "choose", 0.001),
    ]
    lines = format_events(events).splitlines()
    assert lines[0].split() == ["cycle", "stage", "layer", "op", "tensors", "ms"]
    assert lines[1].split() == ["0", "READ", "1", "qkv", "q(1,", "6,", "3,", "32)", "2.500"]
    assert lines[2].split() == ["0", "WRITEBACK", "choose", "1.000"]
    assert "ms" not in format_events(events, times=False) and "2.500" not in format_events(events, times=False)


def test_plot_attention_draws_the_map_given():
    probs = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    ax = plot_attention(probs, tokens=["a\n", "b"], title="head 0")
    assert ax.images[0].get_array().tolist() == probs.tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a⏎", "b"]
    with pytest.raises(ValueError, match="one head at a time"):
        plot_attention(torch.zeros(2, 2, 2))


def test_plot_similarity_draws_the_matrix_with_labels():
    matrix = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    ax = plot_similarity(matrix, labels=["x", "y"], vmin=0, vmax=1)
    assert ax.images[0].get_array().tolist() == matrix.tolist()
    assert ax.images[0].get_clim() == (0, 1)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y"]


def test_plot_rope_angles_wraps_position_times_frequency():
    inv_freq = torch.tensor([1.0, 0.5, 0.1])
    left, right = plot_rope_angles(inv_freq, n_positions=8, pairs=(0, 2))
    for line, freq in zip(right.get_lines(), (1.0, 0.1)):
        want = [math.remainder(p * freq, 2 * math.pi) for p in range(8)]  # wrapped to [-π, π]
        assert line.get_ydata().tolist() == pytest.approx(want, abs=1e-6)  # 0.1 as a float32 frequency
    x, y = left.get_lines()[0].get_data()  # pair 0 walks the unit circle, one radian per position
    assert x.tolist() == pytest.approx([math.cos(p) for p in range(8)])
    assert y.tolist() == pytest.approx([math.sin(p) for p in range(8)])


def test_plot_schedule_warms_up_linearly_then_decays_to_the_floor():
    fig = plot_schedule(steps=50, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    y = fig.axes[0].get_lines()[0].get_ydata()
    assert len(y) == 50
    assert y[:10].tolist() == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])  # linear warmup to the peak
    assert y[10] == pytest.approx(1e-3) and all(a >= b for a, b in zip(y[10:], y[11:]))  # then never up
    assert y[-1] == pytest.approx(1e-4, rel=0.02)  # cosine to lr × min_lr_ratio


def test_plot_confusion_counts_each_true_and_predicted_pair():
    fig = plot_confusion([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], ["A", "B", "C"])
    ax = fig.axes[0]
    # rows true, columns predicted, counted by hand
    assert ax.images[0].get_array().tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert sorted(t.get_text() for t in ax.texts) == sorted("110010102")


def test_plot_losses_one_curve_per_method():
    rows = [
        {"method": "full", "lr": 0.001, "history": History(loss=[3.0, 2.0, 1.5])},
        {"method": "lora", "lr": 0.01, "history": History(loss=[3.0, 2.5])},
    ]
    ax = plot_losses(rows).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["full (lr 0.001)", "lora (lr 0.01)"]
    assert ax.get_lines()[0].get_ydata().tolist() == [3.0, 2.0, 1.5]
    assert ax.get_lines()[1].get_xdata().tolist() == [1, 2]


def test_train_timed_is_the_trainer_with_its_time():
    text = "low lower lowest newer newest " * 20
    bpe, seconds = train_timed(text, 256 + 12)
    assert bpe.merges == BPE.train(text, 256 + 12).merges and seconds > 0


def test_compare_methods_rows(tiny):
    poems = sonnets()
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    rows = compare_methods(
        tiny.model,
        tiny.tokenizer,
        poems[:4],
        poems[-2:],
        lrs=[1e-3, 1e-2],
        steps=2,
        batch_size=2,
        methods=("full", "lora"),
    )
    assert [(r["method"], r["lr"]) for r in rows] == [("full", 1e-3), ("full", 1e-2), ("lora", 1e-3), ("lora", 1e-2)]
    full, _, lora, _ = rows
    total = sum(p.numel() for p in tiny.model.parameters())
    assert full["trainable"] == full["total"] == total  # full fine-tuning trains every weight
    assert 0 < lora["trainable"] < total / 10  # LoRA a small fraction
    assert all(len(r["history"].loss) == 2 and math.isfinite(r["valid"]) for r in rows)
    best = best_per_method(rows)
    assert [b["valid"] for b in best] == [min(r["valid"] for r in rows if r["method"] == m) for m in ("full", "lora")]
    assert any(not torch.equal(p, before[n]) for n, p in full["model"].named_parameters())  # the copy trained
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())  # the shared model did not

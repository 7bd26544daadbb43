"""FETCH helpers (cyclelab.lab.embedding) against independent references: indexing, transformers' RoPE,
scikit-learn's cosine similarity and PCA, hand-computed cases; and the chapter-02 checkers."""

import math

import numpy as np
import pytest
import torch

from cyclelab.checks import check_embed_lookup, check_rope_pair
from cyclelab.core.engine import Engine
from cyclelab.lab.embedding import (
    analogy,
    cosine_matrix,
    embedding_matrix,
    lookup_bytes,
    mean_pool,
    nearest_to_vector,
    nearest_tokens,
    one_hot_lookup,
    pca_2d,
    rope_angles,
    rope_cos_sin,
    rope_dot,
    rope_inv_freq,
    rope_pair_permutation,
    rope_rotate,
    rope_rotate_interleaved,
    sentence_embeddings,
    sinusoidal_positions,
    token_id,
)

# --- the lookup ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[3, 1, 3], [[0, 9], [4, 4]], [0]])
def test_one_hot_lookup_equals_indexing_and_torch_embedding(ids):
    weight = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(ids)
    out = one_hot_lookup(weight, ids)
    assert out.shape == (*ids.shape, 5)
    torch.testing.assert_close(out, weight[ids])
    torch.testing.assert_close(out, torch.nn.functional.embedding(ids, weight))


@pytest.mark.parametrize(
    "weight,ids,message",
    [
        (torch.zeros(10), [1], "2-D"),
        (torch.zeros(10, 4), [], "no token ids"),
        (torch.zeros(10, 4), [1.5], "integers"),
        (torch.zeros(10, 4), [10], "0..9"),
        (torch.zeros(10, 4), [-1], "0..9"),
    ],
)
def test_lookup_rejects_bad_input(weight, ids, message):
    with pytest.raises(ValueError, match=message):
        one_hot_lookup(weight, ids)
    with pytest.raises(ValueError, match=message):
        lookup_bytes(weight, ids)


def test_lookup_bytes_by_hand():
    weight = torch.zeros(1000, 64)
    assert lookup_bytes(weight, [5, 6, 5]) == {"rows": 3 * 64 * 4, "row": 256, "matrix": 1000 * 64 * 4}
    assert lookup_bytes(weight.half(), [1])["rows"] == 128


def test_the_engine_reads_exactly_the_rows(smollm2):
    engine = Engine(smollm2)
    ids = engine.encode("The cat sat on the mat")
    event = next(engine.run(ids, max_new_tokens=1, capture={"embed"}))
    assert event.op == "embed"
    assert event.bytes == lookup_bytes(embedding_matrix(smollm2), ids)["rows"]
    torch.testing.assert_close(event.tensors["out"][0], one_hot_lookup(embedding_matrix(smollm2), ids))


def test_learned_positions_are_added_rows(tiny):
    engine = Engine(tiny)
    ids = engine.encode("ROMEO: But soft!")
    events = list(engine.run(ids, max_new_tokens=1, capture={"positions"}))
    x = next(e for e in events if e.op == "positions").tensors["out"][0]
    body = tiny.model.transformer
    torch.testing.assert_close(x, body.wte.weight[ids] + body.wpe.weight[: len(ids)])


# --- positions ------------------------------------------------------------------------------------


def test_cosine_matrix_matches_scikit_learn():
    from sklearn.metrics.pairwise import cosine_similarity

    x, y = torch.randn(7, 5), torch.randn(4, 5)
    np.testing.assert_allclose(cosine_matrix(x, y).numpy(), cosine_similarity(x.numpy(), y.numpy()), atol=1e-6)
    np.testing.assert_allclose(cosine_matrix(x).numpy(), cosine_similarity(x.numpy()), atol=1e-6)


@pytest.mark.parametrize(
    "x,y", [(torch.zeros(3, 4), torch.zeros(3, 5)), (torch.zeros(3), None), (torch.zeros(0, 4), None)]
)
def test_cosine_matrix_rejects_bad_shapes(x, y):
    with pytest.raises(ValueError):
        cosine_matrix(x, y)


def test_rope_angles_by_hand():
    inv_freq = rope_inv_freq(4, theta=100.0)  # pairs turn by 1 and 1/10 radian per position
    torch.testing.assert_close(inv_freq, torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(rope_angles([0, 1, 5], inv_freq).float(), torch.tensor([[0, 0], [1, 0.1], [5, 0.5]]))
    with pytest.raises(ValueError, match="non-empty"):
        rope_angles([], inv_freq)


def test_rope_rotate_turns_a_2d_vector_by_position_times_freq():
    inv_freq = torch.tensor([0.5])
    x = torch.tensor([[1.0, 0.0]] * 4)
    out = rope_rotate(x, [0, 1, 2, 3], inv_freq)
    want = torch.tensor([[math.cos(0.5 * p), math.sin(0.5 * p)] for p in range(4)])
    torch.testing.assert_close(out, want)


def test_rope_rotate_matches_transformers_llama(smollm2):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rotary = smollm2.model.model.rotary_emb
    q, k = torch.randn(1, 9, 12, 64), torch.randn(1, 3, 12, 64)
    positions = torch.arange(5, 17)
    cos, sin = rotary(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(rope_rotate(q, positions, rotary.inv_freq), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope_rotate(k, positions, rotary.inv_freq), ref_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(64, 100000.0))


def test_rope_keeps_lengths_and_scores_depend_only_on_distance():
    gen = torch.Generator().manual_seed(1)
    inv_freq = rope_inv_freq(64, 100000.0)
    q, k = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    rotated = rope_rotate(q[None].expand(50, 64), torch.arange(50), inv_freq)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm().expand(50))
    for distance in (0, 3, 40):
        values = [rope_dot(q, k, shift + distance, shift, inv_freq) for shift in (0, 7, 1000, 5000)]
        assert max(values) - min(values) < 1e-8
    assert rope_dot(q, k, 9, 9, inv_freq) == pytest.approx(float(q.double() @ k.double()))
    assert (
        abs(rope_dot(q, k, 3, 0, inv_freq) - rope_dot(q, k, 0, 3, inv_freq)) > 1e-3
    )  # the sign of the distance counts


def test_rope_interleaved_by_hand_and_as_complex_numbers():
    """The paper's layout: adjacent pairs, each a complex number times e^(i·position·freq) (Meta's Llama code)."""
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0]])  # pairs (1, 0) and (0, 2); freqs 1 and 0.5 at position 1
    out = rope_rotate_interleaved(x, [1], torch.tensor([1.0, 0.5]))
    expected = [math.cos(1), math.sin(1), -2 * math.sin(0.5), 2 * math.cos(0.5)]
    torch.testing.assert_close(out, torch.tensor([expected]))
    gen = torch.Generator().manual_seed(3)
    x, inv_freq, positions = (
        torch.randn(2, 7, 16, generator=gen, dtype=torch.float64),
        rope_inv_freq(16),
        torch.arange(7),
    )
    turned = torch.view_as_complex(x.reshape(2, 7, 8, 2).contiguous()) * torch.polar(
        torch.ones(7, 8, dtype=torch.float64), positions[:, None].double() * inv_freq.double()
    )
    torch.testing.assert_close(rope_rotate_interleaved(x, positions, inv_freq), torch.view_as_real(turned).flatten(-2))


def test_the_two_rope_layouts_are_one_rotation_up_to_a_permutation():
    assert rope_pair_permutation(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    gen = torch.Generator().manual_seed(4)
    x, inv_freq, positions = torch.randn(3, 5, 32, generator=gen), rope_inv_freq(32), torch.arange(5) * 9
    perm = rope_pair_permutation(32)
    torch.testing.assert_close(
        rope_rotate_interleaved(x[..., perm], positions, inv_freq),
        rope_rotate(x, positions, inv_freq)[..., perm],
        atol=1e-5,
        rtol=1e-5,
    )
    assert not torch.allclose(rope_rotate_interleaved(x, positions, inv_freq), rope_rotate(x, positions, inv_freq))


def test_sinusoidal_positions_by_hand_and_against_distilbert():
    from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings

    pe = sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8)
    assert math.isclose(pe[3, 2], math.sin(3 / 10000 ** (2 / 8)), abs_tol=1e-6)
    assert math.isclose(pe[3, 3], math.cos(3 / 10000 ** (2 / 8)), abs_tol=1e-6)
    assert pe[0].tolist() == [0.0, 1.0] * 4
    reference = torch.empty(256, 192)
    create_sinusoidal_embeddings(256, 192, reference)
    torch.testing.assert_close(sinusoidal_positions(256, 192), reference, atol=1e-5, rtol=1e-5)


def test_sinusoidal_dot_products_depend_only_on_distance():
    pe = sinusoidal_positions(300, 64).double()
    for gap in (1, 7, 50):
        dots = torch.stack([pe[m] @ pe[m + gap] for m in range(0, 240, 13)])
        torch.testing.assert_close(dots, dots[:1].expand_as(dots))


def test_mean_pool_against_a_loop_and_ignores_padding():
    gen = torch.Generator().manual_seed(6)
    hidden, mask = (
        torch.randn(3, 5, 4, generator=gen),
        torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]]),
    )
    want = torch.stack([hidden[0, :3].mean(0), hidden[1, 1:].mean(0), hidden[2, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), want)
    noisy = hidden.clone()
    noisy[mask == 0] = 1e6  # whatever the padding holds
    torch.testing.assert_close(mean_pool(noisy, mask), want)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mean_pool(torch.zeros(2, 3), torch.ones(2, 3)), "batch, tokens, width"),
        (lambda: mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4)), "mask .batch, tokens."),
        (lambda: rope_pair_permutation(7), "even"),
        (lambda: rope_pair_permutation(0), "even"),
        (lambda: rope_rotate_interleaved(torch.zeros(2, 6), [0, 1], rope_inv_freq(8)), "head_dim = 6|need head_dim"),
        (lambda: rope_rotate_interleaved(torch.zeros(3, 8), [0, 1], rope_inv_freq(8)), "2 positions"),
        (lambda: sinusoidal_positions(0, 8), "n_positions"),
        (lambda: sinusoidal_positions(10, 7), "even"),
        (lambda: sinusoidal_positions(10.5, 8), "n_positions"),
        (lambda: nearest_to_vector(None, torch.zeros(4), 0), "k must be a positive integer"),
    ],
    ids=[
        "pool hidden 2-D",
        "pool mask shape",
        "odd head_dim",
        "zero head_dim",
        "interleaved size",
        "interleaved positions",
        "no positions",
        "odd width",
        "float positions",
        "k zero",
    ],
)
def test_new_fetch_helpers_reject_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rope_rejects_mismatched_sizes():
    inv_freq = rope_inv_freq(8)
    with pytest.raises(ValueError, match="head_dim = 8"):
        rope_rotate(torch.zeros(3, 6), [0, 1, 2], inv_freq)
    with pytest.raises(ValueError, match="3 positions"):
        rope_rotate(torch.zeros(2, 8), [0, 1, 2], inv_freq)
    with pytest.raises(ValueError, match="same size"):
        rope_dot(torch.zeros(8), torch.zeros(6), 0, 1, inv_freq)
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(7)


def test_rope_cos_sin_is_what_the_engine_uses(smollm2):
    events = list(Engine(smollm2).run("one two three", max_new_tokens=1, capture={"positions"}))
    cos = next(e for e in events if e.op == "positions").tensors["cos"]
    ref, _ = rope_cos_sin(torch.arange(cos.shape[0]), rope_inv_freq(64, 100000.0))
    torch.testing.assert_close(cos, ref)


# --- geometry --------------------------------------------------------------------------------------


def test_nearest_tokens_match_a_scikit_learn_search(smollm2):
    from sklearn.metrics.pairwise import cosine_similarity

    weight = embedding_matrix(smollm2).numpy()
    i = token_id(smollm2, " king")
    sims = cosine_similarity(weight[i : i + 1], weight)[0]
    sims[i] = -np.inf
    ref = [smollm2.tokenizer.decode([j]) for j in np.argsort(-sims)[:6]]
    got = nearest_tokens(smollm2, " king", k=6)
    assert [t for t, _ in got] == ref
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    assert " queen" in ref


def test_nearest_tokens_on_an_encoder(minilm):
    assert "queen" in [t for t, _ in nearest_tokens(minilm, "king", k=10)]


def test_analogy_against_the_arithmetic(smollm2):
    weight = embedding_matrix(smollm2)
    a, b, c = (token_id(smollm2, w) for w in (" king", " man", " woman"))
    target = weight[a] - weight[b] + weight[c]
    sims = torch.nn.functional.cosine_similarity(target[None], weight)
    top_all = smollm2.tokenizer.decode([int(sims.argmax())])
    assert analogy(smollm2, " king", " man", " woman", k=1, exclude_inputs=False)[0][0] == top_all
    got = analogy(smollm2, " king", " man", " woman", k=3)
    assert got[0][0] == " queen"  # observed for SmolLM2-135M; the chapter prints the full list
    assert not {" king", " man", " woman"} & {t for t, _ in got}


def test_words_must_be_single_tokens(smollm2):
    with pytest.raises(ValueError, match="try ' queen'"):
        token_id(smollm2, "queen")  # 'que' + 'en'
    with pytest.raises(ValueError, match="non-empty"):
        token_id(smollm2, "")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_id(smollm2, 10**9)
    with pytest.raises(ValueError, match="positive integer"):
        nearest_tokens(smollm2, " king", k=0)
    assert token_id(smollm2, 42) == 42


def test_pca_2d_matches_an_svd():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=gen) * torch.tensor([5.0, 3, 1, 1, 0.5, 0.1])
    coords, explained = pca_2d(x)
    centred = (x.double() - x.double().mean(0)).numpy()
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords), np.abs(centred @ vt[:2].T), atol=1e-8)
    np.testing.assert_allclose(explained, s[:2] ** 2 / (s**2).sum(), atol=1e-10)
    with pytest.raises(ValueError, match="at least 2 rows"):
        pca_2d(torch.zeros(1, 5))


def test_sentence_similarity_ranks_a_paraphrase_first(minilm):
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    sims = cosine_matrix(sentence_embeddings(minilm, sentences))
    assert sims[0, 1] > sims[0, 2] + 0.2
    torch.testing.assert_close(sims.diagonal(), torch.ones(3), atol=1e-5, rtol=0)


# --- the checkers ---------------------------------------------------------------------------------------


def test_embed_lookup_checker():
    assert check_embed_lookup(lambda w, ids: w[ids])
    assert check_embed_lookup(one_hot_lookup)
    stub = check_embed_lookup(lambda w, ids: torch.zeros(*torch.as_tensor(ids).shape, w.shape[1]))
    assert not stub and "zeros" in stub.message
    columns = check_embed_lookup(lambda w, ids: w[:, ids])
    assert not columns and "ROW" in columns.message
    shifted = check_embed_lookup(lambda w, ids: w[(ids - 1).clamp(min=0)])
    assert not shifted and "one row too early" in shifted.message
    flat = check_embed_lookup(lambda w, ids: w[ids.flatten()])
    assert not flat and "ids.shape + (width,)" in flat.message
    onehot = check_embed_lookup(lambda w, ids: torch.nn.functional.one_hot(ids, w.shape[0]).float())
    assert not onehot and "one-hot" in onehot.message


def test_rope_pair_checker():
    def right(x, y, position, freq):
        a = position * freq
        return x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)

    assert check_rope_pair(right)
    assert check_rope_pair(
        lambda x, y, p, f: tuple(
            rope_rotate(torch.tensor([[x, y]], dtype=torch.float64), [p], torch.tensor([f], dtype=torch.float64))[0]
        )
    )
    assert not check_rope_pair(lambda x, y, p, f: (x, y))
    clockwise = check_rope_pair(lambda x, y, p, f: right(x, y, -p, f))
    assert not clockwise and "wrong way" in clockwise.message
    no_position = check_rope_pair(lambda x, y, p, f: right(x, y, 1, f))
    assert not no_position and "grow with the position" in no_position.message
    degrees = check_rope_pair(lambda x, y, p, f: right(x, y, 1, math.radians(p * f)))
    assert not degrees and "radians" in degrees.message
    mixed = check_rope_pair(
        lambda x, y, p, f: (x * math.cos(p * f) - y * math.sin(p * f), x * math.sin(p) + y * math.cos(p))
    )
    assert not mixed and "length" in mixed.message
    broken = check_rope_pair(lambda x, y, p, f: 1 / 0)
    assert not broken and "ZeroDivisionError" in broken.message

"""Embeddings and positions: the FETCH stage turns token ids into vectors.

Two ways a model knows where a token is: GPT-2 adds a *learned* position vector;
Llama-family models *rotate* queries and keys by an angle that grows with the
position (rotary position embedding, RoPE).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from cyclelab.core.rope import apply_rope, rope_cos_sin, rotate_half  # noqa: F401 (the engine's RoPE, re-exported)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE frequencies: pair ``i`` of a head turns by ``theta ** (-2i / head_dim)`` per position."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, not {head_dim}")
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling: the average of each sentence's vectors over its real tokens only.

    ``hidden`` is (batch, tokens, width), ``mask`` (batch, tokens) with 1 for a real token
    and 0 for padding; the result is (batch, width).
    """
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"need hidden (batch, tokens, width) and mask (batch, tokens), got {tuple(hidden.shape)} "
            f"and {tuple(mask.shape)}"
        )
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1): 0 silences the padding
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def sentence_embeddings(loaded, sentences: list[str]) -> torch.Tensor:
    """Unit-length sentence vectors from an encoder (e.g. ``minilm``): the mean of its
    last hidden states over real (non-padding) tokens, as all-MiniLM-L6-v2 was trained."""
    if isinstance(sentences, str) or not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError("give a non-empty list of non-empty sentences")
    batch = loaded.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


# --- FETCH as a memory read -------------------------------------------------------------


def embedding_matrix(loaded) -> torch.Tensor:
    """The token embedding matrix ``(vocab, width)`` of a loaded model (read in place, no copy)."""
    return loaded.model.get_input_embeddings().weight.detach()


def _check_lookup(weight: torch.Tensor, ids) -> torch.Tensor:
    """Validate ``weight`` (vocab, width) and integer ``ids``; return ids as a long tensor."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"the embedding matrix must be 2-D (vocab, width), got shape {tuple(getattr(weight, 'shape', ()))}"
        )
    ids = torch.as_tensor(ids)
    if ids.numel() == 0:
        raise ValueError("no token ids given: look up at least one id")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]:
        raise ValueError(f"token ids must lie in 0..{weight.shape[0] - 1}, got {int(ids.min())}..{int(ids.max())}")
    return ids.long().to(weight.device)


def one_hot_lookup(weight: torch.Tensor, ids) -> torch.Tensor:
    """The embedding lookup written as a matrix product: ``one_hot(ids) @ weight``.

    Equal to ``weight[ids]`` — but it multiplies the whole matrix (``vocab × width``
    multiply-adds per token) to select one row, which is why models index instead.
    Shape: ``ids.shape + (width,)``.
    """
    ids = _check_lookup(weight, ids)
    one_hot = torch.nn.functional.one_hot(ids, weight.shape[0]).to(weight.dtype)
    return one_hot @ weight


def lookup_bytes(weight: torch.Tensor, ids) -> dict[str, int]:
    """Bytes a lookup reads: the rows it needs (``rows``) against the whole matrix (``matrix``).

    ``rows`` counts one row per token (a repeated id is read again, as the engine does).
    """
    ids = _check_lookup(weight, ids)
    row = weight.shape[1] * weight.element_size()
    return {"rows": ids.numel() * row, "row": row, "matrix": weight.numel() * weight.element_size()}


# --- positions ----------------------------------------------------------------------------


def cosine_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every row of ``x`` with every row of ``y`` (default: ``x``)."""
    y = x if y is None else y
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two 2-D tensors with the same width, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("cosine_matrix needs at least one row on each side")
    f = torch.nn.functional.normalize
    return f(x.detach().float(), dim=-1) @ f(y.detach().float(), dim=-1).T


def rope_angles(positions, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotation angle (radians, not wrapped) of each RoPE pair at each position:
    ``(len(positions), head_dim // 2)``; pair ``i`` turns by ``inv_freq[i]`` per position."""
    positions = torch.as_tensor(positions)
    if positions.dim() != 1 or positions.numel() == 0:
        raise ValueError("positions must be a non-empty 1-D sequence")
    return positions.double()[:, None] * inv_freq.double()[None, :]


def _rope_angles_for(x: torch.Tensor, positions, inv_freq: torch.Tensor) -> torch.Tensor:
    """Check ``x`` (…, positions, head_dim) against ``positions`` and ``inv_freq``; return the angles (float64)."""
    positions = torch.as_tensor(positions)
    if x.shape[-1] != 2 * inv_freq.shape[0]:
        raise ValueError(
            f"vectors of size {x.shape[-1]} do not match {inv_freq.shape[0]} RoPE frequencies "
            f"(need head_dim = {2 * inv_freq.shape[0]})"
        )
    if positions.dim() != 1 or x.dim() < 2 or x.shape[-2] != positions.numel():
        raise ValueError(
            f"x must be (..., positions, head_dim) with {positions.numel()} positions, got {tuple(x.shape)}"
        )
    return rope_angles(positions, inv_freq).to(x.device)  # float64: exact enough for far positions


def rope_rotate(x: torch.Tensor, positions, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate vectors ``x`` (…, positions, head_dim) as RoPE does at the given positions.

    Pair ``i`` is ``(x[i], x[i + head_dim/2])``, the layout of Llama in ``transformers``
    (:func:`rotate_half`); :func:`rope_rotate_interleaved` is the paper's layout.
    """
    angles = _rope_angles_for(x, positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return apply_rope(x, angles.cos(), angles.sin())


def rope_rotate_interleaved(x: torch.Tensor, positions, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE as the paper writes it (Su et al., RoFormer): pair ``i`` is the ADJACENT ``(x[2i], x[2i + 1])``,
    turned by ``position × inv_freq[i]``. The same rotation as :func:`rope_rotate` once the
    dimensions are reordered by :func:`rope_pair_permutation`."""
    angles = _rope_angles_for(x, positions, inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # the two numbers of each pair
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def rope_pair_permutation(head_dim: int) -> torch.Tensor:
    """The order ``[0, d/2, 1, d/2 + 1, …]``: ``x[..., perm]`` puts each ``rotate_half`` pair
    ``(i, i + d/2)`` side by side, where the paper's layout keeps its pairs."""
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()


def sinusoidal_positions(n_positions: int, width: int, base: float = 10000.0) -> torch.Tensor:
    """The original Transformer's fixed position vectors (Vaswani et al. 2017), ``(n_positions, width)``:
    ``PE[p, 2i] = sin(p · f_i)`` and ``PE[p, 2i + 1] = cos(p · f_i)``, with RoPE's frequencies
    ``f_i = base ** (-2i / width)``. Added to the token vectors at FETCH, like learned positions."""
    if not isinstance(n_positions, int) or n_positions < 1:
        raise ValueError(f"n_positions must be a positive int, got {n_positions!r}")
    if not isinstance(width, int) or width < 2 or width % 2:
        raise ValueError(f"width must be a positive even int (sin and cos come in pairs), got {width!r}")
    angles = rope_angles(torch.arange(n_positions), rope_inv_freq(width, base))  # (positions, width / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).float()


def rope_dot(q: torch.Tensor, k: torch.Tensor, pos_q: int, pos_k: int, inv_freq: torch.Tensor) -> float:
    """The attention score (unscaled dot product) of query ``q`` at ``pos_q`` with key ``k`` at ``pos_k``
    after both are rotated by RoPE. It depends only on ``pos_q - pos_k``: a rotation by ``a``
    then by ``-b`` is a rotation by ``a - b``."""
    if q.dim() != 1 or q.shape != k.shape:
        raise ValueError(f"q and k must be two vectors of the same size, got {tuple(q.shape)} and {tuple(k.shape)}")
    q_rot = rope_rotate(q.double()[None], [pos_q], inv_freq)[0]
    k_rot = rope_rotate(k.double()[None], [pos_k], inv_freq)[0]
    return float(q_rot @ k_rot)


def plot_rope_angles(inv_freq: torch.Tensor, n_positions: int = 64, pairs=(0, 4, 8, 16), ax=None):
    """Two panels: pair ``i`` of a unit vector drawn in its plane as the position grows (left),
    and its angle, wrapped to (-π, π], against the position (right)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    angles = rope_angles(torch.arange(n_positions), inv_freq)
    for i in pairs:
        a = angles[:, i]
        (line,) = ax[0].plot(a.cos(), a.sin(), "o-", ms=3, lw=0.6, label=f"pair {i}")
        ax[0].plot(a.cos()[:1], a.sin()[:1], "k*", ms=10)
        wrapped = torch.atan2(a.sin(), a.cos())
        ax[1].plot(
            range(n_positions),
            wrapped,
            ".",
            ms=4,
            color=line.get_color(),
            label=f"pair {i}: {float(inv_freq[i]):.3g} rad/position",
        )
    ax[0].set(
        aspect="equal",
        title="a pair's point as the position grows (★ = position 0)",
        xlabel="x[i]",
        ylabel="x[i + d/2]",
    )
    ax[1].set(xlabel="position", ylabel="angle (radians, wrapped)", title="angle of each pair against position")
    ax[0].legend(fontsize=7, loc="center")
    ax[1].legend(fontsize=7, loc="lower right")
    return ax


def plot_similarity(
    matrix: torch.Tensor,
    labels=None,
    ax=None,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
):
    """A heatmap of a square similarity matrix, with optional row/column labels."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.2))
    image = ax.imshow(torch.as_tensor(matrix).detach().float().cpu(), cmap=cmap, vmin=vmin, vmax=vmax)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
    return ax


# --- geometry of meaning ----------------------------------------------------------------------


def token_id(loaded, word) -> int:
    """The id of ``word`` if it is exactly one token (an int is taken as an id).

    Byte-level BPE models spell a word inside a sentence with its leading space:
    ``" king"`` and ``"king"`` are different tokens.
    """
    vocab = embedding_matrix(loaded).shape[0]
    if isinstance(word, int):
        if not 0 <= word < vocab:
            raise ValueError(f"token id {word} is outside the vocabulary (0..{vocab - 1})")
        return word
    if not isinstance(word, str) or not word:
        raise ValueError("give a word (a non-empty string) or a token id")
    ids = loaded.tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [loaded.tokenizer.decode([i]) for i in ids]
        hint = "" if word.startswith(" ") else f"; try {' ' + word!r} (with the leading space a word has mid-sentence)"
        raise ValueError(f"{word!r} is {len(ids)} tokens {pieces}, not one{hint}")
    return ids[0]


def nearest_to_vector(loaded, vector: torch.Tensor, k: int, exclude: Collection[int] = ()) -> list[tuple[str, float]]:
    """The ``k`` rows of the embedding matrix most similar to ``vector`` by cosine similarity
    (ids in ``exclude`` left out), as ``(token text, similarity)`` from most similar down."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    weight = embedding_matrix(loaded)
    sims = cosine_matrix(vector[None], weight)[0]
    if exclude:
        sims[list(exclude)] = float("-inf")
    top = sims.topk(min(k, weight.shape[0] - len(exclude)))
    return [(loaded.tokenizer.decode([int(i)]), float(s)) for s, i in zip(top.values, top.indices)]


def nearest_tokens(loaded, word, k: int = 8) -> list[tuple[str, float]]:
    """The ``k`` tokens whose embedding rows are closest to ``word``'s by cosine similarity
    (the word itself left out), as ``(token text, similarity)`` from most similar down."""
    i = token_id(loaded, word)
    return nearest_to_vector(loaded, embedding_matrix(loaded)[i].float(), k, {i})


def analogy(loaded, a, b, c, k: int = 5, exclude_inputs: bool = True) -> list[tuple[str, float]]:
    """Tokens nearest to ``E[a] - E[b] + E[c]`` ("king" - "man" + "woman"), by cosine similarity.

    The classic word-vector papers leave ``a``, ``b`` and ``c`` themselves out of the
    answer (``exclude_inputs=True``); often the nearest vector is ``a`` itself.
    """
    ids = [token_id(loaded, w) for w in (a, b, c)]
    weight = embedding_matrix(loaded).float()
    vector = weight[ids[0]] - weight[ids[1]] + weight[ids[2]]
    return nearest_to_vector(loaded, vector, k, set(ids) if exclude_inputs else set())


def pca_2d(x: torch.Tensor):
    """Project rows of ``x`` onto their two principal components (scikit-learn PCA).

    Returns ``(coords, explained)``: an ``(n, 2)`` numpy array and the fraction of the
    variance each of the two axes explains.
    """
    from sklearn.decomposition import PCA

    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise ValueError(f"PCA to 2-D needs at least 2 rows and 2 columns, got shape {tuple(x.shape)}")
    pca = PCA(n_components=2, svd_solver="full")
    coords = pca.fit_transform(x.detach().double().cpu().numpy())
    return coords, pca.explained_variance_ratio_

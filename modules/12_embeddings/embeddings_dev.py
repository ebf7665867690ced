# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Module 12: Embeddings
#
# > Token embeddings as a learned lookup table, and the sinusoidal positional encoding.

# %%
#| default_exp core.embeddings

# %% [markdown]
# A language model reads integer token ids, but every layer after the first wants vectors of real
# numbers. This module provides the two pieces that turn a sequence of ids into such vectors:
# an `Embedding` (what each token means) and a `PositionalEncoding` (where it sits).
#
# ## Embeddings are lookups into a learned table
#
# Keep a matrix $W \in \mathbb{R}^{V \times d}$, one row per token of a vocabulary of size $V$.
# Write token $t$ as a one-hot row vector $e_t \in \{0, 1\}^{V}$ and feed it to a linear layer
# (no bias) with weights $W$:
#
# $$e_t W = W_{t,:},$$
#
# which is just row $t$ of $W$. So an embedding layer *is* a linear layer on one-hot inputs, but
# computing it as an index, `W[ids]`, costs $O(d)$ per token instead of $O(Vd)$ and never builds
# the $V$-wide one-hot vectors. The rows start out random and are learned: tokens used in similar
# contexts end up with nearby rows. Any array of ids works, and the output gets one extra axis of
# size $d$: ids of shape `(batch, seq)` become vectors of shape `(batch, seq, d)`.
#
# The rows are drawn from $\mathcal{N}(0, 1/d)$, i.e. standard normals scaled by $1/\sqrt{d}$, so a
# row has squared length about 1 whatever $d$ is. The lookup reads `self.weight.data` each time
# it is called, so a training step that updates the table in place is seen by the next call.

# %%
#| export
import numpy as np

from tinytorch.core.tensor import Tensor


def _check_size(owner, name, value):
    """`value` as an int, after checking it is an integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be at least 1, got {value}")
    return int(value)


class Embedding:
    """A table of `vocab_size` learned vectors of length `embedding_dim`, indexed by token id."""

    def __init__(self, vocab_size, embedding_dim, seed=None):
        self.vocab_size = _check_size("Embedding", "vocab_size", vocab_size)
        self.embedding_dim = _check_size("Embedding", "embedding_dim", embedding_dim)
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((self.vocab_size, self.embedding_dim)) / np.sqrt(self.embedding_dim)
        self.weight = Tensor(table, dtype=np.float32)

    def forward(self, ids):
        """The rows of the table for `ids` (any shape): a Tensor of shape `ids.shape + (embedding_dim,)`."""
        ids = ids.data if isinstance(ids, Tensor) else np.asarray(ids)
        if ids.size == 0:
            ids = ids.astype(np.int64)  # np.asarray([]) is float64; an empty batch is still valid
        if ids.dtype.kind not in "iu":
            raise TypeError(f"Embedding: token ids must be integers, got dtype {ids.dtype}")
        outside = ids[(ids < 0) | (ids >= self.vocab_size)]
        if outside.size:
            raise ValueError(
                f"Embedding: token id {outside.flat[0]} is out of range for vocab_size {self.vocab_size} "
                f"(valid ids are 0 to {self.vocab_size - 1})"
            )
        return Tensor(self.weight.data[ids])

    def __call__(self, ids):
        return self.forward(ids)

    def parameters(self):
        return [self.weight]

    def __repr__(self):
        return f"Embedding(vocab_size={self.vocab_size}, embedding_dim={self.embedding_dim})"


# %%
def test_unit_embedding():
    emb = Embedding(5, 3, seed=0)
    assert emb.weight.shape == (5, 3) and emb.weight.dtype == np.float32
    expected = np.random.default_rng(0).standard_normal((5, 3)) / np.sqrt(3)
    np.testing.assert_allclose(emb.weight.data, expected, rtol=1e-6, atol=1e-7)
    ids = np.array([[4, 0], [2, 2]])
    out = emb(ids)
    assert isinstance(out, Tensor) and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out.data[0, 0], emb.weight.data[4])
    np.testing.assert_array_equal(out.data[1, 1], emb.weight.data[2])
    emb.weight.data[2] = 7.0  # an in-place update, as an optimiser would make
    np.testing.assert_array_equal(emb([2]).data, [[7.0, 7.0, 7.0]])
    try:
        emb([1, 5])
    except ValueError as error:
        assert "5" in str(error) and "vocab_size 5" in str(error)
    else:
        raise AssertionError("an out-of-range id was accepted")


test_unit_embedding()

# %% [markdown]
# ## Positional encoding: where a token sits
#
# Attention treats its input as a *set*: shuffle the tokens and each output is shuffled the same
# way. Word order has to be written into the vectors themselves. Vaswani et al. (2017) add a fixed
# vector $PE_{pos}$ to the embedding of the token at position $pos$. With $d$ the embedding size
# and $\omega_i = 1 / 10000^{2i/d}$,
#
# $$PE_{pos,\,2i} = \sin(\omega_i\, pos), \qquad PE_{pos,\,2i+1} = \cos(\omega_i\, pos).$$
#
# Each pair of columns is a clock hand turning at its own speed: the first pairs turn once every
# few positions, the last pairs barely move across thousands, so together they give every position
# a distinct code. The useful property is that moving by a fixed offset $k$ is the same rotation
# wherever you start:
#
# $$\begin{pmatrix}\sin \omega_i(pos+k) \\ \cos \omega_i(pos+k)\end{pmatrix}
# = \begin{pmatrix}\cos \omega_i k & \sin \omega_i k \\ -\sin \omega_i k & \cos \omega_i k\end{pmatrix}
# \begin{pmatrix}\sin \omega_i pos \\ \cos \omega_i pos\end{pmatrix},$$
#
# a matrix that depends on $k$ only, so relative offsets are linear functions of the codes, easy
# for a layer to pick up. Nothing is learned: the table is computed once for every position up to
# `max_seq_length`. When $d$ is odd the last column is a $2i$ column, so it is a sine.

# %%
#| export
class PositionalEncoding:
    """Adds the fixed sinusoidal position code of Vaswani et al. (2017) to a sequence of vectors."""

    def __init__(self, embedding_dim, max_seq_length=5000):
        self.embedding_dim = _check_size("PositionalEncoding", "embedding_dim", embedding_dim)
        self.max_seq_length = _check_size("PositionalEncoding", "max_seq_length", max_seq_length)
        positions = np.arange(self.max_seq_length)[:, None]          # (max_seq_length, 1)
        even_columns = np.arange(0, self.embedding_dim, 2)            # the 2i of the formula
        angles = positions / 10000.0 ** (even_columns / self.embedding_dim)
        encoding = np.empty((self.max_seq_length, self.embedding_dim))
        encoding[:, 0::2] = np.sin(angles)
        encoding[:, 1::2] = np.cos(angles[:, : self.embedding_dim // 2])  # odd d: one cos fewer
        self.encoding = encoding.astype(np.float32)

    def forward(self, x):
        """`x + encoding[:seq]` for `x` of shape (batch, seq, embedding_dim) or (seq, embedding_dim)."""
        x = x.data if isinstance(x, Tensor) else np.asarray(x)
        if x.ndim not in (2, 3):
            raise ValueError(
                f"PositionalEncoding: expected shape (batch, seq, {self.embedding_dim}) or "
                f"(seq, {self.embedding_dim}), got {x.shape}"
            )
        seq_length, width = x.shape[-2], x.shape[-1]
        if width != self.embedding_dim:
            raise ValueError(
                f"PositionalEncoding: last dimension {width} does not match "
                f"embedding_dim {self.embedding_dim}"
            )
        if seq_length > self.max_seq_length:
            raise ValueError(
                f"PositionalEncoding: sequence length {seq_length} exceeds "
                f"max_seq_length {self.max_seq_length}"
            )
        return Tensor(x + self.encoding[:seq_length], dtype=np.float32)

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self):
        return f"PositionalEncoding(embedding_dim={self.embedding_dim}, max_seq_length={self.max_seq_length})"


# %%
def test_unit_positional_encoding():
    pe = PositionalEncoding(5, max_seq_length=10)
    assert pe.encoding.shape == (10, 5) and pe.encoding.dtype == np.float32
    np.testing.assert_allclose(pe.encoding[0], [0, 1, 0, 1, 0], atol=1e-7)  # sin 0, cos 0, ...
    np.testing.assert_allclose(pe.encoding[1, 0], np.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(pe.encoding[1, 1], np.cos(1.0), rtol=1e-6)
    np.testing.assert_allclose(pe.encoding[3, 4], np.sin(3 / 10000 ** (4 / 5)), rtol=1e-6)  # odd d: sin
    out = pe(np.zeros((2, 4, 5)))
    assert isinstance(out, Tensor) and out.dtype == np.float32 and out.shape == (2, 4, 5)
    np.testing.assert_array_equal(out.data[1], pe.encoding[:4])
    try:
        pe(np.zeros((1, 11, 5)))
    except ValueError as error:
        assert "11" in str(error) and "10" in str(error)
    else:
        raise AssertionError("a too-long sequence was accepted")


test_unit_positional_encoding()

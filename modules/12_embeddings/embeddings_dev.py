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
# numbers. This module provides the pieces that turn a sequence of ids into such vectors: an
# `Embedding` (what each token means) and a position code, either the fixed
# `PositionalEncoding` or a `LearnedPositionalEmbedding` (where each token sits).
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
# By default the rows are drawn from $\mathcal{N}(0, 1/d)$, i.e. standard normals scaled by
# $1/\sqrt{d}$, so a row has squared length about 1 whatever $d$ is. The lookup reads
# `self.weight.data` each time it is called, so a training step that updates the table in place
# is seen by the next call.
#
# **Other starting tables.** `init_type="uniform"` draws from $U(-1/\sqrt{d}, 1/\sqrt{d})$ (each
# entry has variance $1/(3d)$), and `init_type="xavier"` from Glorot's
# $U(-\sqrt{6/(V+d)}, \sqrt{6/(V+d)})$, the bound that keeps the variance of a linear layer's
# outputs and of its gradients equal when it maps $V$ inputs to $d$ outputs.
#
# **Padding.** Sentences in a batch have different lengths, so short ones are filled up with a
# padding token that should carry no meaning. With `padding_idx=p` row $p$ starts at zero and
# every lookup of id $p$ returns zeros, *whatever row p of the table holds*. The output therefore
# does not depend on that row, so its gradient is zero and a gradient step never moves it: the
# same contract as PyTorch's `nn.Embedding(padding_idx=p)`. A negative `padding_idx` counts from
# the end, as in PyTorch, and is stored as the equivalent non-negative id.
#
# **Ids.** Integer arrays, lists and Tensors work, and so do floating ids that hold whole
# numbers (`Tensor([1.0, 2.0])`, which stores float32). An id of 1.5, NaN or infinity, or one
# outside `0 .. vocab_size - 1`, raises a `ValueError` that names it; booleans, strings and other
# non-numbers raise `TypeError`.
#
# **Parameters and memory.** `parameters` is a `ParameterList` (module 02): `emb.parameters` and
# `emb.parameters()` are both `[emb.weight]`. `get_memory_usage()` reports the table's size: $V d$
# numbers of 4 bytes each, in MiB (`2**20` bytes; "MB" in the key names means MiB).

# %%
#| export
import numpy as np

from tinytorch.core.tensor import ParameterList, Tensor

_INIT_TYPES = ("uniform", "normal", "xavier")  # the starting tables Embedding can draw


def _check_size(owner, name, value):
    """`value` as an int, after checking it is an integer of at least 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be at least 1, got {value}")
    return int(value)


def _check_padding_idx(padding_idx, vocab_size):
    """`padding_idx` as a row in 0..vocab_size-1 (a negative one counts from the end), or None."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, (bool, np.bool_)) or not isinstance(padding_idx, (int, np.integer)):
        raise TypeError(f"Embedding: padding_idx must be an integer or None, got {padding_idx!r}")
    if not -vocab_size <= padding_idx < vocab_size:
        raise ValueError(
            f"Embedding: padding_idx must be in {-vocab_size} to {vocab_size - 1} for vocab_size "
            f"{vocab_size}, got {padding_idx}"
        )
    return int(padding_idx) % vocab_size


def _initial_table(init_type, vocab_size, embedding_dim, rng):
    """A (vocab_size, embedding_dim) float64 table drawn as `init_type` says."""
    shape = (vocab_size, embedding_dim)
    if init_type == "normal":
        return rng.standard_normal(shape) / np.sqrt(embedding_dim)
    if init_type == "uniform":
        bound = 1.0 / np.sqrt(embedding_dim)
    else:  # "xavier": Glorot's bound for a layer with vocab_size inputs and embedding_dim outputs
        bound = np.sqrt(6.0 / (vocab_size + embedding_dim))
    return rng.uniform(-bound, bound, shape)


def _first_index(flags):
    """The index (a tuple) of the first True in `flags`, for error messages."""
    return tuple(int(i) for i in np.argwhere(flags)[0])


def _token_ids(ids, vocab_size):
    """`ids` (array, list, Tensor or number) as an int64 array of valid token ids."""
    data = ids.data if isinstance(ids, Tensor) else ids
    try:
        array = np.asarray(data)
    except (TypeError, ValueError):  # ragged nested lists
        raise TypeError(f"Embedding: ids must be an array of integers, got {type(ids).__name__} {ids!r}") from None
    if array.size == 0:
        return array.astype(np.int64)  # np.asarray([]) is float64; an empty batch is still valid
    if array.dtype.kind == "f":
        not_finite = ~np.isfinite(array)
        if not_finite.any():
            where = _first_index(not_finite)
            raise ValueError(f"Embedding: ids must be finite token ids, got {array[where]} at index {where}")
        fractional = array != np.floor(array)
        if fractional.any():
            where = _first_index(fractional)
            raise ValueError(
                f"Embedding: ids must be whole numbers, got {array[where]} at index {where} "
                f"(dtype {array.dtype})"
            )
    elif array.dtype.kind not in "iu":
        raise TypeError(f"Embedding: token ids must be integers, got dtype {array.dtype}")
    outside = (array < 0) | (array >= vocab_size)
    if outside.any():
        raise ValueError(
            f"Embedding: token id {int(array[_first_index(outside)])} is out of range for vocab_size "
            f"{vocab_size} (valid ids are 0 to {vocab_size - 1})"
        )
    return array.astype(np.int64)


class Embedding:
    """A table of `vocab_size` learned vectors of length `embedding_dim`, indexed by token id."""

    def __init__(self, vocab_size, embedding_dim, padding_idx=None, init_type="normal", *, seed=None):
        self.vocab_size = _check_size("Embedding", "vocab_size", vocab_size)
        self.embedding_dim = _check_size("Embedding", "embedding_dim", embedding_dim)
        self.padding_idx = _check_padding_idx(padding_idx, self.vocab_size)
        if not (isinstance(init_type, str) and init_type in _INIT_TYPES):
            choices = ", ".join(map(repr, _INIT_TYPES))
            raise ValueError(f"Embedding: init_type must be one of {choices}, got {init_type!r}")
        self.init_type = init_type
        table = _initial_table(init_type, self.vocab_size, self.embedding_dim, np.random.default_rng(seed))
        if self.padding_idx is not None:
            table[self.padding_idx] = 0.0
        self.weight = Tensor(table, dtype=np.float32)

    @property
    def parameters(self):
        """[weight]; also callable as `parameters()`."""
        return ParameterList([self.weight])

    def forward(self, ids):
        """The rows of the table for `ids` (any shape): a Tensor of shape `ids.shape + (embedding_dim,)`.

        Ids equal to `padding_idx` give zero vectors.
        """
        ids = _token_ids(ids, self.vocab_size)
        rows = self.weight.data[ids]  # fancy indexing copies: (*ids.shape, embedding_dim)
        if self.padding_idx is not None:
            rows[ids == self.padding_idx] = 0.0
        return Tensor(rows)

    def __call__(self, ids):
        return self.forward(ids)

    def get_memory_usage(self):
        """The table's size: parameter count, MiB (2**20 bytes) in total and KiB per token."""
        count = self.weight.size
        table_mb = self.weight.data.nbytes / 2**20
        return {
            "parameter_count": count,
            "parameter_mb": table_mb,
            "total_parameters": count,
            "total_memory_mb": table_mb,
            "memory_per_token_kb": self.embedding_dim * self.weight.data.itemsize / 2**10,
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
        }

    def __repr__(self):
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"Embedding(vocab_size={self.vocab_size}, embedding_dim={self.embedding_dim}{padding})"


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
    np.testing.assert_array_equal(emb(Tensor([4.0, 2.0])).data, emb.weight.data[[4, 2]])  # whole floats
    emb.weight.data[2] = 7.0  # an in-place update, as an optimiser would make
    np.testing.assert_array_equal(emb([2]).data, [[7.0, 7.0, 7.0]])
    assert emb.parameters()[0] is emb.weight and list(emb.parameters) == [emb.weight]
    assert emb.get_memory_usage()["total_parameters"] == 15
    try:
        emb([1, 5])
    except ValueError as error:
        assert "5" in str(error) and "vocab_size 5" in str(error)
    else:
        raise AssertionError("an out-of-range id was accepted")
    try:
        emb([1.5])
    except ValueError as error:
        assert "1.5" in str(error)
    else:
        raise AssertionError("a fractional id was accepted")


test_unit_embedding()


# %%
def test_unit_padding_and_init_types():
    padded = Embedding(6, 4, padding_idx=1, seed=0)
    np.testing.assert_array_equal(padded.weight.data[1], np.zeros(4))
    padded.weight.data[1] = 3.0  # even if the row is changed, padding lookups stay zero
    out = padded([[1, 2], [1, 1]]).data
    np.testing.assert_array_equal(out[0, 0], np.zeros(4))
    np.testing.assert_array_equal(out[0, 1], padded.weight.data[2])
    assert Embedding(6, 4, padding_idx=-1, seed=0).padding_idx == 5
    uniform = Embedding(200, 16, init_type="uniform", seed=0).weight.data
    assert np.abs(uniform).max() <= 1 / np.sqrt(16)
    xavier = Embedding(200, 16, init_type="xavier", seed=0).weight.data
    assert np.abs(xavier).max() <= np.sqrt(6 / (200 + 16))
    try:
        Embedding(6, 4, init_type="zeros")
    except ValueError as error:
        assert "'zeros'" in str(error) and "'xavier'" in str(error)
    else:
        raise AssertionError("an unknown init_type was accepted")


test_unit_padding_and_init_types()

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
# `max_seq_length`, and kept as a Tensor `pe` of shape `(max_seq_length, d)` (`encoding` is the
# same table as a NumPy array). When $d$ is odd the last column is a $2i$ column, so it is a sine.
#
# **Dropout.** With `dropout=p`, the sum $x + PE$ goes through inverted dropout, as in the
# original Transformer: in training mode each entry is zeroed with probability $p$ and the rest
# are divided by $1 - p$, so every entry keeps its expected value. `eval()` switches dropout off,
# `train()` back on (a new layer is in training mode, as in PyTorch); `seed=` makes the dropped
# entries repeatable. With the default `p = 0` both modes give $x + PE$ exactly.
#
# An input holding NaN or infinity raises `ValueError`: one bad number would otherwise spread to
# every later layer without a trace.

# %%
#| export
def _check_dropout(owner, dropout):
    """`dropout` as a float probability in [0, 1)."""
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: dropout must be a number, got {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def _check_sequence(owner, x, embedding_dim, max_seq_length):
    """`x` (Tensor, array or lists) as an array of shape (batch, seq, embedding_dim) or (seq, embedding_dim)."""
    data = x.data if isinstance(x, Tensor) else x
    try:
        x = np.asarray(data)
    except (TypeError, ValueError):  # ragged nested lists
        raise TypeError(f"{owner}: x must be a Tensor or an array of numbers, got {type(data).__name__}") from None
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{owner}: x must hold numbers, got dtype {x.dtype}")
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{owner}: expected shape (batch, seq, {embedding_dim}) or (seq, {embedding_dim}), got {x.shape}"
        )
    seq_length, width = x.shape[-2], x.shape[-1]
    if width != embedding_dim:
        raise ValueError(f"{owner}: last dimension {width} does not match embedding_dim {embedding_dim}")
    if seq_length > max_seq_length:
        raise ValueError(f"{owner}: sequence length {seq_length} exceeds max_seq_length {max_seq_length}")
    if x.dtype.kind == "f":
        not_finite = ~np.isfinite(x)
        if not_finite.any():
            where = _first_index(not_finite)
            raise ValueError(f"{owner}: x must be finite, got {x[where]} at index {where}")
    return x


def _add_positions(owner, x, positions):
    """`x + positions` as float32, refusing sums beyond float32's range."""
    with np.errstate(over="raise"):
        try:
            return (x + positions).astype(np.float32)
        except FloatingPointError:
            raise ValueError(
                f"{owner}: x plus the position codes exceeds float32's range "
                f"(+-{np.finfo(np.float32).max:.3g})"
            ) from None


class PositionalEncoding:
    """Adds the fixed sinusoidal position code of Vaswani et al. (2017) to a sequence of vectors."""

    def __init__(self, embedding_dim, max_seq_length=5000, dropout=0.0, seed=None):
        self.embedding_dim = _check_size("PositionalEncoding", "embedding_dim", embedding_dim)
        self.max_seq_length = _check_size("PositionalEncoding", "max_seq_length", max_seq_length)
        self.dropout = _check_dropout("PositionalEncoding", dropout)
        self.training = True
        self._rng = np.random.default_rng(seed)
        positions = np.arange(self.max_seq_length)[:, None]          # (max_seq_length, 1)
        even_columns = np.arange(0, self.embedding_dim, 2)            # the 2i of the formula
        angles = positions / 10000.0 ** (even_columns / self.embedding_dim)
        encoding = np.empty((self.max_seq_length, self.embedding_dim))
        encoding[:, 0::2] = np.sin(angles)
        encoding[:, 1::2] = np.cos(angles[:, : self.embedding_dim // 2])  # odd d: one cos fewer
        self.pe = Tensor(encoding, dtype=np.float32)

    @property
    def encoding(self):
        """The table as a NumPy array, (max_seq_length, embedding_dim): the same memory as `pe.data`."""
        return self.pe.data

    def train(self, mode=True):
        """Training mode (dropout active). Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (dropout off). Returns self."""
        return self.train(False)

    def forward(self, x):
        """`x + pe[:seq]`, then dropout in training mode, for `x` of shape (batch, seq, d) or (seq, d)."""
        x = _check_sequence("PositionalEncoding", x, self.embedding_dim, self.max_seq_length)
        out = _add_positions("PositionalEncoding", x, self.pe.data[: x.shape[-2]])
        if self.training and self.dropout > 0:
            keep = self._rng.random(out.shape) >= self.dropout
            out = np.where(keep, out / np.float32(1.0 - self.dropout), np.float32(0.0))
        return Tensor(out)

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self):
        dropout = f", dropout={self.dropout}" if self.dropout else ""
        return (f"PositionalEncoding(embedding_dim={self.embedding_dim}, "
                f"max_seq_length={self.max_seq_length}{dropout})")


# %%
def test_unit_positional_encoding():
    pe = PositionalEncoding(5, max_seq_length=10)
    assert pe.encoding.shape == (10, 5) and pe.encoding.dtype == np.float32
    assert isinstance(pe.pe, Tensor) and pe.pe.data is pe.encoding
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


# %%
def test_unit_positional_dropout():
    pe = PositionalEncoding(4, max_seq_length=8, dropout=0.5, seed=0)
    x = np.ones((3, 8, 4))
    clean = x + pe.encoding
    out = pe(x).data  # training mode: every entry is either 0 or twice the clean value
    dropped = out == 0
    assert 0 < dropped.sum() < out.size
    np.testing.assert_allclose(out[~dropped], 2 * clean[~dropped], rtol=1e-6)
    np.testing.assert_allclose(pe.eval()(x).data, clean, rtol=1e-6)  # evaluation: no dropout
    again = PositionalEncoding(4, max_seq_length=8, dropout=0.5, seed=0)
    np.testing.assert_array_equal(again(x).data, out)  # the same seed drops the same entries
    try:
        pe(np.full((8, 4), np.nan))
    except ValueError as error:
        assert "nan" in str(error)
    else:
        raise AssertionError("an input holding NaN was accepted")


test_unit_positional_dropout()

# %% [markdown]
# ## Learned positions
#
# Instead of a fixed code, a model can *learn* one vector per position, as BERT and GPT-2 do: an
# `Embedding` whose "vocabulary" is the positions $0 \ldots$ `max_seq_length - 1`, whose row
# $pos$ is added to the token at position $pos$. It can fit whatever the task needs, but it knows
# nothing about positions beyond `max_seq_length` and nothing about how far apart two positions
# are until training teaches it. The table starts from the same $\mathcal{N}(0, 1/d)$ draw as
# `Embedding`, and it is the layer's only parameter.

# %%
#| export
class LearnedPositionalEmbedding:
    """Adds a learned vector per position (rows of an Embedding indexed by position) to a sequence."""

    def __init__(self, max_seq_length, embedding_dim, seed=None):
        self.max_seq_length = _check_size("LearnedPositionalEmbedding", "max_seq_length", max_seq_length)
        self.embedding_dim = _check_size("LearnedPositionalEmbedding", "embedding_dim", embedding_dim)
        self.position_embedding = Embedding(self.max_seq_length, self.embedding_dim, init_type="normal", seed=seed)

    @property
    def parameters(self):
        """[position_embedding.weight]; also callable as `parameters()`."""
        return self.position_embedding.parameters

    def forward(self, x):
        """`x` plus the rows for positions 0..seq-1, for `x` of shape (batch, seq, d) or (seq, d)."""
        owner = "LearnedPositionalEmbedding"
        x = _check_sequence(owner, x, self.embedding_dim, self.max_seq_length)
        positions = self.position_embedding(np.arange(x.shape[-2]))  # (seq, embedding_dim)
        return Tensor(_add_positions(owner, x, positions.data))

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self):
        return (f"LearnedPositionalEmbedding(max_seq_length={self.max_seq_length}, "
                f"embedding_dim={self.embedding_dim})")


# %%
def test_unit_learned_positional_embedding():
    learned = LearnedPositionalEmbedding(6, 3, seed=0)
    table = learned.position_embedding.weight.data
    np.testing.assert_allclose(table, np.random.default_rng(0).standard_normal((6, 3)) / np.sqrt(3), rtol=1e-6)
    assert learned.parameters()[0] is learned.position_embedding.weight and len(learned.parameters) == 1
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.testing.assert_allclose(learned(x).data, x + table[:4], rtol=1e-6)
    np.testing.assert_allclose(learned(x[0]).data, x[0] + table[:4], rtol=1e-6)
    table[0] = 0.0  # a training step updates the rows in place; the next call uses them
    np.testing.assert_allclose(learned(x[:, :1]).data, x[:, :1], rtol=1e-6)
    try:
        learned(np.zeros((1, 7, 3)))
    except ValueError as error:
        assert "7" in str(error) and "max_seq_length 6" in str(error)
    else:
        raise AssertionError("a too-long sequence was accepted")


test_unit_learned_positional_embedding()

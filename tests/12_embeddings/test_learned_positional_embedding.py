"""LearnedPositionalEmbedding: a learned row per position, added to a sequence.

References: the seeded N(0, 1/d) draw written here, and the sum written as loops over positions.
"""
import re

import numpy as np
import pytest

from tinytorch.core.embeddings import Embedding, LearnedPositionalEmbedding
from tinytorch.core.tensor import ParameterList, Tensor

RTOL, ATOL = 1e-6, 1e-6


def add_rows_by_loops(x, table):
    """x[..., pos, :] + table[pos] for every position, one position at a time."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    for pos in range(x.shape[-2]):
        out[..., pos, :] = x[..., pos, :] + table[pos]
    return out


def test_table_is_an_embedding_over_positions_with_the_seeded_draw():
    learned = LearnedPositionalEmbedding(10, 4, seed=6)  # (max_seq_length, embedding_dim), as before
    assert learned.max_seq_length == 10 and learned.embedding_dim == 4
    table = learned.position_embedding
    assert isinstance(table, Embedding) and table.vocab_size == 10 and table.embedding_dim == 4
    assert table.init_type == "normal" and table.padding_idx is None
    expected = np.random.default_rng(6).standard_normal((10, 4)) / np.sqrt(4)
    np.testing.assert_allclose(table.weight.data, expected, rtol=RTOL, atol=1e-7)


def test_parameters_are_the_position_table():
    learned = LearnedPositionalEmbedding(5, 3, seed=0)
    params = learned.parameters
    assert isinstance(params, ParameterList) and len(params) == 1
    assert params[0] is learned.position_embedding.weight and learned.parameters()[0] is params[0]
    gathered = []
    gathered.extend(learned.parameters)
    assert gathered == [learned.position_embedding.weight]


@pytest.mark.parametrize("shape", [(3, 7, 4), (7, 4), (2, 1, 4), (1, 10, 4)])
def test_forward_adds_row_pos_at_position_pos(shape):
    learned = LearnedPositionalEmbedding(10, 4, seed=1)
    x = np.random.default_rng(2).standard_normal(shape)
    out = learned(Tensor(x))
    assert isinstance(out, Tensor) and out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out.data, add_rows_by_loops(x, learned.position_embedding.weight.data),
                               rtol=1e-5, atol=ATOL)


def test_hand_set_table():
    learned = LearnedPositionalEmbedding(3, 2, seed=0)
    learned.position_embedding.weight.data[:] = [[1, 2], [10, 20], [100, 200]]
    np.testing.assert_array_equal(learned.forward([[0, 0], [5, 5]]).data, [[1, 2], [15, 25]])


def test_a_prefix_uses_the_same_rows_as_the_longer_sequence():
    learned = LearnedPositionalEmbedding(12, 5, seed=3)
    long_x = np.random.default_rng(4).standard_normal((2, 9, 5))
    np.testing.assert_allclose(learned(long_x[:, :4]).data, learned(long_x).data[:, :4], rtol=RTOL, atol=ATOL)


def test_in_place_update_is_seen_by_the_next_call():
    learned = LearnedPositionalEmbedding(4, 2, seed=0)
    x = np.zeros((1, 4, 2))
    learned.parameters[0].data[2] = [0.5, -0.5]  # an optimiser step through the parameter list
    np.testing.assert_allclose(learned(x).data[0, 2], [0.5, -0.5], rtol=RTOL)


def test_forward_does_not_modify_input_or_table():
    learned = LearnedPositionalEmbedding(4, 2, seed=0)
    table = learned.position_embedding.weight.data.copy()
    x = np.ones((4, 2))
    learned(x).data[...] = 0.0
    np.testing.assert_array_equal(x, np.ones((4, 2)))
    np.testing.assert_array_equal(learned.position_embedding.weight.data, table)


def test_sequence_at_max_length_is_fine_and_longer_raises():
    learned = LearnedPositionalEmbedding(6, 3, seed=0)
    assert learned(np.zeros((2, 6, 3))).shape == (2, 6, 3)
    with pytest.raises(ValueError, match=r"LearnedPositionalEmbedding: sequence length 7 exceeds max_seq_length 6"):
        learned(np.zeros((2, 7, 3)))


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((2, 3, 5)), "last dimension 5 does not match embedding_dim 3"),
        (np.zeros(3), "expected shape (batch, seq, 3) or (seq, 3), got (3,)"),
        (np.zeros((1, 1, 2, 3)), "got (1, 1, 2, 3)"),
        (np.array([[0.0, np.nan, 0.0]]), "x must be finite, got nan at index (0, 1)"),
        (np.array([[np.inf, 0.0, 0.0]]), "x must be finite, got inf at index (0, 0)"),
    ],
)
def test_bad_shapes_and_non_finite_values_raise_value_error(x, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LearnedPositionalEmbedding(6, 3, seed=0)(x)


def test_non_numeric_input_raises_type_error():
    with pytest.raises(TypeError, match="x must hold numbers, got dtype <U1"):
        LearnedPositionalEmbedding(6, 1)(np.array([["a"]]))


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((0, 4), ValueError, "max_seq_length must be at least 1, got 0"),
        ((4, -2), ValueError, "embedding_dim must be at least 1, got -2"),
        ((2.5, 4), TypeError, "max_seq_length must be an integer, got 2.5"),
        ((4, True), TypeError, "embedding_dim must be an integer, got True"),
    ],
)
def test_bad_sizes_raise(args, error, message):
    with pytest.raises(error, match=re.escape(f"LearnedPositionalEmbedding: {message}")):
        LearnedPositionalEmbedding(*args)


def test_repr():
    assert repr(LearnedPositionalEmbedding(8, 2)) == "LearnedPositionalEmbedding(max_seq_length=8, embedding_dim=2)"

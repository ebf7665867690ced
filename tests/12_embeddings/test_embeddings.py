"""Tests for tinytorch.core.embeddings, checked against hand-computed values and plain NumPy."""
import re

import numpy as np
import pytest

from tinytorch.core.embeddings import Embedding, PositionalEncoding
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-6, 1e-6


def reference_encoding(length, dim):
    """The sinusoidal table written directly from the formula, one entry at a time, in float64."""
    table = np.zeros((length, dim))
    for pos in range(length):
        for column in range(dim):
            two_i = column - column % 2
            angle = pos / 10000 ** (two_i / dim)
            table[pos, column] = np.sin(angle) if column % 2 == 0 else np.cos(angle)
    return table


# ---------------------------------------------------------------- Embedding: construction
def test_weight_shape_dtype_and_seeded_values():
    emb = Embedding(7, 4, seed=3)
    assert isinstance(emb.weight, Tensor)
    assert emb.weight.shape == (7, 4) and emb.weight.dtype == np.float32
    expected = np.random.default_rng(3).standard_normal((7, 4)) / np.sqrt(4)
    np.testing.assert_allclose(emb.weight.data, expected, rtol=RTOL, atol=1e-7)


def test_seeded_reproducibility_and_different_seeds():
    a = Embedding(10, 6, seed=42)
    b = Embedding(10, 6, seed=42)
    c = Embedding(10, 6, seed=43)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert not np.allclose(a.weight.data, c.weight.data)


def test_initial_scale_is_one_over_sqrt_dim():
    emb = Embedding(4000, 64, seed=0)
    # Entries ~ N(0, 1/64): std 0.125; with 256000 samples the estimate is well within 2%.
    np.testing.assert_allclose(emb.weight.data.std(), 1 / np.sqrt(64), rtol=0.02)
    np.testing.assert_allclose(emb.weight.data.mean(), 0.0, atol=0.002)


def test_parameters_is_the_weight():
    emb = Embedding(3, 2, seed=0)
    params = emb.parameters()
    assert len(params) == 1 and params[0] is emb.weight


@pytest.mark.parametrize("vocab_size", [0, -3])
def test_bad_vocab_size_raises(vocab_size):
    with pytest.raises(ValueError, match=f"vocab_size.*{vocab_size}"):
        Embedding(vocab_size, 4)


@pytest.mark.parametrize("embedding_dim", [0, -1])
def test_bad_embedding_dim_raises(embedding_dim):
    with pytest.raises(ValueError, match=f"embedding_dim.*{embedding_dim}"):
        Embedding(4, embedding_dim)


def test_non_integer_sizes_raise_type_error():
    with pytest.raises(TypeError, match="2.5"):
        Embedding(2.5, 4)
    with pytest.raises(TypeError, match="True"):
        Embedding(4, True)


# ---------------------------------------------------------------- Embedding: lookup
def test_lookup_rows_hand_set_table():
    emb = Embedding(3, 2, seed=0)
    emb.weight.data[:] = [[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]]
    out = emb(np.array([2, 0, 2]))
    assert isinstance(out, Tensor) and out.dtype == np.float32
    np.testing.assert_array_equal(out.data, [[20.0, 21.0], [0.0, 1.0], [20.0, 21.0]])


@pytest.mark.parametrize(
    "ids", [np.int64(3), [4, 0, 9], [[1, 2, 3], [3, 2, 1]], np.arange(24).reshape(2, 3, 4) % 10]
)
def test_rows_equal_weight_rows_for_any_id_shape(ids):
    emb = Embedding(10, 5, seed=1)
    out = emb.forward(ids)
    ids_array = np.asarray(ids)
    assert out.shape == ids_array.shape + (5,)
    np.testing.assert_array_equal(out.data, emb.weight.data[ids_array])
    for index in np.ndindex(ids_array.shape):
        np.testing.assert_array_equal(out.data[index], emb.weight.data[int(ids_array[index])])


@pytest.mark.parametrize(
    "make_ids",
    [np.array, list, Tensor, lambda x: np.array(x, dtype=np.int32), lambda x: np.array(x, dtype=np.uint8)],
)
def test_accepts_arrays_lists_and_tensors(make_ids):
    emb = Embedding(6, 3, seed=2)
    out = emb(make_ids([5, 1]))
    np.testing.assert_array_equal(out.data, emb.weight.data[[5, 1]])


def test_call_is_forward():
    emb = Embedding(6, 3, seed=2)
    np.testing.assert_array_equal(emb([1, 2]).data, emb.forward([1, 2]).data)


def test_empty_ids_give_empty_output():
    emb = Embedding(6, 3, seed=2)
    assert emb([]).shape == (0, 3)


def test_in_place_weight_update_is_seen_by_next_forward():
    emb = Embedding(4, 3, seed=0)
    before = emb([1]).data.copy()
    emb.weight.data[1] -= 0.5  # an optimiser step, made in place
    after = emb([1]).data
    np.testing.assert_allclose(after, before - 0.5, rtol=RTOL, atol=ATOL)
    emb.weight.data[...] = 0.0
    np.testing.assert_array_equal(emb([0, 3]).data, np.zeros((2, 3)))


def test_output_is_not_a_view_of_the_table():
    emb = Embedding(4, 3, seed=0)
    out = emb([2])
    out.data[...] = 99.0
    assert not np.any(emb.weight.data == 99.0)


@pytest.mark.parametrize("bad_id", [5, 17, -1])
def test_out_of_range_id_names_id_and_vocab_size(bad_id):
    emb = Embedding(5, 3, seed=0)
    with pytest.raises(ValueError, match=rf"id {bad_id}\b.*vocab_size 5"):
        emb([0, bad_id, 1])


@pytest.mark.parametrize(
    "ids, dtype_name",
    [([True, False], "bool"), (np.array([1 + 0j]), "complex128"), (np.array(["1", "2"]), "<U1")],
)
def test_non_numeric_ids_name_the_dtype(ids, dtype_name):
    emb = Embedding(5, 3, seed=0)
    with pytest.raises(TypeError, match=re.escape(dtype_name)):
        emb(ids)


# ---------------------------------------------------------------- PositionalEncoding: the table
def test_encoding_hand_computed_entries():
    pe = PositionalEncoding(4, max_seq_length=8)
    enc = pe.encoding
    assert enc.shape == (8, 4) and enc.dtype == np.float32
    np.testing.assert_allclose(enc[0], [0.0, 1.0, 0.0, 1.0], atol=ATOL)  # sin 0 = 0, cos 0 = 1
    np.testing.assert_allclose(enc[1, 0], np.sin(1.0), rtol=RTOL)        # pos 1, i 0
    np.testing.assert_allclose(enc[1, 1], np.cos(1.0), rtol=RTOL)
    np.testing.assert_allclose(enc[2, 2], np.sin(2 / 100.0), rtol=RTOL)   # 10000^(2/4) = 100
    np.testing.assert_allclose(enc[2, 3], np.cos(2 / 100.0), rtol=RTOL)


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 16])
def test_encoding_matches_formula(dim):
    pe = PositionalEncoding(dim, max_seq_length=50)
    np.testing.assert_allclose(pe.encoding, reference_encoding(50, dim), rtol=1e-5, atol=ATOL)


def test_odd_dim_last_column_is_sin():
    dim = 5
    pe = PositionalEncoding(dim, max_seq_length=20)
    positions = np.arange(20)
    last = np.sin(positions / 10000 ** (4 / dim))  # column 4 = 2i with i = 2
    before_last = np.cos(positions / 10000 ** (2 / dim))  # column 3 = 2i + 1 with i = 1
    np.testing.assert_allclose(pe.encoding[:, 4], last, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(pe.encoding[:, 3], before_last, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(pe.encoding[0], [0, 1, 0, 1, 0], atol=ATOL)


def test_default_max_seq_length():
    assert PositionalEncoding(8).encoding.shape == (5000, 8)


def test_offsets_are_rotations():
    dim, k = 8, 5
    pe = PositionalEncoding(dim, max_seq_length=40)
    enc = pe.encoding.astype(np.float64)
    for i in range(dim // 2):
        omega = 1 / 10000 ** (2 * i / dim)
        rotation = np.array([[np.cos(omega * k), np.sin(omega * k)], [-np.sin(omega * k), np.cos(omega * k)]])
        pairs = enc[:, 2 * i : 2 * i + 2]  # (sin, cos) for every position
        np.testing.assert_allclose(pairs[:-k] @ rotation.T, pairs[k:], atol=1e-5)


@pytest.mark.parametrize(
    "name, args", [("embedding_dim", (0,)), ("max_seq_length", (4, 0)), ("max_seq_length", (4, -2))]
)
def test_bad_sizes_raise(name, args):
    with pytest.raises(ValueError, match=f"{name}.*{args[-1]}"):
        PositionalEncoding(*args)


# ---------------------------------------------------------------- PositionalEncoding: forward
def test_forward_adds_encoding_to_batch():
    pe = PositionalEncoding(6, max_seq_length=10)
    x = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    out = pe(Tensor(x))
    assert isinstance(out, Tensor) and out.dtype == np.float32 and out.shape == (3, 4, 6)
    expected = x + reference_encoding(4, 6)[None]
    np.testing.assert_allclose(out.data, expected, rtol=1e-5, atol=ATOL)


def test_forward_accepts_arrays_and_2d_input_and_returns_float32():
    pe = PositionalEncoding(3, max_seq_length=10)
    x = np.ones((5, 3))  # float64, no batch axis
    out = pe.forward(x)
    assert out.dtype == np.float32 and out.shape == (5, 3)
    np.testing.assert_allclose(out.data, 1 + reference_encoding(5, 3), rtol=RTOL, atol=ATOL)
    assert pe(Tensor(x, dtype=np.float64)).dtype == np.float32


def test_forward_does_not_modify_input():
    pe = PositionalEncoding(4, max_seq_length=10)
    x = Tensor(np.zeros((1, 3, 4)))
    pe(x)
    np.testing.assert_array_equal(x.data, np.zeros((1, 3, 4)))


def test_sequence_at_max_length_is_fine_and_longer_raises():
    pe = PositionalEncoding(4, max_seq_length=6)
    assert pe(np.zeros((2, 6, 4))).shape == (2, 6, 4)
    with pytest.raises(ValueError, match=r"7.*max_seq_length 6"):
        pe(np.zeros((2, 7, 4)))


def test_wrong_last_dimension_names_both():
    pe = PositionalEncoding(4, max_seq_length=6)
    with pytest.raises(ValueError, match=r"last dimension 5.*embedding_dim 4"):
        pe(np.zeros((2, 3, 5)))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4)])
def test_wrong_rank_raises_naming_the_shape(shape):
    pe = PositionalEncoding(4, max_seq_length=6)
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        pe(np.zeros(shape))


# ---------------------------------------------------------------- PositionalEncoding: pe, the table as a Tensor
@pytest.mark.parametrize("dim, length", [(6, 12), (7, 3), (1, 1)])
def test_pe_is_the_table_as_a_tensor(dim, length):
    pe = PositionalEncoding(dim, max_seq_length=length)
    assert isinstance(pe.pe, Tensor) and pe.pe.shape == (length, dim) and pe.pe.dtype == np.float32
    np.testing.assert_allclose(pe.pe.data, reference_encoding(length, dim), rtol=1e-5, atol=ATOL)
    assert pe.encoding is pe.pe.data  # one table, two views of it


def test_forward_adds_the_pe_rows():
    pe = PositionalEncoding(4, max_seq_length=9)
    pe.pe.data[:] = np.arange(36, dtype=np.float32).reshape(9, 4)  # a hand-set table makes the sum exact
    out = pe(np.ones((2, 3, 4)))
    np.testing.assert_array_equal(out.data, 1 + np.arange(12).reshape(3, 4)[None].repeat(2, axis=0))


# ---------------------------------------------------------------- PositionalEncoding: dropout
def test_dropout_is_stored_and_a_new_layer_is_training():
    pe = PositionalEncoding(8, 16, 0.25)  # the positional order (embedding_dim, max_seq_length, dropout)
    assert pe.dropout == 0.25 and isinstance(pe.dropout, float) and pe.training is True
    assert repr(pe) == "PositionalEncoding(embedding_dim=8, max_seq_length=16, dropout=0.25)"
    assert pe.eval() is pe and pe.training is False
    assert pe.train() is pe and pe.training is True
    assert pe.train(False).training is False


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_training_output_is_zero_or_scaled_clean_value(p):
    pe = PositionalEncoding(16, max_seq_length=32, dropout=p, seed=7)
    x = np.random.default_rng(0).standard_normal((4, 32, 16))
    clean = x + reference_encoding(32, 16)
    out = pe(x).data
    dropped = out == 0
    np.testing.assert_allclose(out[~dropped], clean[~dropped] / (1 - p), rtol=1e-5, atol=1e-5)
    # 2048 entries, each dropped with probability p: the fraction is within 4 standard deviations.
    tolerance = 4 * np.sqrt(p * (1 - p) / out.size)
    assert abs(dropped.mean() - p) < tolerance


def test_inverted_dropout_keeps_the_mean():
    p = 0.3
    pe = PositionalEncoding(4, max_seq_length=5, dropout=p, seed=1)
    x = np.ones((5, 4))
    clean = x + reference_encoding(5, 4)
    average = np.mean([pe(x).data for _ in range(4000)], axis=0)
    # Each entry averages 4000 draws of (clean / (1 - p)) * Bernoulli(1 - p): standard error
    # |clean| * sqrt(p / (1 - p) / 4000) <= 2 * 0.0104; allow 5 standard errors.
    np.testing.assert_allclose(average, clean, atol=5 * 2 * np.sqrt(p / (1 - p) / 4000))


def test_eval_mode_and_zero_dropout_are_exact():
    x = np.random.default_rng(2).standard_normal((2, 6, 8)).astype(np.float32)
    expected = x + reference_encoding(6, 8)
    dropping = PositionalEncoding(8, max_seq_length=6, dropout=0.9, seed=0).eval()
    np.testing.assert_allclose(dropping(x).data, expected, rtol=1e-5, atol=ATOL)
    training_without_dropout = PositionalEncoding(8, max_seq_length=6)
    assert training_without_dropout.training
    np.testing.assert_allclose(training_without_dropout(x).data, expected, rtol=1e-5, atol=ATOL)


def test_dropout_is_repeatable_with_a_seed_and_fresh_on_each_call():
    x = np.ones((3, 10, 6))
    first, second = PositionalEncoding(6, 10, 0.5, seed=3), PositionalEncoding(6, 10, 0.5, seed=3)
    a1, a2 = first(x).data, first(x).data
    np.testing.assert_array_equal(a1, second(x).data)
    np.testing.assert_array_equal(a2, second(x).data)
    assert not np.array_equal(a1 == 0, a2 == 0)  # a new mask on every call
    assert not np.array_equal(a1 == 0, PositionalEncoding(6, 10, 0.5, seed=4)(x).data == 0)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_dropout_outside_zero_to_one_raises(dropout):
    with pytest.raises(ValueError, match=re.escape(f"dropout must be a probability in [0, 1), got {dropout!r}")):
        PositionalEncoding(4, dropout=dropout)


@pytest.mark.parametrize("dropout", ["0.1", True, None, [0.1]])
def test_dropout_must_be_a_number(dropout):
    with pytest.raises(TypeError, match=re.escape(f"dropout must be a number, got {dropout!r}")):
        PositionalEncoding(4, dropout=dropout)


# ---------------------------------------------------------------- PositionalEncoding: non-finite and bad inputs
@pytest.mark.parametrize(
    "bad, index", [(np.nan, (0, 1, 2)), (np.inf, (1, 0, 0)), (-np.inf, (1, 2, 3))]
)
def test_non_finite_input_raises_naming_value_and_index(bad, index):
    pe = PositionalEncoding(4, max_seq_length=6, dropout=0.5, seed=0)
    x = np.zeros((2, 3, 4))
    x[index] = bad
    with pytest.raises(ValueError, match=re.escape(f"PositionalEncoding: x must be finite, got {bad} at index {index}")):
        pe(x)
    # The failed call drew no dropout mask: the next output is the one a fresh layer gives.
    fresh = PositionalEncoding(4, max_seq_length=6, dropout=0.5, seed=0)
    np.testing.assert_array_equal(pe(np.ones((2, 3, 4))).data, fresh(np.ones((2, 3, 4))).data)


def test_nan_in_a_float32_tensor_raises():
    with pytest.raises(ValueError, match="x must be finite, got nan at index \\(1, 1\\)"):
        PositionalEncoding(2, max_seq_length=4)(Tensor([[0.0, 0.0], [0.0, np.nan]]))


def test_sum_beyond_float32_range_raises():
    x = np.zeros((1, 2))
    x[0, 1] = 3.4e38  # plus cos(0) = 1 this is still below float32's largest value, 3.4028e38 ...
    assert np.isfinite(PositionalEncoding(2, max_seq_length=1)(x).data).all()
    x[0, 1] = 1e39  # ... but this sum has no float32 value
    with pytest.raises(ValueError, match="exceeds float32's range"):
        PositionalEncoding(2, max_seq_length=1)(x)


def test_integer_input_is_accepted():
    out = PositionalEncoding(3, max_seq_length=4)(np.full((2, 3), 2))
    np.testing.assert_allclose(out.data, 2 + reference_encoding(2, 3), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "x, error, message",
    [
        (np.array([["a", "b"]]), TypeError, "x must hold numbers, got dtype <U1"),
        ([[1.0, 2.0], [3.0]], TypeError, "x must be a Tensor or an array of numbers, got list"),
        (None, TypeError, "x must hold numbers, got dtype object"),
    ],
)
def test_non_numeric_input_raises_type_error(x, error, message):
    with pytest.raises(error, match=re.escape(message)):
        PositionalEncoding(2, max_seq_length=4)(x)

"""Embedding's padding row, starting tables, id checks, parameter list and memory report.

References are written here in plain NumPy (the same seeded draws, the formulas for the bounds, a
one-hot product for the lookup) or computed by hand; PyTorch comparisons live in test_against_pytorch.py.
"""
import re

import numpy as np
import pytest

from tinytorch.core.embeddings import Embedding
from tinytorch.core.tensor import ParameterList, Tensor

RTOL, ATOL = 1e-6, 1e-7


def seeded_table(init_type, vocab_size, dim, seed):
    """The starting table each init_type promises, drawn here from its formula with the same generator."""
    rng = np.random.default_rng(seed)
    if init_type == "normal":
        return rng.standard_normal((vocab_size, dim)) * (1 / np.sqrt(dim))
    bound = 1 / np.sqrt(dim) if init_type == "uniform" else np.sqrt(6 / (vocab_size + dim))
    return rng.uniform(-bound, bound, size=(vocab_size, dim))


def one_hot_lookup(table, ids, padding_idx=None):
    """Embedding as a linear layer on one-hot rows, with the padding rows of the one-hot zeroed."""
    one_hot = np.eye(table.shape[0])[np.asarray(ids)]
    if padding_idx is not None:
        one_hot[np.asarray(ids) == padding_idx] = 0.0
    return one_hot @ table


# ---------------------------------------------------------------- padding_idx
@pytest.mark.parametrize("padding_idx, row", [(0, 0), (3, 3), (-1, 6), (-7, 0)])
def test_padding_row_starts_at_zero_and_other_rows_are_the_seeded_draw(padding_idx, row):
    emb = Embedding(7, 4, padding_idx=padding_idx, seed=11)
    assert emb.padding_idx == row
    expected = seeded_table("normal", 7, 4, 11)
    expected[row] = 0.0
    np.testing.assert_allclose(emb.weight.data, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(emb.weight.data[row], np.zeros(4))


@pytest.mark.parametrize("init_type", ["uniform", "normal", "xavier"])
def test_padding_row_is_zero_for_every_init_type(init_type):
    emb = Embedding(9, 5, padding_idx=2, init_type=init_type, seed=0)
    np.testing.assert_array_equal(emb.weight.data[2], np.zeros(5))
    assert np.count_nonzero(emb.weight.data[[0, 1, 3]]) == 15


def test_padding_lookups_are_zero_and_others_are_table_rows():
    emb = Embedding(6, 3, padding_idx=4, seed=2)
    ids = np.array([[4, 1, 4], [0, 5, 4]])
    out = emb(ids).data
    np.testing.assert_allclose(out, one_hot_lookup(emb.weight.data.astype(np.float64), ids, 4), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out[ids == 4], np.zeros((3, 3)))
    np.testing.assert_array_equal(out[0, 1], emb.weight.data[1])


def test_output_does_not_depend_on_the_padding_row():
    # The output is constant in row padding_idx, so its gradient is zero and training never moves it.
    emb = Embedding(5, 4, padding_idx=0, seed=3)
    ids = [[0, 2, 0, 4]]
    before = emb(ids).data.copy()
    emb.weight.data[0] = [1.0, -2.0, 3.0, -4.0]  # a hand edit, or an update made by other code
    np.testing.assert_array_equal(emb(ids).data, before)
    emb.weight.data[2] += 1.0  # any other row is read as usual
    np.testing.assert_allclose(emb(ids).data[0, 1], before[0, 1] + 1.0, rtol=RTOL)


def test_padding_lookup_leaves_the_table_unchanged():
    emb = Embedding(5, 2, padding_idx=1, seed=0)
    emb.weight.data[1] = 9.0
    table = emb.weight.data.copy()
    out = emb([1, 1, 3])
    np.testing.assert_array_equal(emb.weight.data, table)
    out.data[...] = -1.0  # the output is a copy, not a view of the table
    np.testing.assert_array_equal(emb.weight.data, table)


def test_third_positional_argument_is_padding_idx_and_seed_is_keyword_only():
    assert Embedding(5, 3, 2).padding_idx == 2  # as in PyTorch and the course's earlier Embedding
    with pytest.raises(TypeError, match="positional"):
        Embedding(5, 3, None, "normal", 0)


@pytest.mark.parametrize("padding_idx", [5, 17, -6])
def test_padding_idx_out_of_range_names_range_and_value(padding_idx):
    with pytest.raises(ValueError, match=rf"padding_idx must be in -5 to 4 for vocab_size 5, got {padding_idx}$"):
        Embedding(5, 3, padding_idx=padding_idx)


@pytest.mark.parametrize("padding_idx", [1.0, True, "0", np.float64(2.0)])
def test_padding_idx_must_be_an_integer(padding_idx):
    with pytest.raises(TypeError, match=re.escape(f"padding_idx must be an integer or None, got {padding_idx!r}")):
        Embedding(5, 3, padding_idx=padding_idx)


def test_repr_mentions_padding_only_when_set():
    assert repr(Embedding(5, 3)) == "Embedding(vocab_size=5, embedding_dim=3)"
    assert repr(Embedding(5, 3, padding_idx=-1)) == "Embedding(vocab_size=5, embedding_dim=3, padding_idx=4)"


# ---------------------------------------------------------------- init_type
@pytest.mark.parametrize("init_type", ["uniform", "normal", "xavier"])
@pytest.mark.parametrize("seed", [0, 5])
def test_seeded_tables_match_their_formula(init_type, seed):
    emb = Embedding(30, 8, init_type=init_type, seed=seed)
    assert emb.init_type == init_type and emb.weight.dtype == np.float32
    np.testing.assert_allclose(emb.weight.data, seeded_table(init_type, 30, 8, seed), rtol=RTOL, atol=ATOL)


def test_default_init_type_is_normal():
    np.testing.assert_array_equal(
        Embedding(12, 6, seed=4).weight.data, Embedding(12, 6, init_type="normal", seed=4).weight.data
    )
    assert Embedding(12, 6).init_type == "normal"


@pytest.mark.parametrize(
    "init_type, bound, std",
    [
        ("uniform", 1 / np.sqrt(64), 1 / np.sqrt(64) / np.sqrt(3)),          # U(-b, b) has std b / sqrt(3)
        ("xavier", np.sqrt(6 / (2000 + 64)), np.sqrt(6 / 2064) / np.sqrt(3)),
        ("normal", None, 1 / np.sqrt(64)),
    ],
)
def test_table_bounds_and_spread(init_type, bound, std):
    table = Embedding(2000, 64, init_type=init_type, seed=1).weight.data
    if bound is not None:
        assert np.abs(table).max() <= np.float32(bound)
        assert np.abs(table).max() > 0.99 * bound  # 128000 draws reach the edge
    # 128000 samples: the standard deviation is estimated well within 2%.
    np.testing.assert_allclose(table.std(), std, rtol=0.02)
    np.testing.assert_allclose(table.mean(), 0.0, atol=0.01 * std)


@pytest.mark.parametrize("init_type", ["zeros", "Normal", "", None, 3])
def test_unknown_init_type_lists_the_choices(init_type):
    with pytest.raises(ValueError, match=re.escape(
            f"init_type must be one of 'uniform', 'normal', 'xavier', got {init_type!r}")):
        Embedding(5, 3, init_type=init_type)


# ---------------------------------------------------------------- ids that are floats
@pytest.mark.parametrize(
    "float_ids",
    [
        np.array([[0.0, 3.0], [4.0, 1.0]]),
        np.array([[0.0, 3.0], [4.0, 1.0]], dtype=np.float32),
        np.array([[0.0, 3.0], [4.0, 1.0]], dtype=np.float16),
        Tensor([[0.0, 3.0], [4.0, 1.0]]),
        [[0.0, 3.0], [4.0, 1.0]],
        np.array([[-0.0, 3.0], [4.0, 1.0]]),
    ],
)
def test_float_ids_holding_whole_numbers_are_looked_up(float_ids):
    emb = Embedding(5, 3, seed=0)
    expected = one_hot_lookup(emb.weight.data.astype(np.float64), [[0, 3], [4, 1]])
    np.testing.assert_allclose(emb(float_ids).data, expected, rtol=RTOL, atol=ATOL)


def test_float_scalar_id_gives_one_row():
    emb = Embedding(5, 3, seed=0)
    out = emb(2.0)
    assert out.shape == (3,)
    np.testing.assert_array_equal(out.data, emb.weight.data[2])


@pytest.mark.parametrize(
    "ids, message",
    [
        ([0.0, 1.5], r"ids must be whole numbers, got 1.5 at index \(1,\) \(dtype float64\)"),
        ([[2.0], [-0.25]], r"ids must be whole numbers, got -0.25 at index \(1, 0\)"),
        (Tensor([0.5]), r"ids must be whole numbers, got 0.5 at index \(0,\) \(dtype float32\)"),
        ([1.0, np.nan], r"ids must be finite token ids, got nan at index \(1,\)"),
        ([np.inf], r"ids must be finite token ids, got inf at index \(0,\)"),
        ([[0.0, -np.inf]], r"ids must be finite token ids, got -inf at index \(0, 1\)"),
        ([1.0, 7.0], r"token id 7 is out of range for vocab_size 5 \(valid ids are 0 to 4\)"),
        ([-1.0], r"token id -1 is out of range for vocab_size 5"),
        ([1e30], r"token id 1000000000000000019884624838656 is out of range for vocab_size 5"),
    ],
)
def test_bad_float_ids_raise_value_error_naming_the_value(ids, message):
    emb = Embedding(5, 3, seed=0)
    with pytest.raises(ValueError, match=message):
        emb(ids)


def test_uint64_ids_beyond_int64_are_out_of_range_not_wrapped():
    emb = Embedding(5, 3, seed=0)
    with pytest.raises(ValueError, match="token id 18446744073709551615 is out of range"):
        emb(np.array([2**64 - 1], dtype=np.uint64))


def test_ragged_ids_raise_type_error():
    with pytest.raises(TypeError, match="ids must be an array of integers, got list"):
        Embedding(5, 3)([[1, 2], [3]])


def test_failed_lookups_change_nothing():
    emb = Embedding(5, 3, padding_idx=0, seed=0)
    table = emb.weight.data.copy()
    for bad in ([1.5], [np.nan], [9], [True], [[1], [2, 3]]):
        with pytest.raises((ValueError, TypeError)):
            emb(bad)
    np.testing.assert_array_equal(emb.weight.data, table)
    assert emb.padding_idx == 0


# ---------------------------------------------------------------- parameters
def test_parameters_is_a_list_and_a_call():
    emb = Embedding(4, 2, seed=0)
    params = emb.parameters
    assert isinstance(params, ParameterList) and isinstance(params, list)
    assert len(params) == 1 and params[0] is emb.weight
    assert params() is params and emb.parameters()[0] is emb.weight
    collected = [Tensor([0.0])]
    collected.extend(emb.parameters)  # what a model does to gather its layers' parameters
    assert collected[1] is emb.weight


def test_parameters_follow_a_replaced_weight():
    emb = Embedding(4, 2, seed=0)
    emb.weight = Tensor(np.zeros((4, 2)))
    assert emb.parameters[0] is emb.weight


# ---------------------------------------------------------------- memory report
@pytest.mark.parametrize("vocab_size, dim", [(1000, 64), (50257, 768), (3, 1)])
def test_memory_usage_counts_the_table(vocab_size, dim):
    usage = Embedding(vocab_size, dim, seed=0).get_memory_usage()
    count = vocab_size * dim
    assert usage["total_parameters"] == usage["parameter_count"] == count
    assert usage["total_memory_mb"] == usage["parameter_mb"] == count * 4 / 2**20
    assert usage["memory_per_token_kb"] == dim * 4 / 1024
    assert usage["vocab_size"] == vocab_size and usage["embedding_dim"] == dim


def test_memory_usage_hand_computed():
    usage = Embedding(1024, 256).get_memory_usage()
    assert usage["total_memory_mb"] == 1.0  # 1024 * 256 numbers * 4 bytes = 2**20 bytes
    assert usage["memory_per_token_kb"] == 1.0  # 256 * 4 bytes = 1 KiB

"""Part 6a, `KVCache`: appends land after what is cached, rows are independent, failures change nothing.

The expected rows are the concatenation of what was appended, in order; every graded case
appends at least twice to some row, so a cache that writes from position 0 or forgets to
advance its length shows. Most cases start from a cache that served an earlier sequence and was
reset, as caches are between generations, so a reset that leaves lengths or data behind shows.
"""
import re

import numpy as np
import pytest

from tinytorch.core.attention import KVCache
from tinytorch.core.tensor import Tensor

GRADES = pytest.mark.grades("test-kv-cache")


def random_kv(rng, heads, length, head_dim):
    return rng.normal(size=(heads, length, head_dim)), rng.normal(size=(heads, length, head_dim))


def snapshot(cache):
    return cache.cached_keys.copy(), cache.cached_values.copy(), cache.cache_lengths.copy()


def reused(cache, seed=99):
    """`cache` after it served an earlier sequence in every row and was reset, as between generations."""
    rng = np.random.default_rng(seed)
    for row in range(cache.max_batch_size):
        cache.update(row, *random_kv(rng, cache.num_heads, cache.max_seq_length - row % 2, cache.head_dim))
    cache.reset()
    return cache


def assert_nothing_past_the_lengths(cache):
    """Positions past a row's length hold zeros: nothing of an earlier, reset sequence is left."""
    for row, length in enumerate(cache.cache_lengths):
        np.testing.assert_array_equal(cache.cached_keys[row, :, length:], 0.0,
                                      err_msg=f"keys of row {row} past its length {length}")
        np.testing.assert_array_equal(cache.cached_values[row, :, length:], 0.0,
                                      err_msg=f"values of row {row} past its length {length}")


def assert_unchanged(cache, before):
    for kept, now in zip(before, (cache.cached_keys, cache.cached_values, cache.cache_lengths)):
        np.testing.assert_array_equal(now, kept)


# ---------------------------------------------------------------- values
@GRADES
def test_updates_return_the_cached_row_as_views():
    rng = np.random.default_rng(0)
    cache = reused(KVCache(max_batch_size=2, max_seq_length=8, num_heads=3, head_dim=4))
    new_keys, new_values = random_kv(rng, 3, 5, 4)
    keys, values = cache.update(0, new_keys, new_values)
    assert isinstance(keys, Tensor) and isinstance(values, Tensor)
    assert keys.shape == (3, 5, 4) and keys.dtype == np.float32 and values.dtype == np.float32
    np.testing.assert_allclose(keys.data, new_keys, rtol=1e-6)
    np.testing.assert_allclose(values.data, new_values, rtol=1e-6)
    assert np.shares_memory(keys.data, cache.cached_keys) and np.shares_memory(values.data, cache.cached_values)
    np.testing.assert_allclose(cache.cached_keys[0, :, :5], new_keys, rtol=1e-6)   # the cache row holds them
    np.testing.assert_allclose(cache.cached_values[0, :, :5], new_values, rtol=1e-6)
    np.testing.assert_array_equal(cache.cached_keys[0, :, 5:], 0.0)                  # nothing past the length
    np.testing.assert_array_equal(cache.cached_keys[1], 0.0)
    assert cache.cache_lengths.tolist() == [5, 0]
    more_keys, more_values = random_kv(rng, 3, 2, 4)
    keys, values = cache.update(0, more_keys, more_values)                           # a second update
    np.testing.assert_allclose(keys.data, np.concatenate([new_keys, more_keys], axis=1), rtol=1e-6,
                               err_msg="after updates of 5 and 2 positions")
    assert np.shares_memory(keys.data, cache.cached_keys) and np.shares_memory(values.data, cache.cached_values)
    assert cache.cache_lengths.tolist() == [7, 0]


@GRADES
def test_updates_append_in_order():
    """Chunks of 3, 1, 2 and 1 positions: the row is their concatenation, in order, never overwritten."""
    rng = np.random.default_rng(1)
    cache = reused(KVCache(max_batch_size=1, max_seq_length=7, num_heads=2, head_dim=3))
    all_keys, all_values = [], []
    for length in (3, 1, 2, 1):
        new_keys, new_values = random_kv(rng, 2, length, 3)
        all_keys.append(new_keys)
        all_values.append(new_values)
        keys, values = cache.update(0, new_keys, new_values)
        np.testing.assert_allclose(keys.data, np.concatenate(all_keys, axis=1), rtol=1e-6)
        np.testing.assert_allclose(values.data, np.concatenate(all_values, axis=1), rtol=1e-6)
        assert cache.cache_lengths[0] == sum(k.shape[1] for k in all_keys)
    stored_keys, stored_values = cache.get_sequence(0)
    np.testing.assert_allclose(stored_keys.data, np.concatenate(all_keys, axis=1), rtol=1e-6)
    np.testing.assert_allclose(stored_values.data, np.concatenate(all_values, axis=1), rtol=1e-6)
    assert cache.get_memory_usage()["utilization"] == 1.0
    assert_nothing_past_the_lengths(cache)


@GRADES
def test_rows_are_independent():
    rng = np.random.default_rng(2)
    cache = reused(KVCache(max_batch_size=3, max_seq_length=6, num_heads=2, head_dim=2))
    row_0 = random_kv(rng, 2, 4, 2)
    row_2 = random_kv(rng, 2, 1, 2)
    cache.update(0, *row_0)
    cache.update(2, *row_2)
    more = random_kv(rng, 2, 2, 2)
    keys, values = cache.update(2, *more)
    np.testing.assert_allclose(keys.data, np.concatenate([row_2[0], more[0]], axis=1), rtol=1e-6)
    np.testing.assert_allclose(values.data, np.concatenate([row_2[1], more[1]], axis=1), rtol=1e-6)
    np.testing.assert_allclose(cache.get_sequence(0)[0].data, row_0[0], rtol=1e-6)
    np.testing.assert_allclose(cache.get_sequence(0)[1].data, row_0[1], rtol=1e-6)
    assert cache.get_sequence(1)[0].shape == (2, 0, 2)
    assert cache.cache_lengths.tolist() == [4, 0, 3]
    usage = cache.get_memory_usage()
    assert usage["tokens_cached"] == 7 and usage["utilization"] == 7 / 18
    assert_nothing_past_the_lengths(cache)


@GRADES
def test_empty_update_and_numeric_inputs():
    """An update of zero positions returns what is cached; Tensor, float64 and integer inputs are stored float32."""
    rng = np.random.default_rng(3)
    cache = KVCache(max_batch_size=1, max_seq_length=5, num_heads=1, head_dim=2)
    first = np.arange(4).reshape(1, 2, 2)
    keys, values = cache.update(0, first, Tensor(first * 10.0))
    np.testing.assert_array_equal(keys.data, first)
    np.testing.assert_array_equal(values.data, first * 10.0)
    keys, values = cache.update(0, np.zeros((1, 0, 2)), np.zeros((1, 0, 2)))
    np.testing.assert_array_equal(keys.data, first)
    assert cache.cache_lengths[0] == 2
    new_keys, new_values = random_kv(rng, 1, 3, 2)
    keys, _ = cache.update(0, new_keys, new_values)                          # fills it exactly
    np.testing.assert_allclose(keys.data, np.concatenate([first, new_keys], axis=1), rtol=1e-6)
    assert cache.cached_keys.dtype == np.float32 and keys.dtype == np.float32


@GRADES
def test_overflow_raises_and_leaves_the_cache_unchanged():
    rng = np.random.default_rng(4)
    cache = reused(KVCache(max_batch_size=2, max_seq_length=6, num_heads=2, head_dim=3))
    prefix = random_kv(rng, 2, 5, 3)
    keys, _ = cache.update(0, *prefix)
    np.testing.assert_allclose(keys.data, prefix[0], rtol=1e-6)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="holds 5 of max_seq_length=6 positions; appending 2 would need 7"):
        cache.update(0, *random_kv(rng, 2, 2, 3))
    assert_unchanged(cache, before)
    keys, _ = cache.update(0, *random_kv(rng, 2, 1, 3))                      # still usable: 5 + 1 fits
    np.testing.assert_allclose(keys.data[:, :5], prefix[0], rtol=1e-6)
    assert_nothing_past_the_lengths(cache)


@GRADES
def test_reset_empties_rows():
    rng = np.random.default_rng(5)
    cache = KVCache(max_batch_size=2, max_seq_length=4, num_heads=1, head_dim=2)
    cache.update(0, *random_kv(rng, 1, 3, 2))
    cache.update(1, *random_kv(rng, 1, 2, 2))
    cache.reset(0)
    assert cache.cache_lengths.tolist() == [0, 2]
    np.testing.assert_array_equal(cache.cached_keys[0], 0.0)
    fresh = random_kv(rng, 1, 4, 2)
    keys, values = cache.update(0, *fresh)                                   # starts again at position 0
    np.testing.assert_allclose(keys.data, fresh[0], rtol=1e-6)
    np.testing.assert_allclose(values.data, fresh[1], rtol=1e-6)
    cache.reset()
    assert cache.cache_lengths.tolist() == [0, 0]
    assert cache.get_memory_usage()["tokens_cached"] == 0


# ---------------------------------------------------------------- a cache in use, step by step (graded)
# (max_batch_size, max_seq_length, num_heads, head_dim), then the operations: ("update", row, new_len),
# ("reset", row) or ("reset", None) for every row. After each one, every row is checked against the
# concatenation of what was appended to it since its last reset.
SCHEDULES = [
    ((3, 6, 2, 3), [("update", 0, 3), ("update", 2, 2), ("update", 0, 2), ("reset", 2), ("update", 2, 4),
                    ("update", 1, 1)]),
    ((2, 5, 1, 4), [("update", 1, 2), ("update", 0, 4), ("reset", 1), ("update", 1, 5), ("update", 0, 1)]),
    ((4, 7, 3, 2), [("update", 3, 1), ("update", 1, 3), ("update", 3, 3), ("reset", 3), ("update", 1, 2),
                    ("update", 3, 2), ("update", 0, 7)]),
    ((3, 4, 2, 2), [("update", 0, 2), ("update", 1, 2), ("update", 2, 2), ("reset", 0), ("update", 1, 2),
                    ("update", 0, 1), ("reset", None), ("update", 2, 3)]),
    ((2, 8, 4, 1), [("update", 0, 1), ("update", 0, 1), ("update", 1, 6), ("update", 0, 3), ("reset", 1),
                    ("update", 1, 2), ("update", 1, 2)]),
    ((5, 3, 1, 3), [("update", 4, 2), ("update", 2, 3), ("reset", 4), ("update", 4, 1), ("update", 4, 1),
                    ("update", 0, 2)]),
    ((2, 6, 2, 2), [("update", 1, 4), ("update", 0, 2), ("reset", 0), ("update", 0, 3), ("update", 1, 2),
                    ("reset", 1), ("update", 1, 1)]),
]


def check_every_row(cache, appended, case):
    """Each row holds what was appended to it, in order, returned as views; nothing else is stored."""
    assert cache.cache_lengths.tolist() == [sum(k.shape[1] for k, _ in chunks) for chunks in appended], (
        f"{case}: lengths {cache.cache_lengths.tolist()}")
    for row, chunks in enumerate(appended):
        keys, values = cache.get_sequence(row)
        empty = np.zeros((cache.num_heads, 0, cache.head_dim))
        expected_keys = np.concatenate([k for k, _ in chunks], axis=1) if chunks else empty
        expected_values = np.concatenate([v for _, v in chunks], axis=1) if chunks else empty
        np.testing.assert_allclose(keys.data, expected_keys, rtol=1e-6, err_msg=f"{case}: row {row} keys")
        np.testing.assert_allclose(values.data, expected_values, rtol=1e-6, err_msg=f"{case}: row {row} values")
        if chunks:
            views = (np.shares_memory(keys.data, cache.cached_keys)
                     and np.shares_memory(values.data, cache.cached_values))
            assert views, f"{case}: get_sequence({row}) must return views of the cache, not copies"
    assert_nothing_past_the_lengths(cache)


@GRADES
@pytest.mark.parametrize("sizes, operations", SCHEDULES)
def test_a_cache_in_use_step_by_step(sizes, operations):
    rng = np.random.default_rng(sum(sizes) + len(operations))
    cache = KVCache(*sizes)
    appended = [[] for _ in range(cache.max_batch_size)]
    for step, (operation, row, *new_len) in enumerate(operations, start=1):
        case = f"KVCache{sizes}, step {step}: {operation}({row}{', ' + str(new_len[0]) if new_len else ''})"
        if operation == "update":
            chunk = random_kv(rng, cache.num_heads, new_len[0], cache.head_dim)
            appended[row].append(chunk)
            keys, values = cache.update(row, *chunk)
            np.testing.assert_allclose(keys.data, np.concatenate([k for k, _ in appended[row]], axis=1), rtol=1e-6,
                                       err_msg=f"{case}: the keys update returns")
            assert np.shares_memory(keys.data, cache.cached_keys), f"{case}: update must return views"
        else:
            cache.reset(row)
            for cleared in range(cache.max_batch_size) if row is None else [row]:
                appended[cleared] = []
        check_every_row(cache, appended, case)


# ---------------------------------------------------------------- provided code and errors (not graded)
def test_allocation():
    cache = KVCache(max_batch_size=2, max_seq_length=6, num_heads=2, head_dim=3)
    assert cache.cached_keys.shape == cache.cached_values.shape == (2, 2, 6, 3)
    assert cache.cached_keys.dtype == np.float32 and cache.cache_lengths.tolist() == [0, 0]
    assert cache.get_memory_usage()["tokens_cached"] == 0


@pytest.mark.parametrize("batch_idx", [2, -1, 10])
def test_row_out_of_range_raises_index_error(batch_idx):
    cache = KVCache(max_batch_size=2, max_seq_length=4, num_heads=1, head_dim=2)
    message = f"batch_idx {batch_idx} is out of range for max_batch_size=2"
    with pytest.raises(IndexError, match=message):
        cache.update(batch_idx, np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))
    with pytest.raises(IndexError, match=message):
        cache.get_sequence(batch_idx)
    with pytest.raises(IndexError, match=message):
        cache.reset(batch_idx)


@pytest.mark.parametrize("batch_idx", [0.0, "0", True, None])
def test_non_integer_row_raises_type_error(batch_idx):
    cache = KVCache(max_batch_size=2, max_seq_length=4, num_heads=1, head_dim=2)
    with pytest.raises(TypeError, match="batch_idx must be an integer"):
        cache.update(batch_idx, np.zeros((1, 1, 2)), np.zeros((1, 1, 2)))


@pytest.mark.parametrize("shape", [(3, 1, 4), (2, 1, 5), (2, 4), (1, 2, 1, 4)])
def test_wrong_heads_or_head_dim_raise(shape):
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=4)
    before = snapshot(cache)
    expected = re.escape(f"new_keys has shape {shape}, expected (num_heads=2, new_len, head_dim=4)")
    with pytest.raises(ValueError, match=expected):
        cache.update(0, np.zeros(shape), np.zeros(shape))
    assert_unchanged(cache, before)


def test_values_shaped_unlike_keys_raise():
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match=re.escape("new_values has shape (2, 2, 4) but new_keys has shape (2, 1, 4)")):
        cache.update(0, np.zeros((2, 1, 4)), np.zeros((2, 2, 4)))
    assert cache.cache_lengths.tolist() == [0]


@pytest.mark.parametrize("name, args", [("max_batch_size", (0, 4, 1, 1)), ("max_seq_length", (1, 0, 1, 1)),
                                        ("num_heads", (1, 4, -1, 1)), ("head_dim", (1, 4, 1, 0))])
def test_bad_sizes_raise(name, args):
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got {[a for a in args if a < 1][0]}"):
        KVCache(*args)

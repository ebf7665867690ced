"""Parts 5a and 5b, `split_heads`/`merge_heads` and `repeat_kv_heads`: against column-slice references.

Graded cases have several heads, several tokens and, for the repeat, several key/value heads
each shared by several query heads: with one head or one token a bare reshape equals the split,
and with one key/value head a tile equals the grouped repeat.
"""
import numpy as np
import pytest

from tinytorch.core.attention import merge_heads, repeat_kv_heads, split_heads
from tinytorch.core.tensor import Tensor

SPLIT_MERGE = pytest.mark.grades("test-split-merge-heads")
REPEAT = pytest.mark.grades("test-repeat-kv-heads")


# ---------------------------------------------------------------- split_heads / merge_heads
@SPLIT_MERGE
def test_split_by_hand():
    """Head 0 takes features 0-1 of every token, head 1 features 2-3: a transpose, not a bare reshape."""
    x = np.arange(8).reshape(1, 2, 4)                       # tokens [0 1 2 3] and [4 5 6 7]
    heads = split_heads(x, 2)
    assert isinstance(heads, Tensor) and heads.dtype == np.float32
    np.testing.assert_array_equal(heads.data, [[[[0, 1], [4, 5]], [[2, 3], [6, 7]]]],
                                  err_msg="split_heads(tokens [0 1 2 3], [4 5 6 7], 2 heads)")


@SPLIT_MERGE
@pytest.mark.parametrize("B, T, E, H", [(2, 5, 12, 3), (1, 3, 6, 2), (2, 4, 16, 4)])
def test_split_matches_reference(ref, B, T, E, H):
    x = np.random.default_rng(B * 100 + T * 10 + E).normal(size=(B, T, E)).astype(np.float32)
    heads = split_heads(x, H).data
    assert heads.shape == (B, H, T, E // H), f"split_heads of {(B, T, E)} into {H}: shape {heads.shape}"
    np.testing.assert_array_equal(heads, ref.split_heads(x, H), err_msg=f"split_heads of {(B, T, E)} into {H}")


@SPLIT_MERGE
def test_merge_by_hand():
    heads = np.array([[[[0, 1], [4, 5]], [[2, 3], [6, 7]]]])
    merged = merge_heads(heads)
    assert isinstance(merged, Tensor) and merged.dtype == np.float32
    np.testing.assert_array_equal(merged.data, np.arange(8).reshape(1, 2, 4), err_msg="merge_heads of 2 heads")


@SPLIT_MERGE
@pytest.mark.parametrize("B, H, T, hd", [(2, 3, 5, 4), (1, 2, 3, 3), (2, 4, 4, 4)])
def test_merge_matches_reference(ref, B, H, T, hd):
    heads = np.random.default_rng(B + H + T).normal(size=(B, H, T, hd)).astype(np.float32)
    merged = merge_heads(heads).data
    assert merged.shape == (B, T, H * hd), f"merge_heads of {(B, H, T, hd)}: shape {merged.shape}"
    np.testing.assert_array_equal(merged, ref.merge_heads(heads), err_msg=f"merge_heads of {(B, H, T, hd)}")


@SPLIT_MERGE
@pytest.mark.parametrize("B, T, E, H", [(2, 5, 12, 3), (3, 2, 8, 2)])
def test_merge_undoes_split(B, T, E, H):
    x = np.random.default_rng(E).normal(size=(B, T, E)).astype(np.float32)
    np.testing.assert_array_equal(merge_heads(split_heads(x, H)).data, x,
                                  err_msg=f"merge_heads(split_heads(x of {(B, T, E)}, {H}))")


# ---------------------------------------------------------------- repeat_kv_heads
@REPEAT
def test_repeat_by_hand():
    """Two key/value heads for four query heads: heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1."""
    x = np.array([[[[1.0]], [[2.0]]]])                     # (1, 2, 1, 1)
    repeated = repeat_kv_heads(x, 4)
    assert isinstance(repeated, Tensor) and repeated.dtype == np.float32
    np.testing.assert_array_equal(repeated.data[0, :, 0, 0], [1.0, 1.0, 2.0, 2.0],
                                  err_msg="kv heads [a, b] for 4 query heads must be [a, a, b, b]")


@REPEAT
@pytest.mark.parametrize("Hkv, H", [(2, 6), (4, 8), (3, 6)])
def test_repeat_matches_reference(ref, Hkv, H):
    x = np.random.default_rng(Hkv * 10 + H).normal(size=(2, Hkv, 5, 3)).astype(np.float32)
    repeated = repeat_kv_heads(x, H).data
    assert repeated.shape == (2, H, 5, 3), f"repeat_kv_heads({Hkv} -> {H}): shape {repeated.shape}"
    np.testing.assert_array_equal(repeated, ref.repeat_kv_heads(x, H), err_msg=f"repeat_kv_heads({Hkv} -> {H})")


# ---------------------------------------------------------------- robustness (not graded)
@pytest.mark.parametrize("B, T, E, H", [(3, 4, 8, 1), (1, 3, 6, 6), (2, 1, 16, 4), (0, 3, 8, 2), (2, 0, 8, 2)])
def test_split_and_merge_of_degenerate_sizes(ref, B, T, E, H):
    x = np.random.default_rng(B * 100 + T * 10 + E).normal(size=(B, T, E)).astype(np.float32)
    heads = split_heads(x, H).data
    np.testing.assert_array_equal(heads, ref.split_heads(x, H))
    np.testing.assert_array_equal(merge_heads(heads).data, x)


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_any_numeric_input_gives_float32(ref, dtype):
    x = np.arange(24).reshape(2, 3, 4).astype(dtype)
    heads = split_heads(Tensor(x), 2)
    assert heads.dtype == np.float32
    np.testing.assert_array_equal(heads.data, ref.split_heads(x, 2))
    merged = merge_heads(heads.data.astype(dtype))
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged.data, x)


@pytest.mark.parametrize("Hkv, H", [(1, 4), (3, 3), (2, 2)])
def test_repeat_with_one_kv_head_or_none_shared(ref, Hkv, H):
    x = np.random.default_rng(Hkv * 10 + H).normal(size=(2, Hkv, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(repeat_kv_heads(x, H).data, ref.repeat_kv_heads(x, H))


def test_repeat_of_empty_and_integer_inputs(ref):
    x = np.arange(2 * 2 * 3 * 2).reshape(2, 2, 3, 2)
    repeated = repeat_kv_heads(x, 4)
    assert repeated.dtype == np.float32
    np.testing.assert_array_equal(repeated.data, ref.repeat_kv_heads(x, 4))
    assert repeat_kv_heads(np.zeros((0, 2, 3, 2)), 6).shape == (0, 6, 3, 2)
    assert repeat_kv_heads(np.zeros((2, 1, 0, 2)), 3).shape == (2, 3, 0, 2)


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_split_heads_rejects_bad_inputs():
    with pytest.raises(ValueError, match="features=10 is not divisible by num_heads=3"):
        split_heads(np.zeros((1, 2, 10)), 3)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, features\), got shape \(2, 10\)"):
        split_heads(np.zeros((2, 10)), 2)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        split_heads(np.zeros((1, 2, 10)), 0)
    with pytest.raises(TypeError, match="num_heads must be an integer"):
        split_heads(np.zeros((1, 2, 10)), 2.0)


def test_merge_heads_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"x must have shape \(batch, heads, seq, head_dim\), got shape \(2, 3, 4\)"):
        merge_heads(np.zeros((2, 3, 4)))


def test_repeat_kv_heads_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_heads=5 is not a multiple of the 2 key/value heads"):
        repeat_kv_heads(np.zeros((1, 2, 3, 4)), 5)
    with pytest.raises(ValueError, match="num_heads=1 is not a multiple of the 2 key/value heads"):
        repeat_kv_heads(np.zeros((1, 2, 3, 4)), 1)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 4\)"):
        repeat_kv_heads(np.zeros((2, 3, 4)), 2)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got -2"):
        repeat_kv_heads(np.zeros((1, 2, 3, 4)), -2)

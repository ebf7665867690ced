"""Part 5, heads: `split_heads`, `merge_heads` and `repeat_kv_heads` against index-by-index references."""
import numpy as np
import pytest

from tinytorch.core.attention import merge_heads, repeat_kv_heads, split_heads
from tinytorch.core.tensor import Tensor


def reference_split(x, num_heads):
    """heads[b, h, t, i] = x[b, t, h * hd + i]."""
    B, T, E = x.shape
    hd = E // num_heads
    heads = np.zeros((B, num_heads, T, hd), dtype=np.float32)
    for b in range(B):
        for h in range(num_heads):
            for t in range(T):
                heads[b, h, t] = x[b, t, h * hd:(h + 1) * hd]
    return heads


def reference_merge(heads):
    """x[b, t, h * hd + i] = heads[b, h, t, i]."""
    B, H, T, hd = heads.shape
    x = np.zeros((B, T, H * hd), dtype=np.float32)
    for b in range(B):
        for t in range(T):
            x[b, t] = np.concatenate([heads[b, h, t] for h in range(H)])
    return x


def reference_repeat(x, num_heads):
    """out[:, h] = x[:, h // G], G = num_heads // Hkv query heads per key/value head."""
    heads_per_kv = num_heads // x.shape[1]
    return np.stack([x[:, h // heads_per_kv] for h in range(num_heads)], axis=1)


# ---------------------------------------------------------------- split_heads / merge_heads
@pytest.mark.grades("test-split-merge-heads")
def test_split_by_hand():
    """Head 0 takes features 0-1 of every token, head 1 features 2-3: a transpose, not a bare reshape."""
    x = np.arange(8).reshape(1, 2, 4)                       # tokens [0 1 2 3] and [4 5 6 7]
    heads = split_heads(x, 2)
    assert isinstance(heads, Tensor) and heads.dtype == np.float32
    np.testing.assert_array_equal(heads.data, [[[[0, 1], [4, 5]],
                                                [[2, 3], [6, 7]]]])


@pytest.mark.grades("test-split-merge-heads")
def test_merge_by_hand():
    heads = np.array([[[[0, 1], [4, 5]],
                       [[2, 3], [6, 7]]]])
    merged = merge_heads(heads)
    assert isinstance(merged, Tensor) and merged.dtype == np.float32
    np.testing.assert_array_equal(merged.data, np.arange(8).reshape(1, 2, 4))


@pytest.mark.grades("test-split-merge-heads")
@pytest.mark.parametrize("B, T, E, H", [(2, 5, 12, 3), (3, 4, 8, 1), (1, 3, 6, 6), (2, 1, 16, 4), (0, 3, 8, 2),
                                        (2, 0, 8, 2)])
def test_split_and_merge_match_references(B, T, E, H):
    x = np.random.default_rng(B * 100 + T * 10 + E).normal(size=(B, T, E)).astype(np.float32)
    heads = split_heads(x, H).data
    assert heads.shape == (B, H, T, E // H)
    np.testing.assert_array_equal(heads, reference_split(x, H))
    merged = merge_heads(heads).data
    assert merged.shape == (B, T, E)
    np.testing.assert_array_equal(merged, reference_merge(heads))
    np.testing.assert_array_equal(merged, x)                                  # inverses of each other
    other = np.random.default_rng(1).normal(size=(B, H, T, E // H)).astype(np.float32)
    np.testing.assert_array_equal(merge_heads(other).data, reference_merge(other))
    np.testing.assert_array_equal(split_heads(merge_heads(other), H).data, other)


@pytest.mark.grades("test-split-merge-heads")
@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_any_numeric_input_gives_float32(dtype):
    x = np.arange(24).reshape(2, 3, 4).astype(dtype)
    heads = split_heads(Tensor(x), 2)
    assert heads.dtype == np.float32
    np.testing.assert_array_equal(heads.data, reference_split(x.astype(np.float32), 2))
    merged = merge_heads(heads.data.astype(dtype))
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged.data, x)


# ---------------------------------------------------------------- repeat_kv_heads
@pytest.mark.grades("test-repeat-kv-heads")
def test_repeat_by_hand():
    """Two key/value heads for four query heads: heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1."""
    x = np.array([[[[1.0]], [[2.0]]]])                     # (1, 2, 1, 1)
    repeated = repeat_kv_heads(x, 4)
    assert isinstance(repeated, Tensor) and repeated.dtype == np.float32
    np.testing.assert_array_equal(repeated.data[0, :, 0, 0], [1.0, 1.0, 2.0, 2.0])


@pytest.mark.grades("test-repeat-kv-heads")
@pytest.mark.parametrize("Hkv, H", [(1, 4), (2, 6), (3, 3), (4, 8), (2, 2)])
def test_repeat_matches_reference(Hkv, H):
    x = np.random.default_rng(Hkv * 10 + H).normal(size=(2, Hkv, 5, 3)).astype(np.float32)
    repeated = repeat_kv_heads(x, H).data
    assert repeated.shape == (2, H, 5, 3)
    np.testing.assert_array_equal(repeated, reference_repeat(x, H))


@pytest.mark.grades("test-repeat-kv-heads")
def test_repeat_of_empty_and_integer_inputs():
    x = np.arange(2 * 2 * 3 * 2).reshape(2, 2, 3, 2)
    repeated = repeat_kv_heads(x, 4)
    assert repeated.dtype == np.float32
    np.testing.assert_array_equal(repeated.data, reference_repeat(x, 4))
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

"""Part 1, `create_causal_mask`: checked entry by entry against the rule j <= i + (S - T)."""
import numpy as np
import pytest

from tinytorch.core.attention import CausalMask, create_causal_mask
from tinytorch.core.tensor import Tensor


def reference_causal_mask(seq_len, key_len):
    """The mask written from its definition, one entry at a time."""
    offset = key_len - seq_len
    mask = np.zeros((seq_len, key_len), dtype=np.float32)
    for i in range(seq_len):
        for j in range(key_len):
            mask[i, j] = 1.0 if j <= i + offset else 0.0
    return mask


# ---------------------------------------------------------------- values
@pytest.mark.grades("test-causal-mask")
def test_square_mask_by_hand():
    """Query i sees keys 0..i: the lower triangle, diagonal included."""
    expected = np.array([[1, 0, 0, 0],
                         [1, 1, 0, 0],
                         [1, 1, 1, 0],
                         [1, 1, 1, 1]], dtype=np.float32)
    mask = create_causal_mask(4)
    assert isinstance(mask, CausalMask) and isinstance(mask, Tensor)
    assert mask.shape == (4, 4) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask.data, expected)
    assert mask.offset == 0


@pytest.mark.grades("test-causal-mask")
def test_offset_masks_by_hand():
    """Two queries after three cached keys see 4 and 5 keys; more queries than keys hide the first rows."""
    np.testing.assert_array_equal(create_causal_mask(2, 5).data, [[1, 1, 1, 1, 0],
                                                                   [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(create_causal_mask(4, 2).data, [[0, 0],
                                                                   [0, 0],
                                                                   [1, 0],
                                                                   [1, 1]])


@pytest.mark.grades("test-causal-mask")
@pytest.mark.parametrize("seq_len, key_len", [(1, 1), (1, 6), (3, 3), (3, 7), (6, 2), (5, 5), (7, 1),
                                              (0, 0), (0, 4), (3, 0)])
def test_matches_definition(seq_len, key_len):
    """Every entry, shape, dtype and the recorded offset agree with the definition."""
    mask = create_causal_mask(seq_len, key_len)
    assert mask.shape == (seq_len, key_len) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask.data, reference_causal_mask(seq_len, key_len))
    assert mask.offset == key_len - seq_len


@pytest.mark.grades("test-causal-mask")
def test_last_query_sees_every_key_and_rows_grow_by_one():
    """With S >= T the last query sees all S keys and each row sees exactly one key more than the last."""
    mask = create_causal_mask(5, 9).data
    np.testing.assert_array_equal(mask.sum(axis=1), [5, 6, 7, 8, 9])
    assert mask[-1].all()


@pytest.mark.grades("test-causal-mask")
def test_key_len_defaults_to_seq_len_and_numpy_ints_work():
    np.testing.assert_array_equal(create_causal_mask(3).data, create_causal_mask(3, 3).data)
    mask = create_causal_mask(np.int64(2), np.int32(3))
    np.testing.assert_array_equal(mask.data, [[1, 1, 0], [1, 1, 1]])
    assert mask.offset == 1 and isinstance(mask.offset, int)


@pytest.mark.grades("test-causal-mask")
def test_mask_is_read_only():
    """The offset describes the data, so the data cannot be changed under it."""
    mask = create_causal_mask(3)
    with pytest.raises(ValueError):
        mask.data[0, 2] = 1.0
    np.testing.assert_array_equal(mask.data, reference_causal_mask(3, 3))


# ---------------------------------------------------------------- errors (provided validation, not graded)
@pytest.mark.parametrize("args, name", [((-1,), "seq_len"), ((2, -3), "key_len")])
def test_negative_lengths_raise(args, name):
    bad = args[-1]
    with pytest.raises(ValueError, match=rf"{name} must be >= 0, got {bad}"):
        create_causal_mask(*args)


@pytest.mark.parametrize("args", [(2.0,), ("3",), (True,), (3, 2.5), (None,)])
def test_non_integer_lengths_raise_type_error(args):
    with pytest.raises(TypeError, match="must be an integer"):
        create_causal_mask(*args)

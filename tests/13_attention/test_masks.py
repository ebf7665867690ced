"""Part 1, `create_causal_mask` and `create_padding_mask`: against hand-written masks and the reference."""
import numpy as np
import pytest

from tinytorch.core.attention import CausalMask, create_causal_mask, create_padding_mask
from tinytorch.core.tensor import Tensor

GRADES = pytest.mark.grades("test-masks")


# ---------------------------------------------------------------- causal
@GRADES
def test_causal_mask_with_cached_keys_by_hand():
    """2 new queries after 3 cached keys: query 0 sits at position 3, query 1 at position 4."""
    mask = create_causal_mask(2, 5)
    assert isinstance(mask, CausalMask) and mask.dtype == np.float32 and mask.offset == 3
    np.testing.assert_array_equal(mask.data, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                                  err_msg="create_causal_mask(2, 5): query i sees keys j <= i + 3")


@GRADES
def test_causal_mask_square_by_hand():
    mask = create_causal_mask(4)
    np.testing.assert_array_equal(mask.data, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
                                  err_msg="create_causal_mask(4): query i sees keys j <= i")


@GRADES
@pytest.mark.parametrize("seq_len, key_len", [(3, 7), (1, 6), (5, 6), (6, 8), (4, 9)])
def test_causal_mask_matches_reference(ref, seq_len, key_len):
    """Lengths 0 and 1 alone cannot tell a bug apart; they ride along with a discriminating case."""
    mask = create_causal_mask(seq_len, key_len)
    expected = ref.causal_mask(seq_len, key_len)
    assert mask.shape == expected.shape, f"create_causal_mask({seq_len}, {key_len}): shape {mask.shape}"
    np.testing.assert_array_equal(mask.data, expected, err_msg=f"create_causal_mask({seq_len}, {key_len})")
    assert create_causal_mask(np.int64(0), 0).shape == (0, 0)
    np.testing.assert_array_equal(create_causal_mask(3).data, create_causal_mask(3, 3).data)   # key_len defaults to T


# ---------------------------------------------------------------- padding
@GRADES
def test_padding_mask_by_hand():
    """Rows of true length 2, 4 and 1 padded to 4 keys."""
    mask = create_padding_mask(np.array([2, 4, 1]), 4)
    assert isinstance(mask, Tensor) and mask.dtype == np.float32 and mask.shape == (3, 1, 1, 4)
    np.testing.assert_array_equal(mask.data[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
                                  err_msg="create_padding_mask([2, 4, 1], 4): row b sees keys j < lengths[b]")


@GRADES
@pytest.mark.parametrize("lengths, key_len", [([3, 5, 0, 2], 5), ([1, 6], 7), ([4], 6), ([2, 2, 3], 3)])
def test_padding_mask_matches_reference(ref, lengths, key_len):
    mask = create_padding_mask(np.array(lengths), key_len)
    np.testing.assert_array_equal(mask.data, ref.padding_mask(lengths, key_len),
                                  err_msg=f"create_padding_mask({lengths}, {key_len})")
    assert mask.dtype == np.float32


# ---------------------------------------------------------------- together
@GRADES
@pytest.mark.parametrize("lengths, seq_len, key_len", [([5, 3], 4, 5), ([6, 4, 2], 2, 6), ([7, 1], 3, 7)])
def test_causal_and_padding_masks_together_match_reference(ref, lengths, seq_len, key_len):
    """A padded batch decoding causally: a key is visible when it is both in the past and real."""
    both = create_causal_mask(seq_len, key_len).data * create_padding_mask(np.array(lengths), key_len).data
    expected = ref.causal_mask(seq_len, key_len) * ref.padding_mask(lengths, key_len)
    np.testing.assert_array_equal(both, expected, err_msg=f"causal ({seq_len}, {key_len}) and padding {lengths}")


# ---------------------------------------------------------------- robustness (provided code, not graded)
def test_causal_mask_is_read_only():
    mask = create_causal_mask(3)
    with pytest.raises(ValueError, match="read-only"):
        mask.data[0, 1] = 1.0


def test_padding_mask_takes_a_tensor_and_an_empty_batch():
    np.testing.assert_array_equal(create_padding_mask(Tensor(np.array([1, 2])), 2).data[:, 0, 0], [[1, 0], [1, 1]])
    assert create_padding_mask(np.zeros(0, dtype=np.int64), 3).shape == (0, 1, 1, 3)


@pytest.mark.parametrize("args, name", [((-1,), "seq_len"), ((2, -3), "key_len")])
def test_negative_causal_lengths_raise(args, name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got -"):
        create_causal_mask(*args)


@pytest.mark.parametrize("args", [(2.0,), (True,), (2, 3.5), ("3",)])
def test_non_integer_causal_lengths_raise_type_error(args):
    with pytest.raises(TypeError, match="must be an integer"):
        create_causal_mask(*args)


@pytest.mark.parametrize("lengths, error, message", [
    ([1.5, 2.0], TypeError, "lengths must be a 1-D array of integers"),
    ([[1, 2]], TypeError, "lengths must be a 1-D array of integers"),
    ([1, 5], ValueError, r"lengths must lie in 0..key_len=4, got \[1, 5\]"),
    ([-1, 2], ValueError, r"lengths must lie in 0..key_len=4, got \[-1, 2\]"),
])
def test_bad_padding_lengths_raise(lengths, error, message):
    with pytest.raises(error, match=message):
        create_padding_mask(np.array(lengths), 4)

"""Part 2, `masked_softmax`: against the float64 reference and rows worked out by hand.

The random cases are hard on purpose: rows sit near +-200 (exp overflows float32 without the
max subtraction), the rows are not square (a softmax over the wrong axis shows), and every case
has masked entries, fully masked rows and a row of -inf scores.
"""
import re

import numpy as np
import pytest

from tinytorch.core.attention import masked_softmax
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-7  # float32 result against a float64 reference
GRADES = pytest.mark.grades("test-masked-softmax")


def hard_case(seed, shape):
    """(scores, keep): shifted rows, random masks, one fully masked row and one row of -inf with one finite score."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(scale=3.0, size=shape) + rng.choice([-200.0, 0.0, 200.0], size=shape[:-1] + (1,))
    keep = rng.random(shape) < 0.6
    rows, keep_rows = scores.reshape(-1, shape[-1]), keep.reshape(-1, shape[-1])
    keep_rows[0] = False                                   # a fully masked row
    keep_rows[1] = True
    rows[1, 1:] = -np.inf                                  # -inf scores are masked out too
    return scores.astype(np.float32), keep             # float32, as the softmax sees them


def check(weights, expected, case):
    weights = weights.data if isinstance(weights, Tensor) else weights
    assert weights.shape == expected.shape, f"{case}: shape {weights.shape}, expected {expected.shape}"
    np.testing.assert_allclose(weights, expected, rtol=RTOL, atol=ATOL, err_msg=case)


# ---------------------------------------------------------------- values
@GRADES
def test_masked_row_by_hand():
    """scores ln(1, 2, 3, 4) keeping entries 0 and 2: weights (1/4, 0, 3/4, 0)."""
    weights = masked_softmax(np.log([[1.0, 2.0, 3.0, 4.0]]), np.array([[True, False, True, False]]))
    assert isinstance(weights, Tensor) and weights.dtype == np.float32
    check(weights, np.array([[0.25, 0.0, 0.75, 0.0]]), "scores ln(1, 2, 3, 4), keep entries 0 and 2")


@GRADES
@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 3), (2, 3, 4, 6)])
def test_hard_random_cases_match_reference(ref, shape):
    scores, keep = hard_case(sum(shape), shape)
    check(masked_softmax(scores, keep), ref.masked_softmax(scores, keep), f"scores {shape} with a random mask")


@GRADES
@pytest.mark.parametrize("mask_kind", ["bool", "float01", "int", "tensor"])
def test_every_kind_of_mask_means_nonzero_keeps(ref, mask_kind):
    """Boolean, 0/1 float, arbitrary nonzero integers and Tensor masks all mean 'nonzero = keep'."""
    scores, keep = hard_case(1, (3, 5, 6))
    rng = np.random.default_rng(2)
    mask = {"bool": keep, "float01": keep.astype(np.float32), "int": keep * rng.integers(1, 9, keep.shape),
            "tensor": Tensor(keep.astype(np.float32))}[mask_kind]
    check(masked_softmax(scores, mask), ref.masked_softmax(scores, keep), f"{mask_kind} mask")


@GRADES
@pytest.mark.parametrize("mask_shape", [(1, 6), (5, 6), (2, 1, 5, 6)])
def test_broadcast_masks_match_reference(ref, mask_shape):
    scores, _ = hard_case(3, (2, 3, 5, 6))
    keep = np.random.default_rng(4).random(mask_shape) < 0.5
    keep.reshape(-1, 6)[0] = False                         # a fully masked row, broadcast to many
    check(masked_softmax(scores, keep), ref.masked_softmax(scores, keep), f"mask of shape {mask_shape}")


@GRADES
def test_masked_huge_scores_do_not_leak():
    """A masked score of 1e30 must not win: masking is not multiplication by 0."""
    scores = np.array([[1e30, 0.0, np.log(3.0)], [0.0, -1e30, 0.0]])
    keep = np.array([[False, True, True], [True, False, True]])
    check(masked_softmax(scores, keep), np.array([[0.0, 0.25, 0.75], [0.5, 0.0, 0.5]]), "masked 1e30 scores")


@GRADES
def test_fully_masked_rows_are_zero():
    """Row 0 is fully masked by the mask, row 1 by -inf scores: zeros, not nan and not 1/S."""
    scores = np.array([[1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf], [0.0, np.log(3.0), 7.0]])
    keep = np.array([[0, 0, 0], [1, 1, 1], [1, 1, 0]])
    check(masked_softmax(scores, keep), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.75, 0.0]]),
          "fully masked rows")


@GRADES
def test_logits_near_1e5_stay_finite():
    """exp(1e5) overflows float32 and float64 alike; a stable softmax subtracts the row maximum first."""
    scores = np.array([[1e5, 1e5 - 1.0, 1e5 - 2.0], [-1e5, -1e5 + 1.0, -1e5]])   # exact in float32
    e = np.exp([0.0, -1.0, -2.0])
    check(masked_softmax(scores, np.array([[1, 1, 1], [1, 1, 0]])),
          np.array([e / e.sum(), [np.exp(-1) / (1 + np.exp(-1)), 1 / (1 + np.exp(-1)), 0.0]]), "logits near 1e5")


@GRADES
@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_other_dtypes_give_float32(ref, dtype):
    scores = np.array([[0, 1, 2, 90], [300, 300, 301, 302]]).astype(dtype)
    keep = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])
    weights = masked_softmax(scores, keep)
    assert weights.dtype == np.float32
    check(weights, ref.masked_softmax(scores, keep), f"{np.dtype(dtype).name} scores")


# ---------------------------------------------------------------- robustness (not graded)
def test_single_entry_and_empty_shapes():
    """One key gets weight 1; zero rows or zero keys give arrays of the same empty shape."""
    np.testing.assert_array_equal(masked_softmax(np.array([[[-7.0]]])).data, [[[1.0]]])
    assert masked_softmax(np.zeros((2, 0, 3))).shape == (2, 0, 3)
    assert masked_softmax(np.zeros((2, 3, 0))).shape == (2, 3, 0)


def test_tensor_and_list_inputs_agree():
    scores = [[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]]
    np.testing.assert_array_equal(masked_softmax(Tensor(np.array(scores))).data, masked_softmax(scores).data)


def test_input_is_not_modified():
    scores = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    before = scores.copy()
    masked_softmax(scores, scores > 0)
    np.testing.assert_array_equal(scores, before)


def test_mask_that_does_not_broadcast_raises():
    with pytest.raises(ValueError, match=re.escape("mask of shape (3, 4) does not broadcast to scores (2, 5, 6)")):
        masked_softmax(np.zeros((2, 5, 6)), np.ones((3, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_plus_inf_scores_raise(bad):
    with pytest.raises(ValueError, match=r"scores hold NaN or \+inf"):
        masked_softmax(np.array([[0.0, bad]]))


def test_non_numeric_inputs_raise_type_error():
    with pytest.raises(TypeError, match="scores"):
        masked_softmax(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="mask"):
        masked_softmax(np.zeros((2, 2)), np.array([["x", "y"], ["z", "w"]]))

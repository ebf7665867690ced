"""Part 2, `masked_softmax`: against exp / sum in float64, hand-computed rows, and its edge cases."""
import re
import warnings

import numpy as np
import pytest

from tinytorch.core.attention import masked_softmax
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-6, 1e-7  # float32 result against a float64 reference


def reference_softmax(scores, keep=None):
    """Softmax of each last-axis row over its kept entries only, one row at a time, in float64."""
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.ones(scores.shape, bool) if keep is None else np.broadcast_to(np.asarray(keep) != 0, scores.shape)
    weights = np.zeros(scores.shape)
    for index in np.ndindex(*scores.shape[:-1]):
        row, allowed = scores[index], keep[index]
        if not allowed.any():
            continue
        exps = np.where(allowed, np.exp(row - row[allowed].max()), 0.0)
        weights[index] = exps / exps.sum()
    return weights


# ---------------------------------------------------------------- values
@pytest.mark.grades("test-masked-softmax")
def test_hand_computed_row():
    """exp(0), exp(ln 2), exp(ln 5) are 1, 2, 5: the weights are 1/8, 2/8, 5/8."""
    weights = masked_softmax(np.log([[1.0, 2.0, 5.0]]))
    assert isinstance(weights, Tensor) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.data, [[0.125, 0.25, 0.625]], rtol=RTOL)


@pytest.mark.grades("test-masked-softmax")
@pytest.mark.parametrize("shape", [(5,), (3, 7), (4, 4), (2, 3, 4, 6)])
def test_random_scores_match_reference_over_last_axis(shape):
    """Non-square and square shapes: every last-axis row sums to 1, the other axes do not matter."""
    scores = np.random.default_rng(0).normal(scale=3.0, size=shape)
    weights = masked_softmax(scores).data
    assert weights.shape == shape and weights.dtype == np.float32
    np.testing.assert_allclose(weights, reference_softmax(scores), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.grades("test-masked-softmax")
def test_mask_keeps_nonzero_entries_only():
    """Masked entries get exactly 0; the rest are the softmax of the kept scores alone."""
    scores = np.log([[1.0, 2.0, 3.0, 4.0]])
    weights = masked_softmax(scores, np.array([[True, False, True, False]])).data
    np.testing.assert_allclose(weights, [[0.25, 0.0, 0.75, 0.0]], rtol=RTOL, atol=0)


@pytest.mark.grades("test-masked-softmax")
@pytest.mark.parametrize("mask_kind", ["bool", "float01", "int", "tensor"])
def test_random_masks_of_every_kind(mask_kind):
    """Boolean, 0/1 float, arbitrary nonzero integers and Tensor masks all mean 'nonzero = keep'."""
    rng = np.random.default_rng(1)
    scores = rng.normal(scale=2.0, size=(2, 3, 5, 6))
    keep = rng.random((2, 3, 5, 6)) < 0.6
    keep[..., 0] = True                                     # no fully masked rows here
    mask = {"bool": keep, "float01": keep.astype(np.float32), "int": keep * rng.integers(1, 9, keep.shape),
            "tensor": Tensor(keep.astype(np.float32))}[mask_kind]
    weights = masked_softmax(scores, mask).data
    np.testing.assert_allclose(weights, reference_softmax(scores, keep), rtol=RTOL, atol=ATOL)
    assert np.all(weights[~keep] == 0.0)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.grades("test-masked-softmax")
@pytest.mark.parametrize("mask_shape", [(6,), (1, 6), (5, 6), (2, 1, 5, 6), (1, 3, 1, 6)])
def test_masks_broadcast(mask_shape):
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(2, 3, 5, 6))
    keep = rng.random(mask_shape) < 0.5
    keep[..., 1] = True
    np.testing.assert_allclose(masked_softmax(scores, keep).data, reference_softmax(scores, keep),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-masked-softmax")
def test_masked_huge_scores_do_not_leak():
    """A masked score of 1e30 must not win: masking is not multiplication by 0."""
    scores = np.array([[1e30, 0.0, np.log(3.0)], [0.0, -1e30, 0.0]])
    keep = np.array([[False, True, True], [True, False, True]])
    np.testing.assert_allclose(masked_softmax(scores, keep).data, [[0.0, 0.25, 0.75], [0.5, 0.0, 0.5]],
                               rtol=RTOL, atol=0)


@pytest.mark.grades("test-masked-softmax")
def test_fully_masked_rows_are_zero_without_warnings():
    scores = np.random.default_rng(3).normal(size=(2, 3, 4))
    keep = np.ones((2, 3, 4), bool)
    keep[0, 1] = False
    keep[1, :, :] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = masked_softmax(scores, keep).data
    assert np.all(np.isfinite(weights))
    np.testing.assert_array_equal(weights[0, 1], 0.0)
    np.testing.assert_array_equal(weights[1], 0.0)
    np.testing.assert_allclose(weights[0, [0, 2]], reference_softmax(scores[0, [0, 2]]), rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-masked-softmax")
def test_logits_near_1e5_stay_finite():
    """exp(1e5) overflows float32 and float64 alike; a stable softmax subtracts the row maximum first."""
    scores = np.array([[1e5, 1e5 - 1.0, 1e5 - 2.0], [-1e5, -1e5 + 1.0, -1e5]])   # exact in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = masked_softmax(scores).data
    e = np.exp([0.0, -1.0, -2.0])
    np.testing.assert_allclose(weights, [e / e.sum(), e[[1, 0, 1]] / e[[1, 0, 1]].sum()], rtol=1e-5)


@pytest.mark.grades("test-masked-softmax")
def test_shift_invariance():
    scores = np.random.default_rng(4).normal(size=(4, 5))
    np.testing.assert_allclose(masked_softmax(scores + 50.0).data, masked_softmax(scores).data, rtol=1e-5,
                               atol=1e-7)


@pytest.mark.grades("test-masked-softmax")
@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int32, np.float32])
def test_any_numeric_input_gives_float32(dtype):
    scores = np.array([[0, 1, 2], [3, 3, 3]]).astype(dtype)
    weights = masked_softmax(scores)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights.data, reference_softmax(scores), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(masked_softmax(Tensor(scores)).data, weights.data)
    np.testing.assert_allclose(masked_softmax(scores.tolist()).data, weights.data)


@pytest.mark.grades("test-masked-softmax")
def test_single_entry_and_empty_shapes():
    """One key gets weight 1; zero rows or zero keys give arrays of the same empty shape."""
    np.testing.assert_array_equal(masked_softmax(np.array([[[-7.0]]])).data, [[[1.0]]])
    assert masked_softmax(np.zeros((2, 0, 3))).shape == (2, 0, 3)
    assert masked_softmax(np.zeros((2, 3, 0))).shape == (2, 3, 0)


@pytest.mark.grades("test-masked-softmax")
def test_input_is_not_modified():
    scores = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    before = scores.copy()
    masked_softmax(scores, scores > 0)
    np.testing.assert_array_equal(scores, before)


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_mask_that_does_not_broadcast_raises():
    with pytest.raises(ValueError, match=re.escape("mask of shape (3, 4) does not broadcast to scores (2, 5, 6)")):
        masked_softmax(np.zeros((2, 5, 6)), np.ones((3, 4)))


def test_non_numeric_inputs_raise_type_error():
    with pytest.raises(TypeError, match="scores"):
        masked_softmax(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="mask"):
        masked_softmax(np.zeros((2, 2)), np.array([["x", "y"], ["z", "w"]]))

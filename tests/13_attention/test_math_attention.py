"""Part 3, `math_attention`: against the float64 reference and cases worked out by hand.

Nearly every graded case passes its own `scale` and a mask with fully masked rows, since a
formula that ignores either one is a realistic bug.
"""
import re
import warnings

import numpy as np
import pytest

from tinytorch.core.attention import math_attention
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-6  # float32 result against a float64 reference
GRADES = pytest.mark.grades("test-math-attention")


def random_qkv(rng, lead_q, lead_k, lead_v, T, S, d_k, d_v):
    return (rng.normal(size=lead_q + (T, d_k)), rng.normal(size=lead_k + (S, d_k)),
            rng.normal(size=lead_v + (S, d_v)))


def random_keep(rng, shape):
    """A random mask whose first row is fully masked and whose second row is fully open."""
    keep = rng.random(shape) < 0.5
    rows = keep.reshape(-1, shape[-1])
    rows[0], rows[min(1, len(rows) - 1)] = False, True
    return keep


def check(ref, case, q, k, v, keep=None, scale=None):
    output, weights = math_attention(q, k, v, keep, scale=scale)
    expected_output, expected_weights = ref.attention(q, k, v, keep, scale=scale)
    assert isinstance(output, Tensor) and isinstance(weights, Tensor), case
    assert output.dtype == np.float32 and weights.dtype == np.float32, case
    assert output.shape == expected_output.shape and weights.shape == expected_weights.shape, (
        f"{case}: shapes {output.shape}, {weights.shape}; expected {expected_output.shape}, {expected_weights.shape}")
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL, err_msg=f"{case}: weights")
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL, err_msg=f"{case}: output")


# ---------------------------------------------------------------- values
@GRADES
def test_hand_computed_case_with_default_scale():
    """d_k = 4, so the scale is 1/2: scores (ln 3, 0), weights (3/4, 1/4), output 3/4 v0 + 1/4 v1."""
    query = np.array([[2 * np.log(3.0), 0.0, 0.0, 0.0]])
    key = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    value = np.array([[4.0, 0.0], [0.0, 8.0]])
    output, weights = math_attention(query, key, value)
    np.testing.assert_allclose(weights.data, [[0.75, 0.25]], rtol=1e-6, err_msg="default scale 1/sqrt(4)")
    np.testing.assert_allclose(output.data, [[3.0, 2.0]], rtol=1e-6, err_msg="default scale 1/sqrt(4)")


@GRADES
def test_hand_computed_case_with_explicit_scale_and_mask():
    """scale = 1/4 turns scores (4 ln 3, 0, 9) into (ln 3, 0, 9/4); key 2 is masked out."""
    query = np.array([[np.log(3.0), 1.0]])
    key = np.array([[4.0, 0.0], [0.0, 0.0], [0.0, 9.0]])
    value = np.array([[4.0, 0.0], [0.0, 8.0], [100.0, 100.0]])
    output, weights = math_attention(query, key, value, np.array([[1, 1, 0]]), scale=0.25)
    np.testing.assert_allclose(weights.data, [[0.75, 0.25, 0.0]], rtol=1e-6, err_msg="scale=0.25, key 2 masked")
    np.testing.assert_allclose(output.data, [[3.0, 2.0]], rtol=1e-6, err_msg="scale=0.25, key 2 masked")


@GRADES
@pytest.mark.parametrize("lead, T, S, d_k, d_v, scale", [((), 3, 5, 4, 2, 0.8), ((2,), 4, 4, 8, 8, 0.05),
                                                         ((2, 3), 5, 7, 6, 3, 1.7), ((2, 3), 6, 2, 16, 5, 0.4)])
def test_random_masked_inputs_with_scale_match_reference(ref, lead, T, S, d_k, d_v, scale):
    rng = np.random.default_rng(sum(lead) + 10 * T + S)
    q, k, v = random_qkv(rng, lead, lead, lead, T, S, d_k, d_v)
    check(ref, f"lead {lead}, T={T}, S={S}, d_k={d_k}, scale={scale}, random mask", q, k, v,
          random_keep(rng, lead + (T, S)), scale)


@GRADES
@pytest.mark.parametrize("lead_q, lead_k, lead_v", [((2, 3), (1, 3), (2, 1)), ((2, 3), (3,), ()), ((1,), (3,), (3,))])
def test_leading_axes_broadcast(ref, lead_q, lead_k, lead_v):
    rng = np.random.default_rng(12)
    q, k, v = random_qkv(rng, lead_q, lead_k, lead_v, 3, 5, 4, 2)
    check(ref, f"leading axes {lead_q}, {lead_k}, {lead_v}", q, k, v, random_keep(rng, (3, 5)), scale=0.9)


@GRADES
@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (1, 7)])
def test_masks_of_every_shape_match_reference(ref, mask_shape):
    rng = np.random.default_rng(13)
    q, k, v = random_qkv(rng, (2, 3), (2, 3), (2, 3), 5, 7, 4, 3)
    check(ref, f"mask of shape {mask_shape}, scale=1.3", q, k, v, random_keep(rng, mask_shape), scale=1.3)


@GRADES
def test_default_scale_with_a_causal_mask(ref):
    rng = np.random.default_rng(14)
    q, k, v = random_qkv(rng, (2,), (2,), (2,), 4, 6, 9, 3)
    check(ref, "causal (4, 6) mask, default scale 1/3", q, k, v, ref.causal_mask(4, 6))


@GRADES
def test_fully_masked_rows_give_zero_weights_and_zero_output(ref):
    rng = np.random.default_rng(15)
    q, k, v = random_qkv(rng, (2,), (2,), (2,), 3, 4, 5, 2)
    keep = np.ones((2, 3, 4), bool)
    keep[0, 1] = False
    keep[1, :, 1:] = False
    keep[1, 2] = False
    check(ref, "fully masked rows (0, 1) and (1, 2), scale=2", q, k, v, keep, scale=2.0)


@GRADES
def test_logits_near_1e5_stay_finite(ref):
    """Scores of about 1e5 overflow exp unless the row maximum is subtracted first."""
    q = np.array([[1e5, 0, 0, 0], [-1e5, 0, 0, 0]])
    k = np.array([[1.0, 0, 0, 0], [1.0 - 1e-5, 0, 0, 0], [0.5, 0, 0, 0]])    # scores 1e5, 1e5 - 1, 5e4
    v = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    output, weights = math_attention(q, k, v, np.array([[1, 1, 0], [1, 1, 1]]), scale=1.0)
    expected_output, expected_weights = ref.attention(q, k, v, np.array([[1, 1, 0], [1, 1, 1]]), scale=1.0)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=1e-4, atol=1e-6, err_msg="logits near 1e5")
    np.testing.assert_allclose(output.data, expected_output, rtol=1e-4, atol=1e-6, err_msg="logits near 1e5")


# ---------------------------------------------------------------- robustness (not graded)
@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int32])
def test_float64_and_integer_inputs_give_float32(ref, dtype):
    rng = np.random.default_rng(16)
    q, k, v = (rng.integers(-3, 4, size=shape).astype(dtype) for shape in ((3, 4), (5, 4), (5, 2)))
    check(ref, f"{np.dtype(dtype).name} inputs", q, k, v)


def test_tensor_and_list_inputs(ref):
    rng = np.random.default_rng(17)
    q, k, v = random_qkv(rng, (), (), (), 2, 3, 4, 2)
    expected_output, _ = ref.attention(q, k, v)
    for inputs in ((Tensor(q), Tensor(k), Tensor(v)), (q.tolist(), k.tolist(), v.tolist())):
        np.testing.assert_allclose(math_attention(*inputs)[0].data, expected_output, rtol=RTOL, atol=ATOL)


def test_single_key_returns_its_value():
    rng = np.random.default_rng(18)
    q, k, v = random_qkv(rng, (2,), (2,), (2,), 4, 1, 3, 5)
    output, weights = math_attention(q, k, v)
    np.testing.assert_array_equal(weights.data, 1.0)
    np.testing.assert_allclose(output.data, np.broadcast_to(v, (2, 4, 5)), rtol=1e-6)


def test_empty_batch_and_empty_key_sequence():
    """B = 0 gives empty results; S = 0 (nothing to attend to) gives zero output and (T, 0) weights."""
    rng = np.random.default_rng(19)
    output, weights = math_attention(*random_qkv(rng, (0,), (0,), (0,), 3, 4, 2, 5))
    assert output.shape == (0, 3, 5) and weights.shape == (0, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, weights = math_attention(*random_qkv(rng, (2,), (2,), (2,), 3, 0, 2, 5))
    assert output.shape == (2, 3, 5) and weights.shape == (2, 3, 0) and output.dtype == np.float32
    np.testing.assert_array_equal(output.data, 0.0)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(20)
    arrays = [a.astype(np.float32) for a in random_qkv(rng, (2,), (2,), (2,), 3, 4, 4, 2)]
    before = [a.copy() for a in arrays]
    math_attention(*arrays, mask=np.tril(np.ones((3, 4))))
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_query_key_width_mismatch_raises():
    with pytest.raises(ValueError, match="key has d_k=7 but query has d_k=8"):
        math_attention(np.zeros((3, 8)), np.zeros((4, 7)), np.zeros((4, 2)))


def test_key_value_length_mismatch_raises():
    with pytest.raises(ValueError, match="value has seq_k=5 but key has seq_k=6"):
        math_attention(np.zeros((3, 8)), np.zeros((6, 8)), np.zeros((5, 2)))


def test_mask_that_does_not_broadcast_raises():
    with pytest.raises(ValueError, match=re.escape("mask of shape (3, 4) does not broadcast to scores (2, 5, 6)")):
        math_attention(np.zeros((2, 5, 8)), np.zeros((2, 6, 8)), np.zeros((2, 6, 2)), mask=np.ones((3, 4)))


@pytest.mark.parametrize("bad", ["query", "key", "value"])
def test_inputs_of_rank_below_two_raise(bad):
    arrays = {"query": np.zeros((3, 4)), "key": np.zeros((5, 4)), "value": np.zeros((5, 2))}
    arrays[bad] = np.zeros(4)
    with pytest.raises(ValueError, match=rf"{bad} must have shape .* got shape \(4,\)"):
        math_attention(**arrays)


def test_leading_axes_that_do_not_broadcast_raise():
    with pytest.raises(ValueError, match=r"leading axes of query \(2,\), key \(3,\)"):
        math_attention(np.zeros((2, 3, 4)), np.zeros((3, 5, 4)), np.zeros((3, 5, 2)))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan"), 1e39, 1e-39, True])
def test_bad_scale_raises(scale):
    with pytest.raises(ValueError, match="scale must be a positive number within float32's range"):
        math_attention(np.zeros((3, 4)), np.zeros((5, 4)), np.zeros((5, 2)), scale=scale)

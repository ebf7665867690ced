"""Part 11, `attention_backward` and `repeat_kv_heads_backward`: attention's gradients from the saved weights.

Each graded workload checks everything at once against the float64 reference's gradients and its
central differences: an explicit or default scale (never 1, so that a scale used too often or too
rarely shows), T != S (so that a transpose shows), a causal mask with an offset or a random mask
with a fully masked row and a key no query may see (both must get exactly zero gradient), and
leading axes that broadcast. The weights handed in are the reference's, so that a bug of
`math_attention` cannot move these points.
"""
import numpy as np
import pytest

from tinytorch.core.attention import attention_backward, create_causal_mask, repeat_kv_heads, repeat_kv_heads_backward
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-4, 1e-5   # float32 gradients (a few float32 products and sums) against float64 ones
GRADES = pytest.mark.grades("test-attention-backward")
GROUPS = pytest.mark.grades("test-repeat-kv-heads-backward")


def gradients_of(ref, q, k, v, d_output, keep, scale, mask=None):
    """The student's (d_query, d_key, d_value), from the reference's weights, as arrays."""
    _, weights = ref.attention(q, k, v, keep, scale)
    result = attention_backward(d_output, q, k, v, weights, keep if mask is None else mask, scale=scale)
    assert isinstance(result, tuple) and len(result) == 3, "attention_backward returns (d_query, d_key, d_value)"
    assert all(isinstance(g, Tensor) and g.dtype == np.float32 for g in result)
    return [g.data for g in result]


def assert_gradients(case, actual, expected, shapes, rtol=RTOL, atol=ATOL):
    for name, got, want, shape in zip(("d_query", "d_key", "d_value"), actual, expected, shapes):
        assert got.shape == shape, f"{case}: {name} has shape {got.shape}, its input's is {shape}"
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{case}: {name}")


# ---------------------------------------------------------------- attention_backward (graded)
@GRADES
def test_worked_example():
    """Part 3's example with dO = 1: dV = (0.670, 0.330), dQ = (-1.564, 1.564), dK = ((-1.564, 0), (1.564, 0))."""
    q, k, v = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0], [20.0]])
    p0 = 1 / (1 + np.exp(-1 / np.sqrt(2)))
    d_query, d_key, d_value = attention_backward(np.array([[1.0]]), q, k, v, np.array([[p0, 1 - p0]]))
    np.testing.assert_allclose(d_value.data, [[0.6698], [0.3302]], atol=1e-4, err_msg="dV = P^T dO")
    np.testing.assert_allclose(d_query.data, [[-1.5640, 1.5640]], atol=1e-4,
                               err_msg="dQ = scale dS K, dS = P (dP - rowsum(dP P)) = (-2.212, 2.212)")
    np.testing.assert_allclose(d_key.data, [[-1.5640, 0.0], [1.5640, 0.0]], atol=1e-4, err_msg="dK = scale dS^T Q")


# (q lead, k lead, v lead, T, S, scale or None for 1/sqrt(d_k), mask kind)
WORKLOADS = [((), (), (), 4, 6, None, "causal"), ((2,), (2,), (2,), 6, 4, 0.7, "random"),
             ((2, 3), (2, 3), (2, 3), 5, 7, None, "random"), ((2, 3), (1, 3), (3,), 5, 8, 0.45, "causal"),
             ((3,), (), (), 7, 5, 1.3, "random"), ((1, 2, 2), (1, 2, 2), (1, 2, 2), 3, 9, None, "causal"),
             ((2,), (2,), (2,), 6, 6, 0.6, "random"), ((2, 1), (1, 2), (2, 2), 4, 5, 0.8, "padding")]


def workload_mask(ref, rng, kind, lead, T, S):
    """The reference's 0/1 mask and the mask the student's function is given."""
    if kind == "causal":
        return ref.causal_mask(T, S), create_causal_mask(T, S)
    keep = rng.random(lead + (T, S)) < 0.6
    if kind == "padding":                                        # (B, 1, 1, S): the last two keys are padding
        keep = np.ones(lead[:1] + (1, 1, S), bool)
        keep[..., -2:] = False
    else:
        keep[..., 1, :] = False                                  # a fully masked row
        keep[..., :, 0] = False                                  # a key no query may see
    return keep, keep


@GRADES
@pytest.mark.parametrize("q_lead, k_lead, v_lead, T, S, scale, kind", WORKLOADS)
def test_every_property_on_a_workload(ref, q_lead, k_lead, v_lead, T, S, scale, kind):
    rng = np.random.default_rng(T * 100 + S * 10 + len(q_lead))
    q, k = rng.normal(size=q_lead + (T, 3)), rng.normal(size=k_lead + (S, 3))
    v = rng.normal(size=v_lead + (S, 2))
    lead = np.broadcast_shapes(q_lead, k_lead, v_lead)
    keep, mask = workload_mask(ref, rng, kind, lead, T, S)
    d_output = rng.normal(size=lead + (T, 2))
    case = f"q {q.shape}, k {k.shape}, v {v.shape}, scale {scale}, {kind} mask"
    actual = gradients_of(ref, q, k, v, d_output, keep, scale, mask)
    assert_gradients(case, actual, ref.attention_gradients(q, k, v, d_output, keep, scale),
                     (q.shape, k.shape, v.shape))
    assert_gradients(f"{case}, against central differences", actual,
                     ref.finite_difference_gradients(q, k, v, d_output, keep, scale), (q.shape, k.shape, v.shape),
                     rtol=1e-3, atol=1e-4)
    if kind == "random":
        np.testing.assert_array_equal(actual[0][..., 1, :], 0.0, err_msg=f"{case}: a fully masked row's d_query")
        np.testing.assert_array_equal(actual[1][..., 0, :], 0.0, err_msg=f"{case}: d_key of a key no query sees")
        np.testing.assert_array_equal(actual[2][..., 0, :], 0.0, err_msg=f"{case}: d_value of a key no query sees")
    if kind == "padding":
        np.testing.assert_array_equal(actual[2][..., -2:, :], 0.0, err_msg=f"{case}: d_value of padding")


@GRADES
def test_large_scores_stay_finite(ref):
    """Scores near 1e4 give one-hot weights: the gradient is finite and matches the reference."""
    rng = np.random.default_rng(21)
    q, k, v = rng.normal(size=(3, 4)) * 60, rng.normal(size=(5, 4)) * 60, rng.normal(size=(5, 3))
    d_output = rng.normal(size=(3, 3))
    actual = gradients_of(ref, q, k, v, d_output, None, 0.9)
    assert all(np.isfinite(g).all() for g in actual)
    assert_gradients("scores near 1e4", actual, ref.attention_gradients(q, k, v, d_output, None, 0.9),
                     (q.shape, k.shape, v.shape), atol=1e-3)


# ---------------------------------------------------------------- repeat_kv_heads_backward (graded)
@GROUPS
def test_worked_group_sum():
    """Query-head gradients (1, 2, 3, 4) onto 2 kv heads: (1 + 2, 3 + 4)."""
    d_x = np.arange(1.0, 5.0).reshape(1, 4, 1, 1)
    result = repeat_kv_heads_backward(d_x, 2)
    assert isinstance(result, Tensor) and result.shape == (1, 2, 1, 1), f"shape {getattr(result, 'shape', None)}"
    np.testing.assert_array_equal(result.data[0, :, 0, 0], [3.0, 7.0])


@GROUPS
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (6, 2), (6, 3), (8, 2)])
def test_group_sums_and_the_adjoint_property(ref, num_heads, num_kv_heads):
    """Against the reference's sums, and <repeat_kv_heads(x), g> = <x, repeat_kv_heads_backward(g)>."""
    rng = np.random.default_rng(num_heads * 10 + num_kv_heads)
    g, x = rng.normal(size=(2, num_heads, 5, 3)), rng.normal(size=(2, num_kv_heads, 5, 3))
    result = repeat_kv_heads_backward(g, num_kv_heads).data
    np.testing.assert_allclose(result, ref.repeat_kv_heads_gradient(g, num_kv_heads), rtol=1e-6, atol=1e-6,
                               err_msg=f"{num_heads} query heads onto {num_kv_heads} kv heads")
    np.testing.assert_allclose((x * result).sum(), (repeat_kv_heads(x, num_heads).data * g).sum(), rtol=1e-5)


@GROUPS
def test_grouped_attention_gradients(ref):
    """Grouped attention's key and value gradients: attention_backward on repeated heads, then the group sum."""
    rng = np.random.default_rng(22)
    q, k, v = rng.normal(size=(2, 6, 4, 3)), rng.normal(size=(2, 2, 7, 3)), rng.normal(size=(2, 2, 7, 2))
    d_output = rng.normal(size=(2, 6, 4, 2))
    k_rep, v_rep = ref.repeat_kv_heads(k, 6), ref.repeat_kv_heads(v, 6)
    keep = ref.causal_mask(4, 7)
    _, d_k_rep, d_v_rep = ref.attention_gradients(q, k_rep, v_rep, d_output, keep)
    for name, repeated, expected in (("d_key", d_k_rep, ref.repeat_kv_heads_gradient(d_k_rep, 2)),
                                     ("d_value", d_v_rep, ref.repeat_kv_heads_gradient(d_v_rep, 2))):
        np.testing.assert_allclose(repeat_kv_heads_backward(repeated, 2).data, expected, rtol=1e-5, atol=1e-6,
                                   err_msg=f"6 query heads on 2 kv heads, causal: {name}")


# ---------------------------------------------------------------- boundary (provided, not graded)
def test_gradients_of_broadcast_inputs_are_summed_to_their_shapes(ref):
    """One (S, d) key for every head: its gradient is the sum over the heads, in the key's shape."""
    rng = np.random.default_rng(23)
    q, k, v = rng.normal(size=(4, 3, 2)), rng.normal(size=(5, 2)), rng.normal(size=(1, 5, 2))
    d_output = rng.normal(size=(4, 3, 2))
    d_query, d_key, d_value = gradients_of(ref, q, k, v, d_output, None, None)
    assert (d_query.shape, d_key.shape, d_value.shape) == ((4, 3, 2), (5, 2), (1, 5, 2))


@pytest.mark.parametrize("change, error, message", [
    (dict(d_output=np.zeros((3, 3))), ValueError, r"d_output must have shape \(3, 2\), the forward's, got \(3, 3\)"),
    (dict(weights=np.zeros((3, 4))), ValueError, r"weights must have shape \(3, 5\), the forward's, got \(3, 4\)"),
    (dict(weights=np.full((3, 5), np.nan)), ValueError, "weights holds NaN or inf"),
    (dict(key=np.zeros((5, 3))), ValueError, "key has d_k=3 but query has d_k=4"),
])
def test_bad_inputs_raise(change, error, message):
    arguments = dict(d_output=np.zeros((3, 2)), query=np.zeros((3, 4)), key=np.zeros((5, 4)), value=np.zeros((5, 2)),
                     weights=np.full((3, 5), 0.2))
    arguments.update(change)
    with pytest.raises(error, match=message):
        attention_backward(**arguments)


def test_repeat_kv_heads_backward_checks_its_inputs():
    with pytest.raises(ValueError, match="the 6 query heads of d_x are not a multiple of num_kv_heads=4"):
        repeat_kv_heads_backward(np.zeros((1, 6, 2, 2)), 4)
    with pytest.raises(ValueError, match=r"d_x must have shape \(batch, heads, seq, head_dim\)"):
        repeat_kv_heads_backward(np.zeros((6, 2, 2)), 2)

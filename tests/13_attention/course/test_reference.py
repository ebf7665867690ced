"""The float64 reference itself, against numbers worked out by hand: the grading tests trust it."""
import math

import numpy as np


def test_softmax_row_by_hand(ref):
    """scores (ln 1, ln 3, masked, -inf): weights (1/4, 3/4, 0, 0)."""
    weights = ref.softmax_row([0.0, math.log(3.0), 5.0, -math.inf], keep=[1, 1, 0, 1])
    np.testing.assert_allclose(weights, [0.25, 0.75, 0.0, 0.0], rtol=1e-12)


def test_softmax_of_large_logits_and_fully_masked_rows(ref):
    np.testing.assert_allclose(ref.softmax_row([1e5, 1e5 + math.log(3.0)]), [0.25, 0.75], rtol=1e-9)
    np.testing.assert_array_equal(ref.masked_softmax([[1.0, 2.0], [3.0, 4.0]], keep=[[0, 0], [1, 0]]),
                                  [[0.0, 0.0], [1.0, 0.0]])


def test_attention_by_hand(ref):
    """d_k = 4, so the scale is 1/2: scores (ln 3, 0), weights (3/4, 1/4), output 3/4 v0 + 1/4 v1."""
    query = [[2 * math.log(3.0), 0.0, 0.0, 0.0]]
    key = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    value = [[4.0, 0.0], [0.0, 8.0]]
    output, weights = ref.attention(query, key, value)
    np.testing.assert_allclose(weights, [[0.75, 0.25]], rtol=1e-12)
    np.testing.assert_allclose(output, [[3.0, 2.0]], rtol=1e-12)
    output, weights = ref.attention(query, key, value, scale=1 / (2 * math.log(3.0)))   # scores (1, 0)
    np.testing.assert_allclose(weights, [[math.e / (math.e + 1), 1 / (math.e + 1)]], rtol=1e-12)
    output, _ = ref.attention(query, key, value, keep=[[0, 1]])
    np.testing.assert_allclose(output, [[0.0, 8.0]])


def test_masks_by_hand(ref):
    np.testing.assert_array_equal(ref.causal_mask(3), [[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(ref.causal_mask(2, 4), [[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(ref.padding_mask([2, 0, 3], 3)[:, 0, 0], [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(ref.cached_visible([3, 2], 2, 3)[:, 0],
                                  [[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [1, 1, 0]]])


def test_heads_by_hand(ref):
    x = np.arange(12.0).reshape(1, 2, 6)                  # tokens [0..5], [6..11]; 3 heads of width 2
    heads = ref.split_heads(x, 3)
    np.testing.assert_array_equal(heads[0, 1], [[2, 3], [8, 9]])
    np.testing.assert_array_equal(ref.merge_heads(heads), x)
    kv = np.array([10.0, 20.0]).reshape(1, 2, 1, 1)       # kv heads a, b -> a, a, b, b
    np.testing.assert_array_equal(ref.repeat_kv_heads(kv, 4).ravel(), [10, 10, 20, 20])


def test_multihead_with_identity_projections_is_attention_on_column_slices(ref):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 4))
    eye = np.eye(4)
    output, weights = ref.multihead([eye, eye, eye, eye], 2, 2, x)
    for h in range(2):
        cols = slice(2 * h, 2 * h + 2)
        scores = x[0, :, cols] @ x[0, :, cols].T / math.sqrt(2)
        expected = np.exp(scores - scores.max(axis=1, keepdims=True))
        expected /= expected.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(weights[0, h], expected, rtol=1e-12)
        np.testing.assert_allclose(output[0, :, cols], expected @ x[0, :, cols], rtol=1e-12)


def test_init_weights_follow_the_documented_draws(ref):
    w_q, w_k, w_v, w_o = ref.init_weights(3, 8, 4, 2)
    rng = np.random.default_rng(3)
    first = rng.standard_normal((8, 8), dtype=np.float32)
    assert w_k.shape == w_v.shape == (8, 4) and w_o.shape == (8, 8) and w_q.dtype == np.float32
    np.testing.assert_array_equal(w_q, first * np.float32(1 / math.sqrt(8)))


def test_formula_version_equals_the_loop(ref):
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(1, 3, 6, 4)), rng.normal(size=(6, 2))
    keep = rng.random((2, 1, 5, 6)) < 0.5
    keep[0, 0, 1] = False                                     # a fully masked row
    for expected, actual in zip(ref.attention(q, k, v, keep, 0.7), ref.attention_formula(q, k, v, keep, 0.7)):
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15)


def test_attention_gradients_by_hand(ref):
    """Part 3's example with dO = 1: weights p = (0.670, 0.330), ds = p (v - output) = (-2.212, 2.212)."""
    q, k, v = [[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [[10.0], [20.0]]
    p0 = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    ds = p0 * (1 - p0) * (10.0 - 20.0)                                  # p0 (10 - output), output = 10 p0 + 20 p1
    dq, dk, dv = ref.attention_gradients(q, k, v, [[1.0]])
    np.testing.assert_allclose(dv, [[p0], [1 - p0]], rtol=1e-12)
    np.testing.assert_allclose(dq, [[ds / math.sqrt(2), -ds / math.sqrt(2)]], rtol=1e-12)
    np.testing.assert_allclose(dk, [[ds / math.sqrt(2), 0.0], [-ds / math.sqrt(2), 0.0]], rtol=1e-12, atol=1e-15)
    assert abs(ds / math.sqrt(2) + 1.564) < 1e-3                         # the lesson's worked number


def test_attention_gradients_equal_finite_differences(ref):
    """Broadcast leading axes, an explicit scale and a mask with a fully masked row, against central differences."""
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 3, 4, 3)), rng.normal(size=(1, 3, 5, 3)), rng.normal(size=(5, 2))
    d_output = rng.normal(size=(2, 3, 4, 2))
    keep = rng.random((2, 1, 4, 5)) < 0.6
    keep[..., 2, :] = False
    analytic = ref.attention_gradients(q, k, v, d_output, keep, 0.7)
    numerical = ref.finite_difference_gradients(q, k, v, d_output, keep, 0.7)
    for got, want, shape in zip(analytic, numerical, (q.shape, k.shape, v.shape)):
        assert got.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(analytic[0][..., 2, :], 0.0)


def test_logsumexp_and_group_gradient_by_hand(ref):
    """Scores (1, 3): L = 3 + log(1 + e^-2); a fully masked row: -inf. Heads [1, 2, 3, 4] onto 2 kv heads: [3, 7]."""
    lse = ref.logsumexp([[1.0], [1.0]], [[1.0], [3.0]], keep=[[1, 1], [0, 0]], scale=1.0)
    np.testing.assert_allclose(lse[0], 3 + math.log(1 + math.exp(-2)), rtol=1e-12)
    assert lse[1] == -math.inf
    np.testing.assert_array_equal(ref.repeat_kv_heads_gradient(np.arange(1.0, 5.0).reshape(1, 4, 1, 1), 2)[0, :, 0, 0],
                                  [3.0, 7.0])


def test_serving_by_hand(ref):
    """Part 10's worked examples, step by step: both schemes, a preemption, an idle wait and a late arrival."""
    def run(requests, *args):
        return [value.tolist() for value in ref.serving(np.array(requests), *args)]

    assert run([[0, 3, 2], [0, 2, 2]], 12, 8) == [[4, 5, 3, 4], [8, 8, 8, 8], [1, 1, 1, 1], [1, 3], 0]
    assert run([[0, 3, 2], [0, 2, 2]], 12, 8, 2) == [[7, 9], [8, 10], [2, 2], [1, 1], 0]
    assert run([[0, 3, 2], [0, 2, 3], [1, 1, 2]], 8, 8, 2) == \
        [[7, 5, 6, 5, 3], [8, 6, 6, 6, 4], [2, 1, 2, 1, 1], [1, 3, 4], 2]
    assert run([[0, 3, 2], [4, 2, 3], [4, 1, 1]], 12, 8, 2) == \
        [[4, 5, 0, 0, 5, 4, 5], [4, 6, 0, 0, 6, 4, 6], [1, 1, 0, 0, 2, 1, 1], [1, 6, 4], 0]
    assert run(np.zeros((0, 3), dtype=int), 8, 8, 2) == [[], [], [], [], 0]

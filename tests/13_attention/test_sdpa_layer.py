"""Part 4, `ScaledDotProductAttention` on the math backend (so it runs the student's `math_attention`)."""
import numpy as np
import pytest

from tinytorch.core.attention import ScaledDotProductAttention, create_causal_mask
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-6  # float32 result against a float64 reference


def reference_attention(q, k, v, keep=None, scale=None):
    """softmax(q kᵀ · scale) v in float64, with masked entries removed before the softmax."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...td,...sd->...ts", q, k) * scale
    keep = np.ones(scores.shape, bool) if keep is None else np.broadcast_to(np.asarray(keep) != 0, scores.shape)
    scores = np.where(keep, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    exps = np.where(keep, np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    totals = exps.sum(axis=-1, keepdims=True)
    weights = exps / np.where(totals > 0, totals, 1.0)
    return weights @ v, weights


def random_qkv(seed, lead=(2, 3), T=5, S=7, d_k=4, d_v=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=lead + (T, d_k)), rng.normal(size=lead + (S, d_k)), rng.normal(size=lead + (S, d_v))


# ---------------------------------------------------------------- values
@pytest.mark.grades("test-sdpa-layer")
def test_defaults_match_reference_and_return_tensors():
    """A fresh layer (training mode, dropout 0) is exactly the formula; calling it is forward."""
    q, k, v = random_qkv(0)
    layer = ScaledDotProductAttention()
    assert layer.training is True
    output = layer(q, k, v)
    assert isinstance(output, Tensor) and output.shape == (2, 3, 5, 3) and output.dtype == np.float32
    expected_output, expected_weights = reference_attention(q, k, v)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    output, weights = layer.forward(q, k, v, return_attention_weights=True)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights.data.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.grades("test-sdpa-layer")
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_divides_the_scores(temperature):
    q, k, v = random_qkv(1)
    output, weights = ScaledDotProductAttention(temperature=temperature)(q, k, v, return_attention_weights=True)
    expected_output, expected_weights = reference_attention(q, k, v, scale=1 / (2.0 * temperature))  # sqrt(4) = 2
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-sdpa-layer")
@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (2, 3, 5, 7)])
def test_masks_match_reference(mask_shape):
    q, k, v = random_qkv(2)
    keep = np.random.default_rng(3).random(mask_shape) < 0.5
    keep[..., 0] = False
    keep[..., 1, :] = False                                  # one fully masked query row
    output, weights = ScaledDotProductAttention().eval()(q, k, v, mask=keep, return_attention_weights=True)
    expected_output, expected_weights = reference_attention(q, k, v, keep)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(output.data[..., 1, :], 0.0)


@pytest.mark.grades("test-sdpa-layer")
@pytest.mark.parametrize("T, S", [(6, 6), (3, 8)])
def test_causal_mask_ignores_the_future(T, S):
    """Query i (at position i + S - T) is unchanged when keys and values after that position change."""
    q, k, v = random_qkv(4, T=T, S=S)
    layer = ScaledDotProductAttention()
    mask = create_causal_mask(T, S)
    output = layer(q, k, v, mask=mask).data
    np.testing.assert_allclose(output, reference_attention(q, k, v, np.tril(np.ones((T, S)), S - T))[0],
                               rtol=RTOL, atol=ATOL)
    for i in range(T):
        last_seen = i + S - T
        k2, v2 = k.copy(), v.copy()
        k2[..., last_seen + 1:, :] = 100.0
        v2[..., last_seen + 1:, :] = -100.0
        np.testing.assert_allclose(layer(q, k2, v2, mask=mask).data[..., i, :], output[..., i, :],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.grades("test-sdpa-layer")
def test_dropout_is_inverted_seeded_and_only_in_training():
    """Training: each weight is 0 or weight / (1 - p), and the output uses those weights. Eval: no dropout."""
    p = 0.25
    q, k, v = random_qkv(5, lead=(4,), T=16, S=16)
    expected_output, expected_weights = reference_attention(q, k, v)

    layer = ScaledDotProductAttention(dropout=p, seed=7)
    output, weights = layer(q, k, v, return_attention_weights=True)
    dropped = weights.data == 0.0
    np.testing.assert_allclose(weights.data[~dropped], expected_weights[~dropped] / (1 - p), rtol=RTOL, atol=ATOL)
    assert abs(dropped.mean() - p) < 0.06                                  # 1024 draws: std 0.014
    np.testing.assert_allclose(output.data, weights.data.astype(np.float64) @ v, rtol=RTOL, atol=ATOL)

    again = ScaledDotProductAttention(dropout=p, seed=7)(q, k, v)
    np.testing.assert_array_equal(again.data, output.data)                 # the seed fixes the draw

    assert layer.eval() is layer and layer.training is False
    output, weights = layer(q, k, v, return_attention_weights=True)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    assert layer.train() is layer and layer.training is True


@pytest.mark.grades("test-sdpa-layer")
@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_float64_and_integer_inputs_give_float32(dtype):
    rng = np.random.default_rng(6)
    q, k, v = (rng.integers(-2, 3, size=shape).astype(dtype) for shape in ((2, 3, 4), (2, 5, 4), (2, 5, 2)))
    output, weights = ScaledDotProductAttention()(q, k, v, return_attention_weights=True)
    assert output.dtype == np.float32 and weights.dtype == np.float32
    np.testing.assert_allclose(output.data, reference_attention(q, k, v)[0], rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-sdpa-layer")
def test_single_token_and_empty_key_sequence():
    q, k, v = random_qkv(8, T=1, S=1)
    output = ScaledDotProductAttention()(q, k, v)
    np.testing.assert_allclose(output.data, v, rtol=1e-6)                   # one key: weight 1
    q, k, v = random_qkv(9, T=3, S=0)
    output, weights = ScaledDotProductAttention()(q, k, v, return_attention_weights=True)
    assert output.shape == (2, 3, 3, 3) and weights.shape == (2, 3, 3, 0)
    np.testing.assert_array_equal(output.data, 0.0)


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_layer_checks_its_inputs():
    layer = ScaledDotProductAttention()
    with pytest.raises(ValueError, match="key has d_k=7 but query has d_k=8"):
        layer(np.zeros((3, 8)), np.zeros((4, 7)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="value has seq_k=5 but key has seq_k=6"):
        layer(np.zeros((3, 8)), np.zeros((6, 8)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to scores \(2, 5, 6\)"):
        layer(np.zeros((2, 5, 8)), np.zeros((2, 6, 8)), np.zeros((2, 6, 2)), mask=np.ones((3, 4)))


@pytest.mark.parametrize("kwargs, message", [({"dropout": 1.0}, "dropout must be a probability in \\[0, 1\\), got 1.0"),
                                             ({"dropout": -0.1}, "dropout must be .* got -0.1"),
                                             ({"temperature": 0.0}, "temperature must be .* got 0.0"),
                                             ({"block_size": 0}, "block_size must be >= 1, got 0"),
                                             ({"block_size": 4, "dropout": 0.1}, "dropout=0.1 .* block_size=4")])
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaledDotProductAttention(**kwargs)


def test_block_size_cannot_return_weights():
    q, k, v = random_qkv(10)
    with pytest.raises(ValueError, match="return_attention_weights=True .* block_size=4"):
        ScaledDotProductAttention(block_size=4)(q, k, v, return_attention_weights=True)

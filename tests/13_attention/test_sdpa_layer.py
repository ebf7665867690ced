"""Part 4, `ScaledDotProductAttention`: dropout on the weights (graded), temperature and masks (provided).

The layer hands the student's dropout its generator, `np.random.default_rng(seed)`. The tests
check what dropout is, whatever the draw: see `check_dropout`.
"""
import numpy as np
import pytest

from tinytorch.core.attention import ScaledDotProductAttention, create_causal_mask, create_padding_mask
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-6  # float32 result against a float64 reference
GRADES = pytest.mark.grades("test-sdpa-layer")


def random_qkv(seed, lead=(2, 3), T=5, S=7, d_k=4, d_v=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=lead + (T, d_k)), rng.normal(size=lead + (S, d_k)), rng.normal(size=lead + (S, d_v))


# ---------------------------------------------------------------- dropout (the student's code)
# Dropout is graded by what it is, not by one random stream: any draw of one uniform number per
# weight from the layer's generator passes (`rng.random(shape)` kept where >= p,
# `rng.random(shape, dtype=np.float32)` kept where < 1 - p, ...). For every call, each weight is 0
# or its undropped value divided by 1 - p, masked weights stay 0, and the output is the dropped
# weights @ v. Over all calls of a case, the number of positive weights kept is Binomial(n, 1 - p):
# it must lie within 5 standard deviations, 5 * sqrt(n p (1 - p)), of n (1 - p), which a correct
# draw misses with probability below 1e-6. Two layers with the same seed drop the same weights.
SIGMAS = 5


def check_dropout(ref, case, q, k, v, mask, p, scale=None, calls=1, seed=7, temperature=1.0):
    """Run `calls` training-mode calls of two layers seeded alike; check every call and the pooled kept count."""
    layer = ScaledDotProductAttention(dropout=p, temperature=temperature, seed=seed)
    twin = ScaledDotProductAttention(dropout=p, temperature=temperature, seed=seed)
    _, undropped = ref.attention(q, k, v, mask, scale)
    positive = undropped > 0
    kept = trials = 0
    for call in range(calls):
        output, weights = layer(q, k, v, mask=mask, return_attention_weights=True)
        weights = weights.data
        where = f"{case}, call {call + 1}"
        survived = weights != 0.0
        np.testing.assert_array_equal(survived & ~positive, False,
                                      err_msg=f"{where}: a weight the mask hides (0 before dropout) must stay 0")
        np.testing.assert_allclose(weights[survived], undropped[survived] / (1 - p), rtol=RTOL, atol=ATOL,
                                   err_msg=f"{where}: each surviving weight must be its undropped value / (1 - p)")
        np.testing.assert_allclose(output.data, weights.astype(np.float64) @ v, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{where}: the output must be the dropped weights @ v")
        _, twin_weights = twin(q, k, v, mask=mask, return_attention_weights=True)
        np.testing.assert_array_equal(twin_weights.data != 0.0, survived,
                                      err_msg=f"{where}: a second layer with seed={seed} must drop the same weights "
                                              f"(draw from the layer's generator `rng`)")
        kept += int(survived.sum())
        trials += int(positive.sum())
    expected, bound = trials * (1 - p), SIGMAS * np.sqrt(trials * p * (1 - p)) + 1
    assert abs(kept - expected) <= bound, (
        f"{case}: kept {kept} of {trials} weights over {calls} calls ({kept / max(trials, 1):.3f}); each weight "
        f"survives with probability 1 - p = {1 - p}, so expected {expected:.0f} +- {bound:.0f}")


@GRADES
@pytest.mark.parametrize("p, masked, temperature", [(0.1, True, 0.5), (0.25, False, 2.0), (0.5, True, 0.8)])
def test_dropout_zeroes_or_rescales_each_weight(ref, p, masked, temperature):
    q, k, v = random_qkv(5, lead=(2,), T=6, S=8)
    keep = np.tril(np.ones((6, 8)), 2) if masked else None
    case = f"dropout p={p}, temperature {temperature}, {'causal-offset mask' if masked else 'no mask'}"
    check_dropout(ref, case, q, k, v, keep, p, scale=1 / (2.0 * temperature), calls=40,   # d_k = 4
                  temperature=temperature)


@GRADES
@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_the_kept_fraction_is_one_minus_p(ref, p):
    """One call on 4 x 4 x 24 x 24 = 9216 weights: about (1 - p) of them survive."""
    q, k, v = random_qkv(6, lead=(4, 4), T=24, S=24)
    check_dropout(ref, f"dropout p={p}, 9216 weights", q, k, v, None, p, seed=3)


@GRADES
def test_the_same_seed_repeats_the_draws_and_each_call_draws_anew():
    q, k, v = random_qkv(9, lead=(4,), T=16, S=16)
    first, second = (ScaledDotProductAttention(dropout=0.3, seed=7) for _ in range(2))
    calls = [[layer(q, k, v, return_attention_weights=True)[1].data for _ in range(2)] for layer in (first, second)]
    for number in range(2):
        np.testing.assert_array_equal(calls[0][number] == 0, calls[1][number] == 0,
                                      err_msg=f"seed 7, call {number + 1}: two layers with the same seed must drop "
                                              f"the same weights")
    assert ((calls[0][0] == 0) != (calls[0][1] == 0)).any(), \
        "two calls of one layer dropped exactly the same 1024 weights: each call must draw new numbers from `rng`"
    other = ScaledDotProductAttention(dropout=0.3, seed=8)(q, k, v, return_attention_weights=True)[1].data
    assert ((other == 0) != (calls[0][0] == 0)).any(), "seeds 7 and 8 dropped exactly the same 1024 weights"


@GRADES
def test_dropout_keeps_the_expected_output(ref):
    """Inverted dropout is unbiased: the mean over many calls approaches the output without dropout."""
    q, k, v = random_qkv(8, lead=(), T=4, S=6)
    layer = ScaledDotProductAttention(dropout=0.3, seed=11)
    mean = np.mean([layer(q, k, v).data for _ in range(2000)], axis=0)
    expected, _ = ref.attention(q, k, v)
    np.testing.assert_allclose(mean, expected, atol=0.05, err_msg="mean of 2000 dropout outputs, p=0.3")


# ---------------------------------------------------------------- the provided layer (not graded)
def test_eval_mode_turns_dropout_off_and_the_seed_fixes_the_draw(ref):
    q, k, v = random_qkv(5, lead=(4,), T=16, S=16)
    expected_output, expected_weights = ref.attention(q, k, v)
    layer = ScaledDotProductAttention(dropout=0.25, seed=7)
    first = layer(q, k, v).data
    np.testing.assert_array_equal(ScaledDotProductAttention(dropout=0.25, seed=7)(q, k, v).data, first)
    assert layer.eval() is layer and layer.training is False
    output, weights = layer(q, k, v, return_attention_weights=True)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    assert layer.train() is layer and layer.training is True


def test_defaults_match_reference_and_return_tensors(ref):
    """A fresh layer (training mode, dropout 0) is exactly the formula; calling it is forward."""
    q, k, v = random_qkv(0)
    layer = ScaledDotProductAttention()
    assert layer.training is True
    output = layer(q, k, v)
    assert isinstance(output, Tensor) and output.shape == (2, 3, 5, 3) and output.dtype == np.float32
    expected_output, expected_weights = ref.attention(q, k, v)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    output, weights = layer.forward(q, k, v, return_attention_weights=True)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_temperature_divides_the_scores(ref, temperature):
    q, k, v = random_qkv(1)
    output, weights = ScaledDotProductAttention(temperature=temperature)(q, k, v, return_attention_weights=True)
    expected_output, expected_weights = ref.attention(q, k, v, scale=1 / (2.0 * temperature))  # sqrt(4) = 2
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (2, 3, 5, 7)])
def test_masks_match_reference(ref, mask_shape):
    q, k, v = random_qkv(2)
    keep = np.random.default_rng(3).random(mask_shape) < 0.5
    keep[..., 1, :] = False                                  # one fully masked query row
    output, weights = ScaledDotProductAttention().eval()(q, k, v, mask=keep, return_attention_weights=True)
    expected_output, expected_weights = ref.attention(q, k, v, keep)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_float64_and_integer_inputs_give_float32(ref, dtype):
    rng = np.random.default_rng(6)
    q, k, v = (rng.integers(-2, 3, size=shape).astype(dtype) for shape in ((2, 3, 4), (2, 5, 4), (2, 5, 2)))
    output, weights = ScaledDotProductAttention()(q, k, v, return_attention_weights=True)
    assert output.dtype == np.float32 and weights.dtype == np.float32
    np.testing.assert_allclose(output.data, ref.attention(q, k, v)[0], rtol=RTOL, atol=ATOL)


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


# ---------------------------------------------------------------- dropout with the layer's scale and masks (graded)
@GRADES
def test_dropout_at_a_temperature_and_with_a_mask_by_hand():
    """Part 4's worked example at temperature 1/sqrt(2), so the scale is 1: weights e/(e+1) = 0.731 and 0.269.

    With p = 0.5 each survivor doubles: the outcomes are (1.462, 0.538), (1.462, 0), (0, 0.538) and
    (0, 0). With key 0 masked, the weights are (0, 1) and the outcomes (0, 2) and (0, 0).
    """
    q, k, v = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0], [20.0]])
    high, low = 2 * np.e / (np.e + 1), 2 / (np.e + 1)
    for mask, expected in ((None, {(high, low), (high, 0.0), (0.0, low), (0.0, 0.0)}),
                           (np.array([[0, 1]]), {(0.0, 2.0), (0.0, 0.0)})):
        layer = ScaledDotProductAttention(dropout=0.5, temperature=1 / np.sqrt(2), seed=3)
        outcomes = set()
        for _ in range(60):
            output, weights = layer(q, k, v, mask=mask, return_attention_weights=True)
            np.testing.assert_allclose(output.data, weights.data @ v, rtol=1e-5, err_msg="output = dropped weights @ v")
            outcomes.add(tuple(round(float(w), 3) for w in weights.data[0]))
        assert outcomes == {tuple(round(w, 3) for w in pair) for pair in expected}, (
            f"temperature 1/sqrt(2), p=0.5, mask {mask}: outcomes {sorted(outcomes)}")


DROPOUT_CASES = [  # (p, temperature, seed, lead, T, S, mask)
    (0.2, 0.5, 1, (2, 3), 5, 7, "causal"),
    (0.5, 2.0, 2, (2,), 4, 6, "random"),
    (0.3, 0.25, 3, (2, 2), 6, 6, "padding"),
    (0.1, 3.0, 4, (), 5, 8, "random"),
    (0.6, 0.7, 5, (3,), 7, 5, "causal"),
    (0.4, 1.5, 6, (2, 1), 4, 9, "padding"),
    (0.25, 0.4, 7, (1, 2), 6, 4, "random"),
]


def dropout_mask(kind, rng, lead, T, S):
    """A mask with at least one fully masked query row, or a padding mask hiding the last keys of one row."""
    if kind == "causal":
        return create_causal_mask(T, S)                            # with T > S the first rows see nothing
    if kind == "padding":
        return create_padding_mask(np.array([S - 2, S][:lead[0]]), S)
    keep = rng.random(lead + (T, S)) < 0.6
    keep[..., 0, :] = False
    return keep


@GRADES
@pytest.mark.parametrize("p, temperature, seed, lead, T, S, kind", DROPOUT_CASES)
def test_dropout_uses_the_layers_scale_mask_and_generator(ref, p, temperature, seed, lead, T, S, kind):
    """Thirty calls in training mode: each drops weights of the layer's temperature and mask, rescales the rest,
    and draws from the layer's seeded generator."""
    rng = np.random.default_rng(seed + 100)
    q, k, v = rng.normal(size=lead + (T, 4)), rng.normal(size=lead + (S, 4)), rng.normal(size=lead + (S, 3))
    mask = dropout_mask(kind, rng, lead, T, S)
    case = f"p={p}, temperature={temperature}, {kind} mask, lead {lead}, T={T}, S={S}"
    check_dropout(ref, case, q, k, v, mask, p, scale=1.0 / (2.0 * temperature), calls=30, seed=seed,   # d_k = 4
                  temperature=temperature)

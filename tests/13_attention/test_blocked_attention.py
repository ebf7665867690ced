"""Part 8, `blocked_attention`: the online softmax must give the formula's output for every block size and mask."""
import tracemalloc
import warnings

import numpy as np
import pytest

from tinytorch.core.attention import (MultiHeadAttention, ScaledDotProductAttention, blocked_attention,
                                      create_causal_mask)
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-5  # float32 result against a float64 reference


def reference_attention(q, k, v, mask=None, scale=None):
    """Output of attention, one query at a time in float64, over the allowed keys only."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S, d_v = q.shape[-2], k.shape[-2], v.shape[-1]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    mask = np.ones((T, S)) if mask is None else (mask.data if isinstance(mask, Tensor) else mask)
    keep = np.broadcast_to(np.asarray(mask) != 0, lead + (T, S))
    q, k, v = (np.broadcast_to(a, lead + a.shape[-2:]) for a in (q, k, v))
    output = np.zeros(lead + (T, d_v))
    for index in np.ndindex(*lead):
        for i in range(T):
            allowed = np.flatnonzero(keep[index][i])
            if allowed.size:
                logits = scale * (k[index][allowed] @ q[index][i])
                weights = np.exp(logits - logits.max())
                output[index][i] = (weights / weights.sum()) @ v[index][allowed]
    return output


def random_qkv(seed, lead=(2, 3), T=7, S=9, d_k=4, d_v=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=lead + (T, d_k)), rng.normal(size=lead + (S, d_k)), rng.normal(size=lead + (S, d_v))


# ---------------------------------------------------------------- values
@pytest.mark.grades("test-blocked-attention")
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 9, 128])
def test_no_mask_any_block_size(block_size):
    """Blocks that divide S, blocks that do not, one block, and blocks larger than the sequence."""
    q, k, v = random_qkv(block_size)
    output = blocked_attention(q, k, v, block_size=block_size)
    assert isinstance(output, Tensor) and output.shape == (2, 3, 7, 3) and output.dtype == np.float32
    np.testing.assert_allclose(output.data, reference_attention(q, k, v), rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-blocked-attention")
def test_hand_computed_case_fixes_the_scale():
    """d_k = 4: scores (ln 3, 0) over two blocks of one key each, weights (3/4, 1/4)."""
    query = np.array([[2 * np.log(3.0), 0.0, 0.0, 0.0]])
    key = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    value = np.array([[4.0, 0.0], [0.0, 8.0]])
    np.testing.assert_allclose(blocked_attention(query, key, value, block_size=1).data, [[3.0, 2.0]], rtol=1e-6)


@pytest.mark.grades("test-blocked-attention")
@pytest.mark.parametrize("T, S", [(8, 8), (7, 7), (3, 10), (10, 4)])
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_causal_masks(T, S, block_size):
    """Square and offset causal masks; with T > S the first queries see nothing and give zeros."""
    q, k, v = random_qkv(T * 10 + S, T=T, S=S)
    mask = create_causal_mask(T, S)
    output = blocked_attention(q, k, v, mask=mask, block_size=block_size).data
    np.testing.assert_allclose(output, reference_attention(q, k, v, np.tril(np.ones((T, S)), S - T)),
                               rtol=RTOL, atol=ATOL)
    if T > S:
        np.testing.assert_array_equal(output[..., :T - S, :], 0.0)


@pytest.mark.grades("test-blocked-attention")
@pytest.mark.parametrize("mask_shape", [(7, 9), (2, 1, 7, 9), (2, 3, 7, 9), (1, 9)])
@pytest.mark.parametrize("block_size", [2, 4])
def test_random_masks_with_fully_masked_rows(mask_shape, block_size):
    """Any mask, including rows masked only in some blocks and rows masked in all of them (zero output)."""
    q, k, v = random_qkv(3)
    keep = np.random.default_rng(4).random(mask_shape) < 0.4
    if len(mask_shape) > 2:
        keep[..., 2, :] = False                                  # a fully masked row
        keep[..., 3, :4] = False                                 # masked in the first blocks only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = blocked_attention(q, k, v, mask=keep.astype(np.float32), block_size=block_size).data
    np.testing.assert_allclose(output, reference_attention(q, k, v, keep), rtol=RTOL, atol=ATOL)
    if len(mask_shape) > 2:
        np.testing.assert_array_equal(output[..., 2, :], 0.0)


@pytest.mark.grades("test-blocked-attention")
def test_explicit_scale_and_broadcast_leading_axes():
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(1, 3, 6, 4)), rng.normal(size=(6, 2))
    output = blocked_attention(q, k, v, scale=0.7, block_size=4).data
    np.testing.assert_allclose(output, reference_attention(q, k, v, scale=0.7), rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-blocked-attention")
def test_running_maximum_rises_across_blocks():
    """The largest score sits in the last block and scores span about 1e5: the rescaling must be exact."""
    d_k = 4
    q = np.array([[1e5 * np.sqrt(d_k), 0, 0, 0], [-1e5 * np.sqrt(d_k), 0, 0, 0]])
    k = np.zeros((6, 4))
    k[:, 0] = [-1.0, 0.5, 0.99999, 0.0, 1.0 - 1e-5, 1.0]      # scores up to 1e5, the maximum last
    v = np.random.default_rng(6).normal(size=(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = blocked_attention(q, k, v, block_size=2).data
    assert np.all(np.isfinite(output))
    np.testing.assert_allclose(output, reference_attention(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.grades("test-blocked-attention")
@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_float64_and_integer_inputs_give_float32(dtype):
    rng = np.random.default_rng(7)
    q, k, v = (rng.integers(-2, 3, size=shape).astype(dtype) for shape in ((5, 4), (6, 4), (6, 2)))
    output = blocked_attention(q, k, v, block_size=4)
    assert output.dtype == np.float32
    np.testing.assert_allclose(output.data, reference_attention(q, k, v), rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-blocked-attention")
def test_single_token_empty_batch_and_empty_keys():
    q, k, v = random_qkv(8, T=1, S=1)
    np.testing.assert_allclose(blocked_attention(q, k, v, block_size=2).data, v, rtol=1e-6)
    q, k, v = random_qkv(9, T=1, S=5)
    np.testing.assert_allclose(blocked_attention(q, k, v, block_size=2).data, reference_attention(q, k, v),
                               rtol=RTOL, atol=ATOL)
    assert blocked_attention(*random_qkv(10, lead=(0,)), block_size=2).shape == (0, 7, 3)
    output = blocked_attention(*random_qkv(11, T=4, S=0), block_size=2)
    assert output.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(output.data, 0.0)


@pytest.mark.grades("test-blocked-attention")
def test_future_blocks_of_a_causal_mask_are_skipped():
    """NaN values in keys 6-7 cannot reach queries 0-5 when the blocks holding them are never visited."""
    q, k, v = random_qkv(12, lead=(2,), T=8, S=8)
    poisoned = v.copy()
    poisoned[:, 6:] = np.nan
    output = blocked_attention(q, k, poisoned, mask=create_causal_mask(8), block_size=2).data
    expected = reference_attention(q, k, v, np.tril(np.ones((8, 8))))
    np.testing.assert_allclose(output[:, :6], expected[:, :6], rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-blocked-attention")
def test_never_forms_the_full_score_matrix():
    """T = S = 1024: a (T, S) float32 array is 4 MiB; with 64-wide blocks the peak stays far below 1 MiB."""
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1024, 16), dtype=np.float32) for _ in range(3))
    expected = reference_attention(q[:64], k, v)                 # first 64 queries, checked in float64
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        output = blocked_attention(q, k, v, block_size=64)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        if not was_tracing:
            tracemalloc.stop()
    np.testing.assert_allclose(output.data[:64], expected, rtol=RTOL, atol=ATOL)
    assert peak < 1024 * 1024 * 4 / 4, f"peak {peak} bytes"


@pytest.mark.grades("test-blocked-attention")
def test_layers_with_block_size():
    """ScaledDotProductAttention and MultiHeadAttention with block_size run the blocked kernel correctly."""
    q, k, v = random_qkv(14)
    layer = ScaledDotProductAttention(block_size=3)
    mask = create_causal_mask(7, 9)
    np.testing.assert_allclose(layer(q, k, v, mask=mask).data,
                               reference_attention(q, k, v, np.tril(np.ones((7, 9)), 2)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ScaledDotProductAttention(temperature=2.0, block_size=4)(q, k, v).data,
                               reference_attention(q, k, v, scale=0.25), rtol=RTOL, atol=ATOL)   # 1/(sqrt(4)*2)

    x = np.random.default_rng(15).normal(size=(2, 6, 16))
    blocked = MultiHeadAttention(16, 4, num_kv_heads=2, seed=1, block_size=4)
    w_q, w_k, w_v, w_o = (w.data.astype(np.float64) for w in blocked.parameters)
    q_h, k_h, v_h = ((x @ w).reshape(2, 6, n, 4).transpose(0, 2, 1, 3)        # (B, n, T, hd)
                     for w, n in ((w_q, 4), (w_k, 2), (w_v, 2)))
    k_h, v_h = k_h[:, [0, 0, 1, 1]], v_h[:, [0, 0, 1, 1]]                      # query head h reads kv head h // 2
    context = reference_attention(q_h, k_h, v_h, np.tril(np.ones((6, 6))))
    expected = context.transpose(0, 2, 1, 3).reshape(2, 6, 16) @ w_o
    np.testing.assert_allclose(blocked(x, mask=create_causal_mask(6)).data, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- errors (provided validation, not graded)
@pytest.mark.parametrize("block_size, error, message", [(0, ValueError, "block_size must be >= 1, got 0"),
                                                        (-4, ValueError, "block_size must be >= 1, got -4"),
                                                        (2.0, TypeError, "block_size must be an integer")])
def test_bad_block_size_raises(block_size, error, message):
    with pytest.raises(error, match=message):
        blocked_attention(*random_qkv(0), block_size=block_size)


def test_inputs_are_checked_like_math_attention():
    with pytest.raises(ValueError, match="key has d_k=7 but query has d_k=8"):
        blocked_attention(np.zeros((3, 8)), np.zeros((4, 7)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="value has seq_k=5 but key has seq_k=6"):
        blocked_attention(np.zeros((3, 8)), np.zeros((6, 8)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to scores \(2, 5, 6\)"):
        blocked_attention(np.zeros((2, 5, 8)), np.zeros((2, 6, 8)), np.zeros((2, 6, 2)), mask=np.ones((3, 4)))


def test_layer_with_block_size_cannot_return_weights():
    x = np.zeros((1, 3, 8))
    with pytest.raises(ValueError, match="return_attention_weights=True needs the full weight matrix, which "
                                         "block_size=2 never forms"):
        MultiHeadAttention(8, 2, block_size=2)(x, return_attention_weights=True)

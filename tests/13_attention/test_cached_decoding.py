"""Part 6, cached decoding: `MultiHeadAttention(..., kv_cache=cache)` equals one causal forward."""
import re

import numpy as np
import pytest

from tinytorch.core.attention import KVCache, MultiHeadAttention, create_causal_mask

RTOL, ATOL = 1e-5, 1e-5  # float32 layer against a float64 reference


def reference_causal_mha(layer, x):
    """Causal self-attention over one whole sequence x (T, E), in float64, head by head."""
    x = np.asarray(x, dtype=np.float64)
    w_q, w_k, w_v, w_o = (w.data.astype(np.float64) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
    H, hd = layer.num_heads, layer.head_dim
    group = H // layer.num_kv_heads
    q_all, k_all, v_all = x @ w_q, x @ w_k, x @ w_v
    T = x.shape[0]
    context = np.zeros((T, H * hd))
    for h in range(H):
        g = h // group
        q, k, v = q_all[:, h * hd:(h + 1) * hd], k_all[:, g * hd:(g + 1) * hd], v_all[:, g * hd:(g + 1) * hd]
        for i in range(T):
            scores = q[i] @ k[:i + 1].T / np.sqrt(hd)                  # positions 0..i only
            weights = np.exp(scores - scores.max())
            context[i, h * hd:(h + 1) * hd] = (weights / weights.sum()) @ v[:i + 1]
    return context @ w_o


def reference_cached_keys(layer, x):
    """What a cache row should hold for the sequence x (T, E): (Hkv, T, hd) keys and values."""
    Hkv, hd = layer.num_kv_heads, layer.head_dim
    keys = (np.asarray(x, dtype=np.float64) @ layer.w_k.data).reshape(len(x), Hkv, hd).transpose(1, 0, 2)
    values = (np.asarray(x, dtype=np.float64) @ layer.w_v.data).reshape(len(x), Hkv, hd).transpose(1, 0, 2)
    return keys, values


def decode(layer, x, chunks, cache):
    """Feed x (B, T, E) through the cache in consecutive chunks; return the concatenated outputs."""
    outputs, start = [], 0
    for length in chunks:
        outputs.append(layer(x[:, start:start + length], kv_cache=cache).data)
        start += length
    return np.concatenate(outputs, axis=1)


# ---------------------------------------------------------------- values
@pytest.mark.grades("test-cached-decoding")
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_prefill_then_decode_equals_causal_forward(num_kv_heads):
    """A 5-token prompt and four 1-token steps equal the reference and the layer's own causal forward."""
    rng = np.random.default_rng(num_kv_heads)
    layer = MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, seed=1)
    x = rng.normal(size=(2, 9, 16)).astype(np.float32)
    cache = KVCache(max_batch_size=2, max_seq_length=9, num_heads=num_kv_heads, head_dim=4)
    steps = decode(layer, x, [5, 1, 1, 1, 1], cache)
    assert steps.shape == (2, 9, 16) and steps.dtype == np.float32
    for b in range(2):
        np.testing.assert_allclose(steps[b], reference_causal_mha(layer, x[b]), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(steps, layer(x, mask=create_causal_mask(9)).data, rtol=RTOL, atol=ATOL)
    assert cache.cache_lengths.tolist() == [9, 9]


@pytest.mark.grades("test-cached-decoding")
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 2, 2], [2, 4, 1], [7]])
def test_any_chunking_gives_the_same_outputs(chunks):
    """Query i of a chunk sees the cached positions and this chunk's positions up to i, never later ones."""
    rng = np.random.default_rng(10)
    layer = MultiHeadAttention(12, 3, seed=2)
    x = rng.normal(size=(1, 7, 12))
    cache = KVCache(max_batch_size=1, max_seq_length=8, num_heads=3, head_dim=4)
    np.testing.assert_allclose(decode(layer, x, chunks, cache)[0], reference_causal_mha(layer, x[0]),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-cached-decoding")
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_cache_rows_hold_the_projected_keys_and_values(num_kv_heads):
    rng = np.random.default_rng(11)
    layer = MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, seed=3)
    x = rng.normal(size=(2, 6, 16))
    cache = KVCache(max_batch_size=3, max_seq_length=10, num_heads=num_kv_heads, head_dim=4)
    decode(layer, x, [4, 2], cache)
    assert cache.cache_lengths.tolist() == [6, 6, 0]
    for b in range(2):
        keys, values = reference_cached_keys(layer, x[b])
        np.testing.assert_allclose(cache.get_sequence(b)[0].data, keys, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(cache.get_sequence(b)[1].data, values, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(cache.cached_keys[2], 0.0)


@pytest.mark.grades("test-cached-decoding")
def test_rows_of_different_lengths():
    """Row 0 already holds 3 tokens, row 1 none: each row attends causally over its own history only."""
    rng = np.random.default_rng(12)
    layer = MultiHeadAttention(8, 2, num_kv_heads=1, seed=4)
    first, second = rng.normal(size=(6, 8)), rng.normal(size=(3, 8))
    cache = KVCache(max_batch_size=2, max_seq_length=8, num_heads=1, head_dim=4)
    prefix = layer(first[None, :3], kv_cache=cache).data                      # batch of one: row 0 only
    assert cache.cache_lengths.tolist() == [3, 0]
    both = layer(np.stack([first[3:5], second[:2]]), kv_cache=cache).data     # rows at lengths 3 and 0
    last = layer(np.stack([first[5:6], second[2:3]]), kv_cache=cache).data
    assert cache.cache_lengths.tolist() == [6, 3]
    expected_first, expected_second = reference_causal_mha(layer, first), reference_causal_mha(layer, second)
    np.testing.assert_allclose(prefix[0], expected_first[:3], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(both[0], expected_first[3:5], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(both[1], expected_second[:2], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(last[0], expected_first[5:6], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(last[1], expected_second[2:3], rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-cached-decoding")
def test_reset_row_starts_a_new_sequence():
    rng = np.random.default_rng(13)
    layer = MultiHeadAttention(8, 2, seed=5)
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=4)
    decode(layer, rng.normal(size=(1, 4, 8)), [4], cache)
    cache.reset(0)
    x = rng.normal(size=(1, 3, 8))
    np.testing.assert_allclose(decode(layer, x, [2, 1], cache)[0], reference_causal_mha(layer, x[0]),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.grades("test-cached-decoding")
def test_overflow_through_the_layer_leaves_the_cache_unchanged():
    rng = np.random.default_rng(14)
    layer = MultiHeadAttention(8, 2, seed=6)
    x = rng.normal(size=(1, 7, 8))
    cache = KVCache(max_batch_size=1, max_seq_length=6, num_heads=2, head_dim=4)
    np.testing.assert_allclose(decode(layer, x, [5], cache)[0], reference_causal_mha(layer, x[0, :5]),
                               rtol=RTOL, atol=ATOL)
    before = cache.cached_keys.copy(), cache.cached_values.copy(), cache.cache_lengths.copy()
    message = "kv_cache row 0 holds 5 of max_seq_length=6 positions; appending 2 would need 7"
    with pytest.raises(ValueError, match=message):
        layer(x[:, 5:7], kv_cache=cache)
    for kept, now in zip(before, (cache.cached_keys, cache.cached_values, cache.cache_lengths)):
        np.testing.assert_array_equal(now, kept)
    np.testing.assert_allclose(layer(x[:, 5:6], kv_cache=cache).data[0, 0], reference_causal_mha(layer, x[0, :6])[5],
                               rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_cache_with_wrong_heads_for_the_layer_raises():
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, seed=0)
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=4, head_dim=4)
    with pytest.raises(ValueError, match=re.escape("kv_cache has num_heads=4, head_dim=4 but this attention needs "
                                                   "num_heads=2, head_dim=4")):
        layer(np.zeros((1, 2, 16)), kv_cache=cache)
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="kv_cache has num_heads=2, head_dim=8"):
        layer(np.zeros((1, 2, 16)), kv_cache=cache)
    assert cache.cache_lengths.tolist() == [0]


def test_cache_rejects_other_objects_and_too_many_rows():
    layer = MultiHeadAttention(8, 2, seed=0)
    with pytest.raises(TypeError, match="kv_cache must be a KVCache, got dict"):
        layer(np.zeros((1, 2, 8)), kv_cache={})
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="batch of 2 rows does not fit kv_cache.max_batch_size=1"):
        layer(np.zeros((2, 2, 8)), kv_cache=cache)
    with pytest.raises(ValueError, match="query has 2, key has 3"):
        layer(np.zeros((1, 2, 8)), np.zeros((1, 3, 8)), np.zeros((1, 3, 8)), kv_cache=cache)
    assert cache.cache_lengths.tolist() == [0]

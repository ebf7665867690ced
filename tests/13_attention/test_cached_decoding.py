"""Part 6b, cached decoding: `KVCache.append` and `MultiHeadAttention(..., kv_cache=cache)`.

Query i of a chunk of T new positions in row b sits at position lengths[b] - T + i (lengths after
appending) and sees the keys at or before it. Most graded cases give the rows different
histories, so positions taken from the longest row, or from 0, show, and most use a cache with
more rows than the batch, as a server's is, so an append that reads every row of the cache
instead of the batch's B shows too.
"""
import re

import numpy as np
from expected import weights_of, with_weights
import pytest

from tinytorch.core.attention import KVCache, MultiHeadAttention, create_causal_mask

RTOL, ATOL = 1e-5, 1e-5  # float32 layer against a float64 reference
GRADES = pytest.mark.grades("test-cached-decoding")


def causal_reference(ref, layer, x):
    """Causal self-attention over one whole sequence x (T, E), from the reference, as (T, E)."""
    output, _ = ref.multihead(weights_of(layer), layer.num_heads, layer.num_kv_heads, np.asarray(x)[None],
                              keep=ref.causal_mask(len(x)))
    return output[0]


def decode(layer, x, chunks, cache):
    """Feed x (B, T, E) through the cache in consecutive chunks; return the concatenated outputs."""
    outputs, start = [], 0
    for length in chunks:
        outputs.append(layer(x[:, start:start + length], kv_cache=cache).data)
        start += length
    return np.concatenate(outputs, axis=1)


def fill(rng, cache, lengths):
    """Put random keys and values of the given lengths into rows 0.. of the cache; returns them per row."""
    rows = []
    for b, length in enumerate(lengths):
        shape = (cache.num_heads, length, cache.head_dim)
        rows.append((rng.normal(size=shape), rng.normal(size=shape)))
        cache.update(b, *rows[-1])
    return rows


# ---------------------------------------------------------------- KVCache.append
@GRADES
@pytest.mark.parametrize("before, new_len", [([3, 0, 5], 2), ([1, 4], 1), ([0, 2, 6], 3)])
def test_append_gives_every_row_its_keys_and_visible_positions(ref, before, new_len):
    rng = np.random.default_rng(sum(before) + new_len)
    cache = KVCache(max_batch_size=4, max_seq_length=10, num_heads=2, head_dim=3)
    rows = fill(rng, cache, before)
    new_keys, new_values = rng.normal(size=(2, len(before), 2, new_len, 3))
    keys, values, visible = cache.append(new_keys, new_values)
    after = [length + new_len for length in before]
    case = f"rows holding {before}, appending {new_len}"
    assert cache.cache_lengths.tolist()[:len(before)] == after, f"{case}: lengths {cache.cache_lengths.tolist()}"
    assert keys.shape == values.shape == (len(before), 2, max(after), 3), f"{case}: keys shape {keys.shape}"
    for b, (old_keys, old_values) in enumerate(rows):
        expected_keys = np.concatenate([old_keys, new_keys[b]], axis=1)
        expected_values = np.concatenate([old_values, new_values[b]], axis=1)
        np.testing.assert_allclose(keys[b, :, :after[b]], expected_keys, rtol=1e-6, err_msg=f"{case}: row {b} keys")
        np.testing.assert_allclose(values[b, :, :after[b]], expected_values, rtol=1e-6,
                                   err_msg=f"{case}: row {b} values")
    expected_visible = ref.cached_visible(after, new_len, max(after))
    assert visible.shape == expected_visible.shape, f"{case}: visible shape {visible.shape}"
    np.testing.assert_array_equal(visible, expected_visible, err_msg=f"{case}: visible (B, 1, T, L)")


# ---------------------------------------------------------------- through the layer
@GRADES
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_prefill_then_decode_rows_of_different_lengths(ref, num_kv_heads):
    """Row 0 gets a 3-token prompt alone; then both rows decode together: rows at different positions."""
    rng = np.random.default_rng(num_kv_heads)
    layer = with_weights(MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, seed=1), 1)
    first, second = rng.normal(size=(7, 16)), rng.normal(size=(4, 16))
    cache = KVCache(max_batch_size=3, max_seq_length=9, num_heads=num_kv_heads, head_dim=4)   # a row to spare
    prompt = layer(first[None, :3], kv_cache=cache).data
    steps = decode(layer, np.stack([first[3:], second]), [2, 1, 1], cache)
    assert cache.cache_lengths.tolist() == [7, 4, 0]
    case = f"num_kv_heads={num_kv_heads}, rows at lengths 3 and 0"
    np.testing.assert_allclose(prompt[0], causal_reference(ref, layer, first)[:3], rtol=RTOL, atol=ATOL,
                               err_msg=f"{case}: prompt")
    np.testing.assert_allclose(steps[0], causal_reference(ref, layer, first)[3:], rtol=RTOL, atol=ATOL,
                               err_msg=f"{case}: row 0 decoding")
    np.testing.assert_allclose(steps[1], causal_reference(ref, layer, second), rtol=RTOL, atol=ATOL,
                               err_msg=f"{case}: row 1 decoding")


@GRADES
@pytest.mark.parametrize("chunks", [[1] * 5, [3, 2], [2, 3]])
def test_any_chunking_gives_the_causal_outputs(ref, chunks):
    """Row 0 starts 2 tokens ahead; each chunk's query i sees the cache and the chunk up to i, never later."""
    rng = np.random.default_rng(10)
    layer = with_weights(MultiHeadAttention(12, 3, seed=2), 2)
    first, second = rng.normal(size=(7, 12)), rng.normal(size=(5, 12))
    cache = KVCache(max_batch_size=3, max_seq_length=8, num_heads=3, head_dim=4)    # one row more than the batch
    layer(first[None, :2], kv_cache=cache)
    outputs = decode(layer, np.stack([first[2:], second]), chunks, cache)
    np.testing.assert_allclose(outputs[0], causal_reference(ref, layer, first)[2:], rtol=RTOL, atol=ATOL,
                               err_msg=f"chunks {chunks}: row 0 (2 tokens ahead)")
    np.testing.assert_allclose(outputs[1], causal_reference(ref, layer, second), rtol=RTOL, atol=ATOL,
                               err_msg=f"chunks {chunks}: row 1")


@GRADES
def test_reset_row_starts_a_new_sequence(ref):
    """Row 1 is reset and restarts at position 0 while row 0 continues at position 4."""
    rng = np.random.default_rng(13)
    layer = with_weights(MultiHeadAttention(8, 2, seed=5), 5)
    cache = KVCache(max_batch_size=4, max_seq_length=7, num_heads=2, head_dim=4)    # rows 2 and 3 stay unused
    first, old = rng.normal(size=(6, 8)), rng.normal(size=(4, 8))
    decode(layer, np.stack([first[:4], old]), [4], cache)
    cache.reset(1)
    second = rng.normal(size=(2, 8))
    outputs = decode(layer, np.stack([first[4:], second]), [1, 1], cache)
    np.testing.assert_allclose(outputs[0], causal_reference(ref, layer, first)[4:], rtol=RTOL, atol=ATOL,
                               err_msg="row 0 continuing at position 4")
    np.testing.assert_allclose(outputs[1], causal_reference(ref, layer, second), rtol=RTOL, atol=ATOL,
                               err_msg="row 1 after reset(1)")


@GRADES
def test_cache_rows_hold_the_projected_keys_and_values(ref):
    rng = np.random.default_rng(11)
    layer = with_weights(MultiHeadAttention(16, 4, num_kv_heads=2, seed=3), 3)
    x = rng.normal(size=(2, 6, 16))
    cache = KVCache(max_batch_size=3, max_seq_length=10, num_heads=2, head_dim=4)
    decode(layer, x, [4, 2], cache)
    assert cache.cache_lengths.tolist() == [6, 6, 0]
    for b in range(2):
        keys, values = ref.cached_keys_values(weights_of(layer), 4, 2, x[b])
        np.testing.assert_allclose(cache.get_sequence(b)[0].data, keys, rtol=RTOL, atol=ATOL, err_msg=f"row {b} keys")
        np.testing.assert_allclose(cache.get_sequence(b)[1].data, values, rtol=RTOL, atol=ATOL,
                                   err_msg=f"row {b} values")


# ---------------------------------------------------------------- robustness (not graded)
def test_rows_of_equal_length_and_a_user_mask(ref):
    rng = np.random.default_rng(12)
    layer = with_weights(MultiHeadAttention(8, 2, seed=4), 4)
    x = rng.normal(size=(2, 5, 8))
    cache = KVCache(max_batch_size=2, max_seq_length=5, num_heads=2, head_dim=4)
    outputs = decode(layer, x, [3, 1, 1], cache)
    for b in range(2):
        np.testing.assert_allclose(outputs[b], causal_reference(ref, layer, x[b]), rtol=RTOL, atol=ATOL)
    cache.reset()
    keep = np.ones((2, 3, 3), bool)
    keep[:, :, 0] = False                                                     # hide key 0 from every query
    keep[:, 0, 0] = True
    output = layer(x[:, :3], mask=keep, kv_cache=cache).data
    full = ref.causal_mask(3) * keep[:, None]
    expected, _ = ref.multihead(weights_of(layer), 2, 2, x[:, :3], keep=full)
    np.testing.assert_allclose(output, expected, rtol=RTOL, atol=ATOL)


def test_overflow_through_the_layer_leaves_the_cache_unchanged(ref):
    rng = np.random.default_rng(14)
    layer = with_weights(MultiHeadAttention(8, 2, seed=6), 6)
    x = rng.normal(size=(1, 7, 8))
    cache = KVCache(max_batch_size=1, max_seq_length=6, num_heads=2, head_dim=4)
    np.testing.assert_allclose(decode(layer, x, [5], cache)[0], causal_reference(ref, layer, x[0, :5]),
                               rtol=RTOL, atol=ATOL)
    before = cache.cached_keys.copy(), cache.cached_values.copy(), cache.cache_lengths.copy()
    with pytest.raises(ValueError, match="cache row 0 holds 5 of max_seq_length=6 positions; appending 2 would need 7"):
        layer(x[:, 5:7], kv_cache=cache)
    for kept, now in zip(before, (cache.cached_keys, cache.cached_values, cache.cache_lengths)):
        np.testing.assert_array_equal(now, kept)
    np.testing.assert_allclose(layer(x[:, 5:6], kv_cache=cache).data[0, 0], causal_reference(ref, layer, x[0, :6])[5],
                               rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_cache_with_wrong_heads_for_the_layer_raises():
    layer = with_weights(MultiHeadAttention(16, 4, num_kv_heads=2, seed=0), 0)
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=4, head_dim=4)
    with pytest.raises(ValueError, match=re.escape("kv_cache has num_heads=4, head_dim=4 but the keys have "
                                                   "num_heads=2, head_dim=4")):
        layer(np.zeros((1, 2, 16)), kv_cache=cache)
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="kv_cache has num_heads=2, head_dim=8"):
        layer(np.zeros((1, 2, 16)), kv_cache=cache)
    assert cache.cache_lengths.tolist() == [0]


def test_cache_rejects_too_many_rows_and_other_lengths():
    layer = with_weights(MultiHeadAttention(8, 2, seed=0), 0)
    cache = KVCache(max_batch_size=1, max_seq_length=4, num_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="batch of 2 rows does not fit kv_cache.max_batch_size=1"):
        layer(np.zeros((2, 2, 8)), kv_cache=cache)
    with pytest.raises(ValueError, match="query has 2, key has 3"):
        layer(np.zeros((1, 2, 8)), np.zeros((1, 3, 8)), np.zeros((1, 3, 8)), kv_cache=cache)
    assert cache.cache_lengths.tolist() == [0]


# ---------------------------------------------------------------- a caller's mask together with the cache (graded)
# A batch of sequences decoded through a cache with a mask of the caller's, here which cached
# positions are real tokens (False = padding). Row 0 first takes a prompt of its own, so the rows
# sit at different lengths; then every row takes the same chunks. Each new query may see a key
# only when it is both in its past (the cache's mask) and real (the caller's): every output must
# equal the reference's attention of that row's whole sequence at once, with both masks, from the
# weights the test gave the layer.
MASKED_DECODING = [  # E, H, Hkv, B, max_seq_length, row 0's own prompt, chunks, layout
    (16, 4, 2, 2, 9, 3, [2, 1, 1], "padding (B, 1, 1, L)"),
    (16, 4, 4, 3, 8, 2, [3, 1], "(B, T, L)"),
    (24, 6, 2, 2, 10, 4, [1, 2, 1], "(B, 1, T, L)"),
    (12, 3, 1, 2, 7, 1, [4, 1], "(T, L)"),
    (32, 8, 4, 1, 8, 3, [2, 2], "padding (B, 1, 1, L)"),
    (16, 8, 2, 3, 9, 2, [2, 1, 2], "(B, T, L)"),
    (24, 6, 3, 2, 8, 5, [1, 1, 1], "(B, 1, T, L)"),
    (16, 4, 1, 2, 8, 0, [3, 2], "(T, L)"),
    (12, 6, 2, 3, 7, 2, [2, 2], "padding (B, 1, 1, L)"),
    (32, 4, 2, 2, 10, 1, [3, 3, 1], "(B, 1, T, L)"),
    (24, 8, 4, 2, 9, 3, [1, 3], "(B, T, L)"),
    (16, 4, 2, 4, 6, 2, [2, 1], "padding (B, 1, 1, L)"),
    (20, 5, 1, 2, 8, 4, [2, 1, 1], "(T, L)"),
    (24, 6, 2, 1, 9, 2, [3, 2], "(B, T, L)"),
]


def caller_mask(layout, real, T, L):
    """The caller's mask for T new queries over L cached positions, in one layout; real is (B, max_seq_length)."""
    real = real[:, :L]
    if layout == "padding (B, 1, 1, L)":
        return real[:, None, None, :]
    if layout == "(B, T, L)":
        return np.repeat(real[:, None, :], T, axis=1)
    if layout == "(B, 1, T, L)":
        return np.repeat(real[:, None, None, :], T, axis=2).astype(np.float32)
    return np.repeat(real[:1], T, axis=0).astype(np.int64)                # (T, L): the same positions in every row


@GRADES
@pytest.mark.parametrize("E, H, Hkv, B, max_seq_length, prompt, chunks, layout", MASKED_DECODING)
def test_a_callers_mask_with_the_cache(ref, E, H, Hkv, B, max_seq_length, prompt, chunks, layout):
    rng = np.random.default_rng(E + H + Hkv + B + prompt)
    layer = with_weights(MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=B + prompt), B + prompt)
    cache = KVCache(max_batch_size=B + 1, max_seq_length=max_seq_length, num_heads=Hkv, head_dim=E // H)  # a spare row
    real = rng.random((B, max_seq_length)) < 0.7                            # which positions are real tokens
    real[:, 0] = True
    if layout == "(T, L)":
        real[:] = real[0]
    real[:, 1] = False                                                      # every row holds a pad
    tokens = [rng.normal(size=(prompt + sum(chunks) if b == 0 else sum(chunks), E)) for b in range(B)]
    outputs = [[] for _ in range(B)]
    if prompt:                                                              # row 0 alone: the rows now differ
        outputs[0].append(layer(tokens[0][None, :prompt], kv_cache=cache,
                                mask=caller_mask(layout, real[:1], prompt, prompt)).data[0])
    start = [prompt] + [0] * (B - 1)
    for T in chunks:
        x = np.stack([tokens[b][start[b]:start[b] + T] for b in range(B)])
        L = max(start) + T
        output = layer(x, kv_cache=cache, mask=caller_mask(layout, real, T, L)).data
        for row in range(B):
            outputs[row].append(output[row])
            start[row] += T
    case = f"E={E}, H={H}, Hkv={Hkv}, B={B}, row 0's prompt {prompt}, chunks {chunks}, {layout} mask"
    for row, sequence in enumerate(tokens):
        n = len(sequence)
        keep = np.tril(np.ones((n, n), bool)) & real[row, :n][None, :]     # the past, and real
        expected = ref.multihead(weights_of(layer), H, Hkv, sequence[None], keep=keep)[0][0]
        np.testing.assert_allclose(np.concatenate(outputs[row]), expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{case}: row {row}")

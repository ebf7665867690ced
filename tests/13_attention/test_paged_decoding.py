"""Part 10b, decoding through a `PagedKVCache`: `append` and `MultiHeadAttention(..., kv_cache=cache)`.

Batch row b is sequence `cache.batch[b]`, named by `set_batch`. Most graded cases name the
sequences out of order and give them different lengths, so rows mapped to the wrong sequence,
or positions taken from the longest sequence, show. The masks are written out by hand. The
decoding cases compare each row's outputs with the same sequence decoded alone through your
contiguous `KVCache`, fed the same tokens in the same chunks.
"""
import numpy as np
import pytest

from tinytorch.core.attention import KVCache, MultiHeadAttention, PagedKVCache

GRADES = pytest.mark.grades("test-paged-decoding")
RTOL, ATOL = 1e-5, 1e-6        # both ways run the same float32 code on the same numbers
E, H = 16, 4                   # embed_dim and query heads: head_dim 4


def rows(text):
    """'1110 1111' -> [[1, 1, 1, 0], [1, 1, 1, 1]]."""
    return [[int(flag) for flag in row] for row in text.split()]


# Each case: tokens held before (by sequence), forks (child of parent, then tokens appended to the
# child), the batch order, the new tokens T, and the (B, T, L) mask worked out by hand.
APPEND_CASES = {
    "sequences holding 3, 0 and 5, batch [2, 0, 1], 2 new": (
        [3, 0, 5], [], [2, 0, 1], 2,
        [rows("1111110 1111111"), rows("1111000 1111100"), rows("1000000 1100000")]),
    "sequence 0 holding 4, its fork 1 holding 5, batch [1, 0], 1 new": (
        [4], [(0, 1)], [1, 0], 1,
        [rows("111111"), rows("111110")]),
    "sequences holding 2 and 6, batch [1, 0], 3 new": (
        [2, 6], [], [1, 0], 3,
        [rows("111111100 111111110 111111111"), rows("111000000 111100000 111110000")]),
}


@GRADES
@pytest.mark.parametrize("name", APPEND_CASES)
def test_append_gives_each_row_its_sequence_and_the_visible_keys(name):
    held, forks, order, new_len, expected_visible = APPEND_CASES[name]
    rng = np.random.default_rng(len(name))
    cache = PagedKVCache(num_blocks=12, block_size=3, num_heads=2, head_dim=3)
    contents = {}
    for length in held:
        sequence = cache.add_sequence()
        keys, values = rng.normal(size=(2, 2, length, 3)).astype(np.float32)
        cache.append_tokens(sequence, keys, values)
        contents[sequence] = (keys, values)
    for parent, length in forks:
        child = cache.fork(parent)
        keys, values = rng.normal(size=(2, 2, length, 3)).astype(np.float32)
        cache.append_tokens(child, keys, values)
        contents[child] = tuple(np.concatenate([old, new], axis=1) for old, new in zip(contents[parent], (keys, values)))
    new_keys, new_values = rng.normal(size=(2, len(order), 2, new_len, 3)).astype(np.float32)
    keys, values, visible = cache.set_batch(order).append(new_keys, new_values)
    longest = len(expected_visible[0][0])
    assert keys.shape == values.shape == (len(order), 2, longest, 3), \
        f"{name}: keys and values of shape {keys.shape} and {values.shape}, expected {(len(order), 2, longest, 3)}"
    assert visible.shape == (len(order), 1, new_len, longest), f"{name}: visible of shape {visible.shape}"
    for b, sequence in enumerate(order):
        old_keys, old_values = contents[sequence]
        length = old_keys.shape[1] + new_len
        for what, got, old, new in (("keys", keys, old_keys, new_keys), ("values", values, old_values, new_values)):
            np.testing.assert_array_equal(got[b, :, :length], np.concatenate([old, new[b]], axis=1),
                                          err_msg=f"{name}: row {b} (sequence {sequence}) {what}")
            np.testing.assert_array_equal(got[b, :, length:], 0.0, err_msg=f"{name}: row {b} {what} past its length")
        assert cache.lengths[sequence] == length, f"{name}: sequence {sequence} holds {cache.lengths[sequence]}"
    np.testing.assert_array_equal(visible[:, 0], expected_visible, err_msg=f"{name}: which keys each query sees")


def decode_alone(layer, chunks):
    """Each chunk (1, t, E) through the layer with a KVCache of one row; the outputs, joined."""
    cache = KVCache(max_batch_size=1, max_seq_length=sum(chunk.shape[1] for chunk in chunks),
                    num_heads=layer.num_kv_heads, head_dim=layer.head_dim)
    return np.concatenate([layer(chunk, kv_cache=cache).data for chunk in chunks], axis=1)


@GRADES
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_decoding_sequences_of_different_lengths_equals_kv_cache(num_kv_heads):
    """Prompts of 5, 2 and 7 tokens prefilled one by one, then decoded together, rows out of order."""
    rng = np.random.default_rng(num_kv_heads)
    layer = MultiHeadAttention(embed_dim=E, num_heads=H, num_kv_heads=num_kv_heads, seed=num_kv_heads)
    prompts = [rng.normal(size=(1, length, E)).astype(np.float32) for length in (5, 2, 7)]
    cache = PagedKVCache(num_blocks=12, block_size=3, num_heads=num_kv_heads, head_dim=E // H)
    sequences = [cache.add_sequence() for _ in prompts]
    outputs = {s: [layer(prompt, kv_cache=cache.set_batch([s])).data] for s, prompt in zip(sequences, prompts)}
    inputs = {s: [prompt] for s, prompt in zip(sequences, prompts)}
    order = [sequences[2], sequences[0], sequences[1]]
    for step, new_len in enumerate([1, 2, 1]):
        x = rng.normal(size=(3, new_len, E)).astype(np.float32)
        out = layer(x, kv_cache=cache.set_batch(order)).data
        for b, s in enumerate(order):
            outputs[s].append(out[b:b + 1])
            inputs[s].append(x[b:b + 1])
    for s in sequences:
        np.testing.assert_allclose(np.concatenate(outputs[s], axis=1), decode_alone(layer, inputs[s]),
                                   rtol=RTOL, atol=ATOL,
                                   err_msg=f"{num_kv_heads} kv heads: sequence {s} (prompt {inputs[s][0].shape[1]} "
                                           f"tokens, then 1, 2 and 1 in a batch ordered {order})")


@GRADES
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_forked_samples_equal_their_own_kv_caches(num_kv_heads):
    """A 5-token prompt, two forks; one fork decodes a token alone and is forked again; four samples decode."""
    rng = np.random.default_rng(10 + num_kv_heads)
    layer = MultiHeadAttention(embed_dim=E, num_heads=H, num_kv_heads=num_kv_heads, seed=10 + num_kv_heads)
    cache = PagedKVCache(num_blocks=14, block_size=2, num_heads=num_kv_heads, head_dim=E // H)
    prompt = rng.normal(size=(1, 5, E)).astype(np.float32)
    parent = cache.add_sequence()
    prompt_output = layer(prompt, kv_cache=cache.set_batch([parent])).data
    first, second = cache.fork(parent), cache.fork(parent)
    inputs = {s: [prompt] for s in (parent, first, second)}
    outputs = {s: [prompt_output] for s in (parent, first, second)}
    alone = rng.normal(size=(1, 1, E)).astype(np.float32)
    outputs[second].append(layer(alone, kv_cache=cache.set_batch([second])).data)
    inputs[second].append(alone)
    grandchild = cache.fork(second)                                 # 6 tokens, shared with `second`
    inputs[grandchild], outputs[grandchild] = list(inputs[second]), list(outputs[second])
    order = [second, grandchild, parent, first]
    for step in range(3):
        x = rng.normal(size=(4, 1, E)).astype(np.float32)
        out = layer(x, kv_cache=cache.set_batch(order)).data
        for b, s in enumerate(order):
            outputs[s].append(out[b:b + 1])
            inputs[s].append(x[b:b + 1])
    for s in order:
        np.testing.assert_allclose(np.concatenate(outputs[s], axis=1), decode_alone(layer, inputs[s]),
                                   rtol=RTOL, atol=ATOL,
                                   err_msg=f"{num_kv_heads} kv heads: sample {s} of the batch ordered {order}")


@GRADES
def test_a_batch_of_forks_equals_one_batched_kv_cache():
    """Three samples of one prompt, each step batched: the same outputs as a KVCache with three rows."""
    rng = np.random.default_rng(20)
    layer = MultiHeadAttention(embed_dim=E, num_heads=H, num_kv_heads=2, seed=20)
    prompt, samples = rng.normal(size=(1, 7, E)).astype(np.float32), rng.normal(size=(3, 5, E)).astype(np.float32)
    paged = PagedKVCache(num_blocks=16, block_size=4, num_heads=2, head_dim=E // H)
    parent = paged.add_sequence()
    layer(prompt, kv_cache=paged.set_batch([parent]))
    batch = [parent, paged.fork(parent), paged.fork(parent)]
    contiguous = KVCache(max_batch_size=3, max_seq_length=12, num_heads=2, head_dim=E // H)
    layer(np.repeat(prompt, 3, axis=0), kv_cache=contiguous)
    for t in range(5):
        np.testing.assert_allclose(layer(samples[:, t:t + 1], kv_cache=paged.set_batch(batch)).data,
                                   layer(samples[:, t:t + 1], kv_cache=contiguous).data, rtol=RTOL, atol=ATOL,
                                   err_msg=f"three forked samples against a 3-row KVCache, step {t}")


# ---------------------------------------------------------------- not graded: the provided checks
def test_a_layer_call_that_does_not_fit_changes_nothing():
    layer = MultiHeadAttention(embed_dim=E, num_heads=H, num_kv_heads=2, seed=0)
    cache = PagedKVCache(num_blocks=3, block_size=2, num_heads=2, head_dim=E // H)
    first, second = cache.add_sequence(), cache.add_sequence()
    layer(np.ones((1, 3, E)), kv_cache=cache.set_batch([first]))     # 2 blocks; 1 free
    before = (cache.key_blocks.copy(), list(cache.free_blocks), dict(cache.lengths), cache.ref_counts.copy())
    with pytest.raises(ValueError, match="out of blocks"):
        layer(np.ones((2, 2, E)), kv_cache=cache.set_batch([first, second]))
    after = (cache.key_blocks, cache.free_blocks, cache.lengths, cache.ref_counts)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1:3] == before[1:3]
    np.testing.assert_array_equal(after[3], before[3])


def test_the_batch_must_match_the_named_sequences():
    layer = MultiHeadAttention(embed_dim=E, num_heads=H, seed=0)
    cache = PagedKVCache(num_blocks=4, block_size=2, num_heads=H, head_dim=E // H)
    with pytest.raises(ValueError, match=r"a batch of 2 rows needs 2 sequences, but set_batch named 0"):
        layer(np.ones((2, 1, E)), kv_cache=cache)
    sequence = cache.add_sequence()
    cache.set_batch([sequence]).free(sequence)
    with pytest.raises(ValueError, match="sequence 0 was already freed"):
        layer(np.ones((1, 1, E)), kv_cache=cache)


def test_a_cache_with_other_heads_than_the_layer_raises():
    layer = MultiHeadAttention(embed_dim=E, num_heads=H, num_kv_heads=2, seed=0)
    cache = PagedKVCache(num_blocks=4, block_size=2, num_heads=4, head_dim=E // H)
    with pytest.raises(ValueError, match="kv_cache has num_heads=4, head_dim=4 but the keys have num_heads=2"):
        layer(np.ones((1, 1, E)), kv_cache=cache.set_batch([cache.add_sequence()]))

"""One path through the layer: "fast" swaps only the attention core, so every layer and cache gives the
same numbers under both backends (not graded).

Each case runs twice, on fresh, identically seeded layers and caches: once on the "math" backend and
once on "fast". Both runs go through the student's MultiHeadAttention, KVCache and PagedKVCache; only
the core inside ScaledDotProductAttention differs (the student's math_attention or blocked loop,
or the tuned kernel). Tolerance: both are float32 softmax attention over the same products; the
kernel sums in a different order and may exponentiate in base 2, a few float32 ulps of difference
per step, so rtol 1e-4 and atol 1e-5 on outputs of order 1.
"""
import numpy as np
import pytest

from tinytorch.core.attention import (KVCache, MultiHeadAttention, PagedKVCache, attention_backend,
                                      create_causal_mask, create_padding_mask)

RTOL, ATOL = 1e-4, 1e-5
E, H = 16, 4
KV_HEADS = [4, 2, 1]               # every head its own keys, grouped, multi-query
BLOCK_SIZES = [None, 4]            # the plain core, and the blocked one


def both_backends(run):
    """run() on the math backend and on the fast one; the two results."""
    results = {}
    for backend in ("math", "fast"):
        with attention_backend(backend):
            results[backend] = run()
    return results["math"], results["fast"]


def assert_same(math_result, fast_result, case):
    for name, expected in math_result.items():
        np.testing.assert_allclose(fast_result[name], expected, rtol=RTOL, atol=ATOL, err_msg=f"{case}: {name}")


def layer(num_kv_heads, block_size):
    return MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, block_size=block_size, seed=7).eval()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize("masking", ["none", "causal", "padding", "cross"])
def test_a_layer_without_a_cache_is_the_same_under_both_backends(masking, num_kv_heads, block_size):
    rng = np.random.default_rng(31)
    x = rng.normal(size=(2, 9, E)).astype(np.float32)
    memory = rng.normal(size=(2, 13, E)).astype(np.float32)

    def run():
        attention = layer(num_kv_heads, block_size)
        if masking == "cross":
            return {"output": attention(x, memory, memory).data}
        mask = {"none": None, "causal": create_causal_mask(9),
                "padding": create_padding_mask(np.array([6, 9]), 9)}[masking]
        result = {"output": attention(x, mask=mask).data}
        if block_size is None:
            result["weights"] = attention(x, mask=mask, return_attention_weights=True)[1].data
        return result

    assert_same(*both_backends(run), f"{masking}, {num_kv_heads} kv heads, block_size={block_size}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_a_long_causal_layer_on_the_tiled_threaded_path_is_the_same(num_kv_heads, block_size):
    """2 x 4 heads x 300 x 300 scores: the kernel tiles them and runs the tiles on its worker pool."""
    x = np.random.default_rng(32).normal(size=(2, 300, E)).astype(np.float32)
    run = lambda: {"output": layer(num_kv_heads, block_size)(x, mask=create_causal_mask(300)).data}
    assert_same(*both_backends(run), f"T = 300 causal, {num_kv_heads} kv heads, block_size={block_size}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_cached_decoding_is_the_same_under_both_backends(num_kv_heads, block_size):
    """A prefill of 5, then one token at a time, rows of different lengths; the cache ends the same."""
    x = np.random.default_rng(33).normal(size=(2, 12, E)).astype(np.float32)

    def run():
        attention = layer(num_kv_heads, block_size)
        cache = KVCache(max_batch_size=2, max_seq_length=16, num_heads=num_kv_heads, head_dim=E // H)
        cache.update(1, np.full((num_kv_heads, 2, E // H), 0.5), np.full((num_kv_heads, 2, E // H), -0.5))
        steps = [attention(x[:, :5], kv_cache=cache).data]
        steps += [attention(x[:, t:t + 1], kv_cache=cache).data for t in range(5, 12)]
        return {"output": np.concatenate(steps, axis=1), "cached_keys": cache.cached_keys.copy(),
                "cached_values": cache.cached_values.copy(), "cache_lengths": cache.cache_lengths.copy()}

    assert_same(*both_backends(run), f"KVCache, {num_kv_heads} kv heads, block_size={block_size}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_paged_decoding_with_a_fork_is_the_same_under_both_backends(num_kv_heads, block_size):
    """A paged cache: a prompt, a fork that shares it, then both decode one token a step (copy-on-write)."""
    x = np.random.default_rng(34).normal(size=(2, 10, E)).astype(np.float32)

    def run():
        attention = layer(num_kv_heads, block_size)
        cache = PagedKVCache(num_blocks=12, block_size=3, num_heads=num_kv_heads, head_dim=E // H)
        first = cache.add_sequence()
        steps = [attention(x[:1, :4], kv_cache=cache.set_batch([first])).data]
        second = cache.fork(first)
        cache.set_batch([first, second])
        steps += [attention(x[:, t:t + 1], kv_cache=cache).data for t in range(4, 10)]
        keys, values = zip(*(cache.get_sequence(s) for s in (first, second)))
        return {"prefill": steps[0], "decode": np.concatenate(steps[1:], axis=1),
                "keys": np.stack([k.data for k in keys]), "values": np.stack([v.data for v in values]),
                "tables": np.array([cache.block_tables[first], cache.block_tables[second]])}

    assert_same(*both_backends(run), f"PagedKVCache, {num_kv_heads} kv heads, block_size={block_size}")

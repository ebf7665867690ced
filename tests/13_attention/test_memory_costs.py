"""Part 6, what attention costs in memory: a layer's parameters and the bytes of its KV cache.

Each graded case is one configuration, a layer and a cache sized for it and partly filled,
and checks both memory reports against counts worked out here from the sizes alone. Every
configuration has fewer key/value heads than query heads, so a report that uses the query
heads where the key/value heads belong shows in every case.
"""
import numpy as np
import pytest

from tinytorch.core.attention import KVCache, MultiHeadAttention

GRADES = pytest.mark.grades("test-memory-costs")
BYTES = 4  # float32

CONFIGURATIONS = {
    "E=16, 4 heads, 2 kv heads; rows hold 5 and 3 of 8": (16, 4, 2, 8, [5, 3]),
    "E=24, 6 heads, 1 kv head; rows hold 2, 0 and 7 of 7": (24, 6, 1, 7, [2, 0, 7]),
    "E=32, 8 heads, 4 kv heads; one row holds 9 of 12": (32, 8, 4, 12, [9]),
    "E=12, 3 heads, 1 kv head; rows hold 1 and 1 of 4": (12, 3, 1, 4, [1, 1]),
}


def filled_cache(layer, max_seq_length, lengths):
    """A cache for `layer`, its rows filled through the layer to `lengths` after an earlier sequence was reset."""
    rng = np.random.default_rng(len(lengths))
    cache = KVCache(len(lengths), max_seq_length, layer.num_kv_heads, layer.head_dim)
    layer(rng.normal(size=(len(lengths), 1, layer.embed_dim)), kv_cache=cache)   # an earlier sequence
    cache.reset()
    for row, length in enumerate(lengths):
        keys = rng.normal(size=(layer.num_kv_heads, length, layer.head_dim))
        cache.update(row, keys, keys * 2)
    return cache


@GRADES
@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_memory_reports_of_a_layer_and_its_cache(name):
    E, H, Hkv, max_seq_length, lengths = CONFIGURATIONS[name]
    hd = E // H
    layer = MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=0)
    cache = filled_cache(layer, max_seq_length, lengths)

    counts = {"w_q": E * E, "w_k": E * Hkv * hd, "w_v": E * Hkv * hd, "w_o": E * E}
    total = 2 * E * E + 2 * E * Hkv * hd
    token_bytes = 2 * Hkv * hd * BYTES                                   # a key and a value per kv head
    info = layer.get_memory_usage()
    assert info["parameter_counts"] == counts, f"{name}: parameter_counts {info['parameter_counts']}, expected {counts}"
    assert info["parameter_count"] == total, f"{name}: parameter_count {info['parameter_count']}, expected {total}"
    assert info["parameter_mb"] == total * BYTES / 2**20, f"{name}: parameter_mb {info['parameter_mb']}"
    assert info["kv_cache_bytes_per_token"] == token_bytes, (
        f"{name}: kv_cache_bytes_per_token {info['kv_cache_bytes_per_token']}, expected {token_bytes}")

    usage = cache.get_memory_usage()
    capacity = len(lengths) * max_seq_length
    assert usage["total_mb"] == capacity * token_bytes / 2**20, f"{name}: total_mb {usage['total_mb']}"
    assert usage["bytes_per_token"] == token_bytes, f"{name}: bytes_per_token {usage['bytes_per_token']}, expected {token_bytes}"
    assert usage["utilization"] == sum(lengths) / capacity, (
        f"{name}: utilization {usage['utilization']}, expected {sum(lengths)} of {capacity} positions")
    assert usage["tokens_cached"] == sum(lengths), f"{name}: tokens_cached {usage['tokens_cached']}"

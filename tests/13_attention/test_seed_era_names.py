"""Names that the course's next module (14, transformers) and older module-13 code read.

Module 14's TransformerBlock sums `attention.get_memory_usage()['total_parameter_memory_mb']`, its
Transformer gathers `layer.parameters` with `list.extend`, and generation code checks
`KVCache.is_active` and the cache's memory report. These tests pin those names and their values:
parameter counts and sizes are computed here from the shapes (float32 is 4 bytes; "MB" in the key
names means MiB, 2**20 bytes), and two cases are worked by hand. They are not graded.
"""
import inspect

import numpy as np
import pytest

from tinytorch.core.attention import AttentionProfiler, KVCache, MultiHeadAttention, ScaledDotProductAttention
from tinytorch.core.tensor import Tensor

FLOAT32_BYTES = 4
MIB = 2**20


# ---------------------------------------------------------------- MultiHeadAttention
@pytest.mark.parametrize("embed_dim, num_heads", [(64, 8), (256, 8), (96, 3), (8, 1), (12, 12)])
def test_memory_usage_counts_four_square_projections(embed_dim, num_heads):
    layer = MultiHeadAttention(embed_dim, num_heads, seed=0)
    usage = layer.get_memory_usage()
    count = 4 * embed_dim * embed_dim  # w_q, w_k, w_v, w_o, each (E, E)
    assert usage["total_parameters"] == count
    assert usage["total_parameter_memory_mb"] == pytest.approx(count * FLOAT32_BYTES / MIB, rel=1e-12)
    assert usage["memory_per_head_mb"] == pytest.approx(count * FLOAT32_BYTES / MIB / num_heads, rel=1e-12)
    assert usage["num_heads"] == num_heads and usage["head_dim"] == embed_dim // num_heads
    # The report describes the layer's actual arrays.
    assert sum(p.size for p in layer.parameters) == usage["total_parameters"]
    assert sum(p.data.nbytes for p in layer.parameters) / MIB == pytest.approx(usage["total_parameter_memory_mb"])


def test_memory_usage_hand_computed():
    usage = MultiHeadAttention(256, 8, seed=0).get_memory_usage()
    # 4 * 256 * 256 = 262144 numbers * 4 bytes = 1048576 bytes = 1 MiB, shared by 8 heads of 32.
    assert usage["total_parameters"] == 262_144
    assert usage["total_parameter_memory_mb"] == pytest.approx(1.0)
    assert usage["memory_per_head_mb"] == pytest.approx(0.125)
    assert usage["head_dim"] == 32


def test_scaled_attention_is_the_inner_attention():
    layer = MultiHeadAttention(16, 4, seed=0)
    assert layer.scaled_attention is layer.attention
    assert isinstance(layer.scaled_attention, ScaledDotProductAttention)
    layer.eval()
    assert layer.scaled_attention.training is False


@pytest.mark.parametrize("dropout", [0.0, 0.25, 0])
def test_dropout_attribute_is_the_rate(dropout):
    layer = MultiHeadAttention(16, 4, dropout=dropout, seed=0)
    assert isinstance(layer.dropout, float) and layer.dropout == dropout
    assert MultiHeadAttention(16, 4, seed=0).dropout == 0.0


def test_parameters_are_a_list_of_the_four_projections_and_callable():
    layer = MultiHeadAttention(16, 4, seed=0)
    projections = [layer.w_q, layer.w_k, layer.w_v, layer.w_o]
    params = layer.parameters
    assert isinstance(params, list) and len(params) == 4
    assert all(p is w for p, w in zip(params, projections))
    called = layer.parameters()
    assert isinstance(called, list) and all(p is w for p, w in zip(called, projections))
    gathered = [Tensor([0.0])]
    gathered.extend(layer.parameters)  # how module 14 collects a block's parameters
    assert all(p is w for p, w in zip(gathered[1:], projections))
    assert all(p.shape == (16, 16) for p in params)


# ---------------------------------------------------------------- KVCache
def _random_keys(num_heads, length, head_dim, seed):
    return Tensor(np.random.default_rng(seed).standard_normal((num_heads, length, head_dim)))


def test_is_active_follows_updates_and_full_reset():
    cache = KVCache(max_batch_size=2, max_seq_length=8, num_heads=2, head_dim=4)
    assert isinstance(cache.is_active, bool) and cache.is_active is False
    keys = _random_keys(2, 3, 4, seed=0)
    cache.update(0, keys, keys)
    assert cache.is_active is True
    cache.update(1, _random_keys(2, 1, 4, seed=1), _random_keys(2, 1, 4, seed=2))
    cache.reset(0)  # row 1 still holds a position
    assert cache.is_active is True
    cache.reset()
    assert cache.is_active is False
    cache.update(1, keys, keys)
    assert cache.is_active is True


@pytest.mark.parametrize("batch, seq, heads, head_dim", [(4, 16, 8, 64), (2, 128, 4, 32), (1, 1, 1, 1), (3, 5, 2, 7)])
def test_cache_memory_report_from_the_shapes(batch, seq, heads, head_dim):
    cache = KVCache(max_batch_size=batch, max_seq_length=seq, num_heads=heads, head_dim=head_dim)
    usage = cache.get_memory_usage()
    total_mb = 2 * batch * seq * heads * head_dim * FLOAT32_BYTES / MIB  # keys and values
    assert usage["total_cache_memory_mb"] == pytest.approx(total_mb, rel=1e-12)
    assert usage["memory_per_sequence_mb"] == pytest.approx(total_mb / batch, rel=1e-12)
    assert (usage["max_batch_size"], usage["max_seq_length"], usage["num_heads"], usage["head_dim"]) == (
        batch, seq, heads, head_dim)
    assert usage["cache_utilization"] == 0.0
    assert (cache.cached_keys.nbytes + cache.cached_values.nbytes) / MIB == pytest.approx(total_mb)


def test_cache_memory_report_hand_computed_and_utilization():
    cache = KVCache(max_batch_size=4, max_seq_length=16, num_heads=8, head_dim=64)
    # 2 arrays * 4 * 16 * 8 * 64 numbers * 4 bytes = 262144 bytes = 0.25 MiB; 0.0625 MiB per row.
    usage = cache.get_memory_usage()
    assert usage["total_cache_memory_mb"] == pytest.approx(0.25)
    assert usage["memory_per_sequence_mb"] == pytest.approx(0.0625)
    cache.update(0, _random_keys(8, 5, 64, seed=0), _random_keys(8, 5, 64, seed=1))
    cache.update(2, _random_keys(8, 3, 64, seed=2), _random_keys(8, 3, 64, seed=3))
    assert cache.get_memory_usage()["cache_utilization"] == pytest.approx(8 / 64)  # 5 + 3 of 4 * 16 slots
    cache.update(2, _random_keys(8, 13, 64, seed=4), _random_keys(8, 13, 64, seed=5))  # row 2 is now full
    assert cache.get_memory_usage()["cache_utilization"] == pytest.approx(21 / 64)
    cache.reset(0)
    assert cache.get_memory_usage()["cache_utilization"] == pytest.approx(16 / 64)
    cache.reset()
    assert cache.get_memory_usage()["cache_utilization"] == 0.0
    assert cache.get_memory_usage()["total_cache_memory_mb"] == pytest.approx(0.25)  # allocated, not used


# ---------------------------------------------------------------- AttentionProfiler
def test_measure_attention_scaling_takes_only_layer_and_lengths_by_position():
    parameters = list(inspect.signature(AttentionProfiler.measure_attention_scaling).parameters.values())
    assert [p.name for p in parameters[:3]] == ["self", "attention_layer", "seq_lengths"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[3:])


def test_seed_era_positional_embed_dim_is_a_type_error():
    # Older code passed embed_dim third; it must fail loudly instead of being taken as another argument.
    with pytest.raises(TypeError, match="positional"):
        AttentionProfiler().measure_attention_scaling(ScaledDotProductAttention(), [8, 16], 32)

"""One rule for non-finite numbers, at every public entry point of modules 12 and 13.

NaN or inf in any array argument raises a ValueError that names the argument, changes no state,
and emits no warning. The one exception: a score of -inf given to `masked_softmax` means "masked
out". Arguments that must hold integers (padding lengths, token ids) reject NaN and inf too.
"""
import warnings

import numpy as np
import pytest

from tinytorch.core.attention import (
    AttentionProfiler, KVCache, MultiHeadAttention, PagedKVCache, ScaledDotProductAttention, attention_backend,
    blocked_attention, create_padding_mask, fast_attention, masked_softmax, math_attention, merge_heads, repeat_kv_heads,
    split_heads,
)
from tinytorch.core.embeddings import Embedding, LearnedPositionalEmbedding, PositionalEncoding

rng = np.random.default_rng(0)
QKV = {"query": rng.normal(size=(2, 2, 5, 4)), "key": rng.normal(size=(2, 2, 6, 4)),
       "value": rng.normal(size=(2, 2, 6, 3)), "mask": (rng.random((5, 6)) > 0.3).astype(np.float32)}
X = {"query": rng.normal(size=(2, 4, 8)), "key": rng.normal(size=(2, 4, 8)), "value": rng.normal(size=(2, 4, 8)),
     "mask": np.tri(4, dtype=np.float32)}


def sdpa(backend, **kwargs):
    def call(query, key, value, mask):
        with attention_backend(backend):
            return ScaledDotProductAttention(**kwargs).eval()(query, key, value, mask=mask)
    return call


def multihead(query, key, value, mask):
    return MultiHeadAttention(8, 2, num_kv_heads=1, seed=0)(query, key, value, mask=mask)


ENTRY_POINTS = {
    "math_attention": (lambda query, key, value, mask: math_attention(query, key, value, mask), QKV),
    "fast_attention": (lambda query, key, value, mask: fast_attention(query, key, value, mask), QKV),
    "blocked_attention": (lambda query, key, value, mask: blocked_attention(query, key, value, mask, block_size=2), QKV),
    "ScaledDotProductAttention, math": (sdpa("math"), QKV),
    "ScaledDotProductAttention, fast": (sdpa("fast"), QKV),
    "ScaledDotProductAttention, blocked": (sdpa("math", block_size=2), QKV),
    "MultiHeadAttention": (multihead, X),
    "split_heads": (lambda x: split_heads(x, 2), {"x": rng.normal(size=(2, 3, 4))}),
    "merge_heads": (merge_heads, {"x": rng.normal(size=(2, 2, 3, 2))}),
    "repeat_kv_heads": (lambda x: repeat_kv_heads(x, 4), {"x": rng.normal(size=(2, 2, 3, 2))}),
    "masked_softmax (mask)": (lambda mask: masked_softmax(rng.normal(size=(3, 4)), mask), {"mask": np.ones((3, 4))}),
    "fit_exponent": (AttentionProfiler.fit_exponent, {"sizes": np.array([1.0, 2.0, 4.0]), "costs": np.array([1.0, 4.0, 16.0])}),
    "create_padding_mask": (lambda lengths: create_padding_mask(lengths, 4), {"lengths": np.array([1.0, 3.0])}),
    "Embedding": (lambda ids: Embedding(10, 4, seed=0)(ids), {"ids": np.array([[1.0, 2.0, 3.0]])}),
    "PositionalEncoding": (lambda x: PositionalEncoding(4, max_seq_length=8)(x), {"x": rng.normal(size=(2, 3, 4))}),
    "LearnedPositionalEmbedding": (lambda x: LearnedPositionalEmbedding(8, 4, seed=0)(x), {"x": rng.normal(size=(2, 3, 4))}),
}
CASES = [(entry, argument, bad, position) for entry, (_, arrays) in ENTRY_POINTS.items() for argument in arrays
         for bad in (np.nan, np.inf, -np.inf) for position in (0, -1)]


@pytest.mark.parametrize("entry, argument, bad, position", CASES)
def test_nan_or_inf_in_any_array_argument_raises_value_error(entry, argument, bad, position):
    function, arrays = ENTRY_POINTS[entry]
    arguments = {name: np.array(array, dtype=np.float64) for name, array in arrays.items()}
    arguments[argument].flat[position] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises((ValueError, TypeError)) as raised:
            function(**arguments)
    message = str(raised.value)
    assert argument in message or argument.rstrip("s") in message, f"{entry}: {message!r} does not name {argument}"
    if argument not in ("lengths", "ids"):                  # integer arguments may reject floats by type
        assert raised.type is ValueError, f"{entry}: {argument} holding {bad} raised {raised.type.__name__}"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("argument", ["new_keys", "new_values"])
def test_a_cache_refuses_non_finite_keys_and_values_and_changes_nothing(argument, bad):
    cache = KVCache(2, 6, 2, 3)
    cache.update(0, np.ones((2, 2, 3)), np.ones((2, 2, 3)))
    before = cache.cached_keys.copy(), cache.cached_values.copy(), cache.cache_lengths.copy()
    arrays = {"new_keys": np.zeros((2, 1, 3)), "new_values": np.zeros((2, 1, 3))}
    arrays[argument][1, 0, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=argument):
            cache.update(0, arrays["new_keys"], arrays["new_values"])
        with pytest.raises(ValueError, match=argument):
            cache.append(arrays["new_keys"][None], arrays["new_values"][None])
    for kept, now in zip(before, (cache.cached_keys, cache.cached_values, cache.cache_lengths)):
        np.testing.assert_array_equal(now, kept)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("argument", ["new_keys", "new_values"])
def test_a_paged_cache_refuses_non_finite_keys_and_values_and_changes_nothing(argument, bad):
    cache = PagedKVCache(num_blocks=4, block_size=2, num_heads=2, head_dim=3)
    sequence = cache.add_sequence()
    cache.append_tokens(sequence, np.ones((2, 3, 3)), np.ones((2, 3, 3)))
    child = cache.fork(sequence)
    before = (cache.key_blocks.copy(), cache.value_blocks.copy(), cache.ref_counts.copy(), list(cache.free_blocks),
              {s: list(table) for s, table in cache.block_tables.items()}, dict(cache.lengths))
    arrays = {"new_keys": np.zeros((2, 1, 3)), "new_values": np.zeros((2, 1, 3))}
    arrays[argument][1, 0, 2] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=argument):
            cache.append_tokens(child, arrays["new_keys"], arrays["new_values"])
        with pytest.raises(ValueError, match=argument):
            cache.set_batch([child]).append(arrays["new_keys"][None], arrays["new_values"][None])
    after = (cache.key_blocks, cache.value_blocks, cache.ref_counts, cache.free_blocks, cache.block_tables, cache.lengths)
    for kept, now in zip(before, after):
        if isinstance(kept, np.ndarray):
            np.testing.assert_array_equal(now, kept)
        else:
            assert now == kept


def test_minus_inf_scores_mean_masked_out_and_nan_or_plus_inf_scores_raise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = masked_softmax(np.array([[0.0, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf]])).data
        np.testing.assert_array_equal(weights, [[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]])
        for bad in (np.nan, np.inf):
            with pytest.raises(ValueError, match="scores"):
                masked_softmax(np.array([[0.0, bad]]))


@pytest.mark.parametrize("argument, scale", [("query", 1e18), ("key", 1e18), ("value", 1e19), ("mask", 1e20)])
def test_huge_finite_values_are_not_mistaken_for_inf(argument, scale):
    """The fast NaN/inf scan squares its input, which overflows for values near 1e19: no error, no warning."""
    values = dict(QKV)
    values[argument] = np.asarray(values[argument], dtype=np.float32) * np.float32(scale)
    expected = math_attention(**{name: values[name] for name in ("query", "key", "value", "mask")})[0].data
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        output = fast_attention(**{name: values[name] for name in ("query", "key", "value", "mask")})[0].data
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5 * max(1.0, scale if argument == "value" else 1.0))


def test_a_mask_of_the_largest_long_double_is_finite():
    """Finite in its own type, even where long double holds numbers beyond float64's range."""
    mask = np.ones((5, 6), dtype=np.longdouble)
    mask[0, 0] = np.finfo(np.longdouble).max
    output = fast_attention(QKV["query"], QKV["key"], QKV["value"], mask)[0].data
    # two float32 paths that sum in different orders: each output differs by a few float32 units of the
    # values it sums (|v| about 1), so an output near zero needs an absolute bound, not a relative one
    np.testing.assert_allclose(output, math_attention(QKV["query"], QKV["key"], QKV["value"], None)[0].data,
                               rtol=1e-5, atol=1e-6)

"""Edge cases of module 13 with defined answers: fully masked rows, huge logits, input dtypes and kinds,
empty axes, warnings and in-place changes, across every public function and layer."""
import copy
import subprocess
import sys
import warnings

from expected import ref
import numpy as np
import pytest

from tinytorch.core.attention import (KVCache, MultiHeadAttention, ScaledDotProductAttention, attention_backend,
                                      blocked_attention, create_causal_mask, fast_attention, masked_softmax,
                                      math_attention, merge_heads, repeat_kv_heads, split_heads)
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-6  # float32 result against a float64 reference


def sdpa_on(backend, **options):
    """ScaledDotProductAttention (eval mode) run on the given backend, returning (output, weights or None)."""
    def attend(q, k, v, mask=None):
        layer = ScaledDotProductAttention(**options).eval()
        with attention_backend(backend):
            if "block_size" in options:
                return layer(q, k, v, mask=mask), None
            return layer(q, k, v, mask=mask, return_attention_weights=True)
    return attend


# Every way to compute attention on (q, k, v, mask); each returns (output, weights or None).
KERNELS = {
    "math_attention": lambda q, k, v, mask=None: math_attention(q, k, v, mask),
    "fast_attention": lambda q, k, v, mask=None: fast_attention(q, k, v, mask),
    "blocked_attention": lambda q, k, v, mask=None: (blocked_attention(q, k, v, mask, block_size=2), None),
    "sdpa-math": sdpa_on("math"),
    "sdpa-fast": sdpa_on("fast"),
    "sdpa-blocked": sdpa_on("math", block_size=2),
}


def random_qkv(seed, lead=(2, 3), T=4, S=6, d_k=4, d_v=3):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(lead + shape, dtype=np.float32) for shape in ((T, d_k), (S, d_k), (S, d_v)))


def mask_with_dead_rows(T=4, S=6, dead=(1, 3), seed=0):
    """A random (T, S) keep-mask whose `dead` rows are fully masked and the others keep at least one key."""
    keep = np.random.default_rng(seed).random((T, S)) < 0.5
    keep[:, 0] = True
    keep[list(dead)] = False
    return keep


# ---------------------------------------------------------------- fully masked rows
def test_masked_softmax_fully_masked_rows_are_zero_without_warnings():
    keep = mask_with_dead_rows()
    scores = np.random.default_rng(1).normal(scale=5.0, size=(2, 4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = masked_softmax(scores, keep).data
        everything_masked = masked_softmax(scores, np.zeros((4, 6), dtype=bool)).data
    np.testing.assert_array_equal(weights[:, [1, 3]], 0.0)
    np.testing.assert_allclose(weights[:, [0, 2]].sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(everything_masked, 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["dead rows", "all masked", "causal T > S"])
def test_fully_masked_rows_give_zero_weights_and_output(kernel, case):
    """Rows with no key to attend to: weights 0 and output 0, no NaN, no RuntimeWarning; the other rows
    are the usual attention."""
    T, S = (6, 3) if case == "causal T > S" else (4, 6)
    q, k, v = random_qkv(2, T=T, S=S)
    mask = {"dead rows": mask_with_dead_rows(), "all masked": np.zeros((T, S)),
            "causal T > S": create_causal_mask(T, S)}[case]                 # causal: rows 0-2 see no key
    keep = np.asarray(getattr(mask, "data", mask)) != 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, weights = KERNELS[kernel](q, k, v, mask)
    dead = ~keep.any(axis=-1)
    expected_output, expected_weights = ref.attention(q, k, v, keep)
    assert np.all(np.isfinite(output.data))
    np.testing.assert_array_equal(output.data[..., dead, :], 0.0)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    if weights is not None:
        np.testing.assert_array_equal(weights.data[..., dead, :], 0.0)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mask_kind", ["general", "causal T > S"])
def test_fully_masked_rows_on_the_threaded_fast_path(mask_kind):
    """512 x 512 scores take fast_attention's tiled, threaded path; dead rows must still be exact zeros."""
    T, S = (512, 512) if mask_kind == "general" else (512, 300)
    q, k, v = random_qkv(3, lead=(1,), T=T, S=S, d_k=8, d_v=8)
    if mask_kind == "general":
        mask = np.random.default_rng(4).random((T, S)) < 0.5
        mask[::7] = False
    else:
        mask = create_causal_mask(T, S)                                     # rows 0..211 see no key
    keep = np.asarray(getattr(mask, "data", mask)) != 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, weights = fast_attention(q, k, v, mask)
    dead = ~keep.any(axis=-1)
    assert dead.sum() > 0 and np.all(np.isfinite(output.data))
    np.testing.assert_array_equal(output.data[:, dead], 0.0)
    np.testing.assert_array_equal(weights.data[:, dead], 0.0)
    np.testing.assert_allclose(output.data, math_attention(q, k, v, mask)[0].data, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "fast"])
def test_multihead_fully_masked_rows_give_zero_output(backend):
    """A query row with no visible key has zero context, so its projected output w_o · 0 is zero too."""
    layer = MultiHeadAttention(8, 2, seed=0)
    x = np.random.default_rng(5).standard_normal((2, 4, 8), dtype=np.float32)
    mask = np.ones((2, 4, 4), dtype=bool)
    mask[0, 1] = False                                                      # batch 0, query 1
    mask[1, 3] = False                                                      # batch 1, query 3
    with warnings.catch_warnings(), attention_backend(backend):
        warnings.simplefilter("error")
        output, weights = layer(x, mask=mask, return_attention_weights=True)
    assert np.all(np.isfinite(output.data))
    np.testing.assert_array_equal(output.data[0, 1], 0.0)
    np.testing.assert_array_equal(output.data[1, 3], 0.0)
    np.testing.assert_array_equal(weights.data[0, :, 1], 0.0)
    np.testing.assert_array_equal(weights.data[1, :, 3], 0.0)
    assert np.all(output.data[0, [0, 2, 3]] != 0.0)


# ---------------------------------------------------------------- a CausalMask that broadcasts
# create_causal_mask(1, 1) is [[1]] and create_causal_mask(T, 1) opens only its last row; broadcast over
# (T, S) scores they are ordinary masks (all open; only the last row open), so every kernel must equal
# math_attention. blocked_attention and fast_attention's threaded path instead trust `.offset` and skip
# keys the broadcast mask allows.
BROADCAST_CAUSAL = {
    "blocked, (1, 1) over 4 x 4": (lambda q, k, v, m: blocked_attention(q, k, v, m, block_size=1), 4, (1, 1)),
    "blocked, (4, 1) over 4 x 4": (lambda q, k, v, m: blocked_attention(q, k, v, m, block_size=1), 4, (4, 1)),
    "sdpa(block_size), (1, 1)": (lambda q, k, v, m: ScaledDotProductAttention(block_size=1)(q, k, v, mask=m), 4, (1, 1)),
    "fast threaded, (1, 1) over 600 x 600": (lambda q, k, v, m: fast_attention(q, k, v, m)[0], 600, (1, 1)),
}


@pytest.mark.parametrize("case", BROADCAST_CAUSAL)
def test_broadcast_causal_mask_is_an_ordinary_mask(case):
    call, T, mask_shape = BROADCAST_CAUSAL[case]
    q, k, v = random_qkv(11, lead=(1,), T=T, S=T)
    mask = create_causal_mask(*mask_shape)
    np.testing.assert_allclose(call(q, k, v, mask).data, math_attention(q, k, v, mask)[0].data, rtol=RTOL, atol=1e-5)


# ---------------------------------------------------------------- logits near ±1e5
# With scale=1, q = 100 and k = ±1000 give logits ±1e5: a naive exp overflows (e^1e5 = inf) or
# underflows every entry of a row (e^-1e5 = 0, then 0 / 0).
HUGE_Q = np.array([[100.0]])
HUGE_CASES = {
    "one winner": (np.array([[1000.0], [-1000.0], [999.0]]), [1.0, 0.0, 0.0]),  # logits 1e5, -1e5, 99900
    "all +1e5": (np.array([[1000.0], [1000.0], [1000.0]]), [1 / 3] * 3),
    "all -1e5": (np.array([[-1000.0], [-1000.0], [-1000.0]]), [1 / 3] * 3),
}
VALUES = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])


@pytest.mark.parametrize("case", HUGE_CASES)
def test_masked_softmax_of_logits_near_1e5(case):
    keys, expected = HUGE_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = masked_softmax((HUGE_Q @ keys.T)).data
    np.testing.assert_allclose(weights, [expected], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["math_attention", "fast_attention", "blocked_attention", "sdpa"])
@pytest.mark.parametrize("case", HUGE_CASES)
def test_attention_with_logits_near_1e5_stays_finite(kernel, case):
    """d_k = 1 so the layer's default scale 1/sqrt(d_k) is 1 as well."""
    keys, expected_weights = HUGE_CASES[case]
    call = {
        "math_attention": lambda: math_attention(HUGE_Q, keys, VALUES, scale=1.0)[0],
        "fast_attention": lambda: fast_attention(HUGE_Q, keys, VALUES, scale=1.0)[0],
        "blocked_attention": lambda: blocked_attention(HUGE_Q, keys, VALUES, scale=1.0, block_size=1),
        "sdpa": lambda: ScaledDotProductAttention()(HUGE_Q, keys, VALUES),
    }[kernel]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = call().data
    np.testing.assert_allclose(output, [np.array(expected_weights) @ VALUES], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- every public entry point
def fresh_inputs():
    """Integer-valued float32 inputs (exact in every dtype tested) for every public entry point."""
    rng = np.random.default_rng(6)
    ints = lambda *shape: rng.integers(-3, 4, shape).astype(np.float32)
    keep = (rng.random((3, 5)) < 0.7).astype(np.float32)
    keep[:, 0] = 1.0
    return {"q": ints(2, 2, 3, 4), "k": ints(2, 2, 5, 4), "v": ints(2, 2, 5, 3), "mask": keep,
            "scores": ints(2, 3, 5), "x": ints(2, 3, 8), "self_mask": np.tril(np.ones((3, 3), np.float32)),
            "heads": ints(2, 2, 3, 4), "kv_heads": ints(2, 1, 5, 4), "new": ints(2, 3, 4)}


# name -> call on a dict of inputs (any kind) -> the Tensors it returns
ENTRY_POINTS = {
    "masked_softmax": lambda a: (masked_softmax(a["scores"], a["mask"]),),
    "math_attention": lambda a: math_attention(a["q"], a["k"], a["v"], a["mask"]),
    "fast_attention": lambda a: fast_attention(a["q"], a["k"], a["v"], a["mask"]),
    "blocked_attention": lambda a: (blocked_attention(a["q"], a["k"], a["v"], a["mask"], block_size=2),),
    "ScaledDotProductAttention": lambda a: ScaledDotProductAttention()(
        a["q"], a["k"], a["v"], mask=a["mask"], return_attention_weights=True),
    "ScaledDotProductAttention(block_size)": lambda a: (ScaledDotProductAttention(block_size=2)(
        a["q"], a["k"], a["v"], mask=a["mask"]),),
    "split_heads": lambda a: (split_heads(a["x"], 2),),
    "merge_heads": lambda a: (merge_heads(a["heads"]),),
    "repeat_kv_heads": lambda a: (repeat_kv_heads(a["kv_heads"], 2),),
    "MultiHeadAttention": lambda a: MultiHeadAttention(8, 2, num_kv_heads=1, seed=0)(
        a["x"], mask=a["self_mask"], return_attention_weights=True),
    "MultiHeadAttention(kv_cache)": lambda a: (MultiHeadAttention(8, 2, seed=0)(
        a["x"], kv_cache=KVCache(2, 4, 2, 4)),),
    "KVCache.update": lambda a: KVCache(1, 4, 2, 4).update(0, a["new"], a["new"]),
}


def convert(inputs, kind):
    """Every input as the given kind: a NumPy dtype, a Tensor or nested lists."""
    if kind == "tensor":
        return {name: Tensor(array) for name, array in inputs.items()}
    if kind == "list":
        return {name: array.tolist() for name, array in inputs.items()}
    return {name: array.astype(kind) for name, array in inputs.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.int32, np.int8])
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_float64_and_integer_inputs_come_out_float32(entry_point, dtype):
    """Same numbers in another dtype: float32 Tensors with the same values as the float32 inputs give."""
    expected = ENTRY_POINTS[entry_point](fresh_inputs())
    results = ENTRY_POINTS[entry_point](convert(fresh_inputs(), dtype))
    for result, reference in zip(results, expected, strict=True):
        assert isinstance(result, Tensor) and result.dtype == np.float32
        np.testing.assert_array_equal(result.data, reference.data)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_create_causal_mask_takes_numpy_integers_and_gives_float32(dtype):
    mask = create_causal_mask(dtype(2), dtype(3))
    assert mask.dtype == np.float32 and mask.offset == 1
    np.testing.assert_array_equal(mask.data, [[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("kind", ["tensor", "list", "int tensor"])
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_tensors_arrays_and_nested_lists_give_identical_results(entry_point, kind):
    expected = ENTRY_POINTS[entry_point](fresh_inputs())
    inputs = fresh_inputs()
    if kind == "int tensor":                                              # Tensor keeps integer data as int64
        inputs = {name: Tensor(array.astype(np.int64)) for name, array in inputs.items()}
        assert inputs["q"].dtype == np.int64
    else:
        inputs = convert(inputs, kind)
    for result, reference in zip(ENTRY_POINTS[entry_point](inputs), expected, strict=True):
        np.testing.assert_array_equal(result.data, reference.data)


@pytest.mark.parametrize("kind", [np.float32, np.float64, "tensor"])
@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_inputs_are_not_modified(entry_point, kind):
    """float32 arrays are used without a copy inside the package, so they are the case to watch."""
    inputs = convert(fresh_inputs(), kind)
    before = copy.deepcopy(inputs)
    ENTRY_POINTS[entry_point](inputs)
    for name, value in inputs.items():
        np.testing.assert_array_equal(getattr(value, "data", value), getattr(before[name], "data", before[name]))


def test_layers_do_not_modify_their_parameters_or_masks():
    layer = MultiHeadAttention(8, 2, num_kv_heads=1, seed=0, block_size=2)
    parameters = [w.data.copy() for w in layer.parameters]
    mask = create_causal_mask(3)
    x = fresh_inputs()["x"]
    layer(x, mask=mask)
    layer(x, kv_cache=KVCache(2, 6, 1, 4))
    with attention_backend("fast"):
        layer(x, mask=mask)
    for w, w_before in zip(layer.parameters, parameters):
        np.testing.assert_array_equal(w.data, w_before)
    np.testing.assert_array_equal(mask.data, np.tril(np.ones((3, 3))))


# ---------------------------------------------------------------- length 1 and empty axes
@pytest.mark.parametrize("kernel", KERNELS)
def test_one_query_and_one_key_returns_the_value(kernel):
    """A single key gets weight 1 whatever its score, so the output is exactly its value."""
    q, k, v = random_qkv(7, T=1, S=1)
    output, weights = KERNELS[kernel](q, k, v, create_causal_mask(1))
    np.testing.assert_allclose(output.data, v, rtol=1e-6)
    if weights is not None:
        np.testing.assert_array_equal(weights.data, 1.0)


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_multihead_with_one_position_is_the_projected_value(num_kv_heads):
    """T = S = 1: every head copies its value head, so output = repeated (x w_v) w_o."""
    layer = MultiHeadAttention(8, 2, num_kv_heads=num_kv_heads, seed=1)
    x = np.random.default_rng(8).standard_normal((3, 1, 8))
    values = (x @ layer.w_v.data.astype(np.float64)).reshape(3, 1, num_kv_heads, 4)     # (B, 1, Hkv, hd)
    context = np.repeat(values, 2 // num_kv_heads, axis=2).reshape(3, 1, 8)            # (B, 1, H * hd)
    output, weights = layer(x, return_attention_weights=True)
    np.testing.assert_allclose(output.data, context @ layer.w_o.data, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(weights.data, 1.0)


EMPTY = {"B = 0": ((0, 3), 4, 6), "T = 0": ((2, 3), 0, 6), "S = 0": ((2, 3), 4, 0), "T = S = 0": ((2, 3), 0, 0)}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("empty", EMPTY)
def test_empty_axes_give_empty_or_zero_results(empty, kernel, masked):
    """An empty batch or query axis gives an empty result; no keys (S = 0) gives a zero output."""
    lead, T, S = EMPTY[empty]
    q, k, v = random_qkv(9, lead=lead, T=T, S=S, d_v=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, weights = KERNELS[kernel](q, k, v, create_causal_mask(T, S) if masked else None)
    assert output.shape == lead + (T, 5) and output.dtype == np.float32
    np.testing.assert_array_equal(output.data, 0.0)                         # empty, or zero when S = 0
    if weights is not None:
        assert weights.shape == lead + (T, S) and weights.dtype == np.float32


@pytest.mark.parametrize("shape", [(0, 4, 6), (2, 0, 6), (2, 4, 0), (0,)])
def test_masked_softmax_of_empty_scores(shape):
    weights = masked_softmax(np.ones(shape))
    assert weights.shape == shape and weights.dtype == np.float32


@pytest.mark.parametrize("backend", ["math", "fast"])
@pytest.mark.parametrize("B, T, S", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (2, 0, 0)])
def test_multihead_with_empty_axes(backend, B, T, S):
    layer = MultiHeadAttention(8, 2, num_kv_heads=1, seed=2)
    rng = np.random.default_rng(10)
    x_q, x_kv = rng.standard_normal((B, T, 8)), rng.standard_normal((B, S, 8))
    with warnings.catch_warnings(), attention_backend(backend):
        warnings.simplefilter("error")
        output, weights = layer(x_q, x_kv, mask=create_causal_mask(T, S), return_attention_weights=True)
    assert output.shape == (B, T, 8) and weights.shape == (B, 2, T, S)
    np.testing.assert_array_equal(output.data, 0.0)                         # empty, or zero when S = 0


def test_empty_kv_cache_calls_change_nothing():
    """Appending zero positions, directly or through a layer with an empty batch of positions, is a no-op."""
    cache = KVCache(2, 4, 2, 4)
    layer = MultiHeadAttention(8, 2, seed=3)
    keys, values = cache.update(0, np.zeros((2, 0, 4)), np.zeros((2, 0, 4)))
    assert keys.shape == values.shape == (2, 0, 4)
    assert layer(np.zeros((2, 0, 8)), kv_cache=cache).shape == (2, 0, 8)
    assert layer(np.zeros((0, 3, 8)), kv_cache=cache).shape == (0, 3, 8)
    np.testing.assert_array_equal(cache.cache_lengths, [0, 0])
    np.testing.assert_array_equal(cache.cached_keys, 0.0)


def test_head_helpers_and_causal_mask_with_empty_axes():
    assert split_heads(np.ones((0, 3, 8)), 2).shape == (0, 2, 3, 4)
    assert split_heads(np.ones((2, 0, 8)), 2).shape == (2, 2, 0, 4)
    assert merge_heads(np.ones((2, 2, 0, 4))).shape == (2, 0, 8)
    assert repeat_kv_heads(np.ones((2, 1, 0, 4)), 3).shape == (2, 3, 0, 4)
    for T, S in [(0, 0), (0, 3), (3, 0)]:
        mask = create_causal_mask(T, S)
        assert mask.shape == (T, S) and mask.offset == S - T


@pytest.mark.parametrize("call, message", [
    (lambda: math_attention(np.ones((2, 0)), np.ones((3, 0)), np.ones((3, 1))), "d_k=0"),
    (lambda: fast_attention(np.ones((2, 0)), np.ones((3, 0)), np.ones((3, 1))), "d_k=0"),
    (lambda: blocked_attention(np.ones((2, 0)), np.ones((3, 0)), np.ones((3, 1))), "d_k=0"),
    (lambda: ScaledDotProductAttention()(np.ones((2, 0)), np.ones((3, 0)), np.ones((3, 1))), "d_k=0"),
    (lambda: masked_softmax(np.float32(1.0)), "at least 1 axis"),
    (lambda: MultiHeadAttention(0, 1), "embed_dim must be >= 1, got 0"),
    (lambda: KVCache(0, 4, 1, 1), "max_batch_size must be >= 1, got 0"),
    (lambda: KVCache(1, 0, 1, 1), "max_seq_length must be >= 1, got 0"),
    (lambda: repeat_kv_heads(np.ones((1, 0, 2, 2)), 2), "0 key/value heads"),
])
def test_empty_sizes_that_have_no_answer_raise_value_error(call, message):
    """Zero feature, head or capacity sizes define no attention: a ValueError that names the size."""
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- no warnings anywhere
WORKLOAD = """
import numpy as np
from tinytorch.core.attention import *
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 40, 16), dtype=np.float32)
for backend in ATTENTION_BACKENDS:
    with attention_backend(backend):
        for layer in (MultiHeadAttention(16, 4, seed=0), MultiHeadAttention(16, 4, num_kv_heads=2, seed=0),
                      MultiHeadAttention(16, 4, seed=0, block_size=8)):
            layer(x, mask=create_causal_mask(40))
            layer(x[:, :5], x, mask=create_causal_mask(5, 40))
            cache = KVCache(2, 40, layer.num_kv_heads, layer.head_dim)
            layer(x[:, :30], kv_cache=cache)
            for t in range(30, 40):
                layer(x[:, t:t + 1], kv_cache=cache)
        q, k, v = (rng.standard_normal((2, 4, 12, 8)) for _ in range(3))
        dead = np.ones((12, 12), bool)
        dead[3] = False
        ScaledDotProductAttention(dropout=0.1, seed=0)(q, k, v, mask=dead)
        ScaledDotProductAttention()(q, k, v, mask=dead, return_attention_weights=True)
        blocked_attention(q, k, v, dead, block_size=5)
        fast_attention(q * 300, k * 300, v, create_causal_mask(12))               # logits ~1e5
        masked_softmax(rng.standard_normal((3, 5)) * 1e5, np.zeros((3, 5)))
q, k, v = (rng.standard_normal((1, 600, 8), dtype=np.float32) for _ in range(3))
fast_attention(q, k, v, create_causal_mask(600), need_weights=False)
profiler = AttentionProfiler(repeats=1, warmup=0)
profiler.analyze_quadratic_scaling(profiler.measure_attention_scaling(MultiHeadAttention(16, 4, seed=0), [8, 16]))
profiler.compare_generation(MultiHeadAttention(16, 4, seed=0), prompt_length=4, new_tokens=3)
print("done")
"""


def test_package_import_and_a_representative_workload_raise_no_warnings():
    """In a fresh interpreter with -W error, so warnings at import time count as well."""
    result = subprocess.run([sys.executable, "-W", "error", "-c", WORKLOAD], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr


def test_values_beyond_float32_range_raise_instead_of_becoming_inf():
    with pytest.raises(ValueError, match="scores holds values beyond float32's range"):
        masked_softmax(np.array([1e39, 0.0]))
    with pytest.raises(ValueError, match="query holds values beyond float32's range"):
        math_attention(np.full((2, 4), 1e39), np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="temperature must be a positive number within float32's range"):
        ScaledDotProductAttention(temperature=1e-39)
    assert ScaledDotProductAttention(temperature=np.float32(2), dropout=np.float32(0.1)).temperature == 2.0


def test_nan_in_a_mask_is_an_error():
    with pytest.raises(ValueError, match="mask holds NaN"):
        masked_softmax(np.zeros((2, 3)), np.array([1.0, np.nan, 0.0]))


def test_a_causal_mask_is_two_dimensional_and_read_only():
    from tinytorch.core.attention import CausalMask

    with pytest.raises(ValueError, match=r"shape \(seq_len, key_len\), got shape \(3,\)"):
        CausalMask(np.ones(3), 0)
    mask = CausalMask(np.tril(np.ones((2, 4)), k=2), 2)
    assert mask.offset == 2
    with pytest.raises(ValueError, match="read-only"):
        mask.data[0, 3] = 1.0


def test_fast_weights_are_formed_even_when_values_are_empty():
    q, k, v = np.ones((3, 4)), np.ones((5, 4)), np.ones((5, 0))
    output, weights = fast_attention(q, k, v)
    assert output.shape == (3, 0)
    np.testing.assert_allclose(weights.data, math_attention(q, k, v)[1].data, rtol=1e-6)


def test_ragged_lists_get_the_same_type_error_through_every_entry_point():
    ragged = [[1.0, 2.0], [3.0]]
    for call in (lambda: math_attention(ragged, ragged, ragged), lambda: ScaledDotProductAttention()(ragged, ragged, ragged),
                 lambda: MultiHeadAttention(2, 1, seed=0)(ragged)):
        with pytest.raises(TypeError, match="query must be a Tensor or an array of numbers"):
            call()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_non_finite_attention_inputs_raise_naming_the_argument(name, bad):
    arrays = {"query": np.ones((2, 4)), "key": np.ones((3, 4)), "value": np.ones((3, 2))}
    arrays[name][1, 0] = bad
    for call in (math_attention, fast_attention, ScaledDotProductAttention(),
                 lambda q, k, v: blocked_attention(q, k, v, block_size=2)):
        with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
            call(arrays["query"], arrays["key"], arrays["value"])


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_non_finite_multihead_inputs_raise_and_leave_the_cache_unchanged(name):
    layer = MultiHeadAttention(8, 2, seed=0)
    inputs = {"query": np.ones((1, 3, 8)), "key": np.ones((1, 3, 8)), "value": np.ones((1, 3, 8))}
    inputs[name][0, 1, 2] = np.nan
    cache = KVCache(1, 4, 2, 4)
    with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
        layer(inputs["query"], inputs["key"], inputs["value"])
    with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
        layer(inputs["query"], inputs["key"], inputs["value"], kv_cache=cache)
    assert cache.cache_lengths.tolist() == [0]


@pytest.mark.parametrize("name", ["new_keys", "new_values"])
def test_non_finite_cache_inputs_raise_and_change_nothing(name):
    cache = KVCache(2, 4, 2, 3)
    cache.update(0, np.ones((2, 1, 3)), np.ones((2, 1, 3)))
    before = cache.cached_keys.copy(), cache.cached_values.copy(), cache.cache_lengths.copy()
    arrays = {"new_keys": np.ones((2, 2, 3)), "new_values": np.ones((2, 2, 3))}
    arrays[name][1, 1, 0] = np.inf
    with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
        cache.update(0, arrays["new_keys"], arrays["new_values"])
    with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
        cache.append(arrays["new_keys"][None], arrays["new_values"][None])
    for kept, now in zip(before, (cache.cached_keys, cache.cached_values, cache.cache_lengths)):
        np.testing.assert_array_equal(now, kept)


def test_non_finite_scores_raise_but_minus_inf_means_masked():
    with pytest.raises(ValueError, match=r"scores hold NaN or \+inf"):
        masked_softmax(np.array([[0.0, np.inf]]))
    np.testing.assert_array_equal(masked_softmax(np.array([[0.0, -np.inf]])).data, [[1.0, 0.0]])

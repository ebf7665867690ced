"""Part 7, the provided fast kernel: it must give the formula's numbers on every path (not graded)."""
import warnings

import attention_reference as ref
from expected import weights_of
import numpy as np
import pytest

from tinytorch.core.attention import (ATTENTION_BACKENDS, KVCache, MultiHeadAttention, ScaledDotProductAttention,
                                      attention_backend, create_causal_mask, fast_attention,
                                      get_attention_backend, set_attention_backend)
from tinytorch.core import _attention_kernel as kernel
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-5  # float32 kernel against a float64 reference


def random_qkv(seed, lead, T, S, d_k=8, d_v=8):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(lead + shape, dtype=np.float32) for shape in ((T, d_k), (S, d_k), (S, d_v)))


# (2, 3) x 5 x 7 takes the single vectorised call; the others hold more than 2**18 scores and take the
# tiled, threaded path (600 x 250 causal: the first ten 32-row tiles see no key at all). At S = 2100 a
# tile holds fewer than 512 rows.
SHAPES = [((2, 3), 5, 7), ((2,), 384, 384), ((1, 2), 300, 450), ((2,), 600, 250), ((1,), 520, 2100)]


@pytest.mark.parametrize("lead, T, S", SHAPES)
def test_no_mask_matches_reference(lead, T, S):
    with attention_backend("fast"):
        q, k, v = random_qkv(T, lead, T, S)
        output, weights = fast_attention(q, k, v)
        expected_output, expected_weights = ref.attention_formula(q, k, v)
        assert output.dtype == np.float32 and weights.dtype == np.float32
        np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
        output, weights = fast_attention(q, k, v, need_weights=False)
        assert weights is None
        np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lead, T, S", SHAPES)
def test_causal_masks_match_reference(lead, T, S):
    """Square, offset (T < S) and T > S causal masks, where the kernel skips the future."""
    with attention_backend("fast"):
        q, k, v = random_qkv(T + 1, lead, T, S)
        output, weights = fast_attention(q, k, v, mask=create_causal_mask(T, S))
        expected_output, expected_weights = ref.attention_formula(q, k, v, np.tril(np.ones((T, S)), S - T))
        np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lead, T, S", SHAPES)
def test_random_masks_with_fully_masked_rows(lead, T, S):
    with attention_backend("fast"):
        q, k, v = random_qkv(T + 2, lead, T, S)
        keep = np.random.default_rng(3).random(lead[:1] + (1,) * (len(lead) - 1) + (T, S)) < 0.3   # per batch row
        keep[..., 1, :] = False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            output, weights = fast_attention(q, k, v, mask=keep)
        expected_output, expected_weights = ref.attention_formula(q, k, v, keep)
        np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(output.data[..., 1, :], 0.0)


def test_causal_mask_on_the_tiled_path_with_rows_past_the_first_tiles():
    """T = S = 384 with 128-row tiles: rows in the later tiles see keys from the earlier ones."""
    with attention_backend("fast"):
        q, k, v = random_qkv(11, (2,), 384, 384)
        output, _ = fast_attention(q, k, v, mask=create_causal_mask(384), need_weights=False)
        expected, _ = ref.attention_formula(q, k, v, np.tril(np.ones((384, 384))))
        np.testing.assert_allclose(output.data, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("lead, T, S", SHAPES[1:])
@pytest.mark.parametrize("masking", ["none", "causal", "padding"])
def test_large_scores_stay_exact(lead, T, S, masking):
    """Queries 40 times larger, whose exponentials overflow without the max-subtraction, on every tile layout."""
    with attention_backend("fast"):
        q, k, v = random_qkv(T + 3, lead, T, S)
        q = q * np.float32(40.0)
        mask = {"none": None, "causal": create_causal_mask(T, S), "padding": np.arange(S) < S - 7}[masking]
        keep = None if mask is None else np.tril(np.ones((T, S)), S - T) if masking == "causal" else mask
        output, weights = fast_attention(q, k, v, mask=mask)
        expected_output, expected_weights = ref.attention_formula(q, k, v, keep)
        np.testing.assert_allclose(output.data, expected_output, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_tiles_bounded_by_tile_scores(monkeypatch, causal):
    """With few scores allowed per tile, plain tiles hold few rows and causal tiles span few heads."""
    monkeypatch.setattr(kernel, "TILE_SCORES", 2 ** 12)
    tiles = []
    attend_tile = kernel.attend_tile
    monkeypatch.setattr(kernel, "attend_tile", lambda q, k, *rest: tiles.append(q.shape) or attend_tile(q, k, *rest))
    with attention_backend("fast"):
        q, k, v = random_qkv(11, (2, 3), 200, 400)
        keep = np.tril(np.ones((200, 400)), 200) if causal else None
        output, weights = fast_attention(q, k, v, mask=create_causal_mask(200, 400) if causal else None)
        expected_output, expected_weights = ref.attention_formula(q, k, v, keep)
        np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    if causal:   # 32 rows x 400 keys is more than 2**12 scores: one head per tile, six heads on one axis
        assert set(tiles) == {(1, 32, 8)} | {(1, 200 - 192, 8)}
    else:        # 2**12 // 400 = 10 rows per tile, one head each
        assert {shape[-2] for shape in tiles} == {10} and len(tiles) == 6 * 20


def test_extreme_scales_and_values_stay_finite():
    """A scale near float32's limit, and values so large that unshifted weights times them would overflow."""
    with attention_backend("fast"):
        rng = np.random.default_rng(12)
        q, k = (np.full((1, 512, 1), sign * 3e-19, dtype=np.float32) for sign in (1, -1))
        v = rng.normal(size=(1, 512, 4)).astype(np.float32)
        output, _ = fast_attention(q, k, v, scale=3e38, need_weights=False)
        np.testing.assert_allclose(output.data, ref.attention_formula(q, k, v, scale=3e38)[0], rtol=1e-4, atol=1e-5)

        q, k = np.ones((1, 512, 1), dtype=np.float32), np.full((1, 512, 1), 59.0, dtype=np.float32)
        v = np.full((1, 512, 2), 1e13, dtype=np.float32)       # scores of 59: e^59 times v would overflow
        output, _ = fast_attention(q, k, v, scale=1.0, need_weights=False)
        np.testing.assert_allclose(output.data, 1e13, rtol=1e-5)


def test_no_state_crosses_calls():
    """Arrays of different sizes and norms in turn, one changed in place: each call's result is its own."""
    small, large = random_qkv(13, (2,), 384, 384), random_qkv(14, (3,), 300, 520)
    q, k, v = small
    with attention_backend("fast"):
        for arrays in (small, large, small):
            output, weights = fast_attention(*arrays)
            expected_output, expected_weights = ref.attention_formula(*arrays)
            np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
        q *= np.float32(40.0)                           # changed in place: scores that overflow exp unshifted
        output, weights = fast_attention(q, k, v)
    expected_output, expected_weights = ref.attention_formula(q, k, v)
    np.testing.assert_allclose(output.data, expected_output, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weights.data, expected_weights, rtol=1e-4, atol=1e-4)


def test_the_kernel_keeps_no_state_but_its_pool():
    """No thread-locals, weak references or context variables in the kernel's source, and one global
    statement: the grading refusal's count, which a block raises and lowers; never a memory of an earlier
    call's data."""
    import inspect
    import re

    source = inspect.getsource(kernel)
    for pattern in (r"threading\.local", r"weakref", r"ContextVar", r"register_at_fork"):
        assert not re.search(pattern, source, flags=re.MULTILINE), pattern
    assert re.findall(r"^\s*global\s+(\w+)", source, flags=re.MULTILINE) == ["_refusals"]
    assert [name for name, value in vars(kernel).items() if isinstance(value, kernel.WorkerPool)] == ["POOL"]


def test_broadcast_leading_axes_and_scale():
    with attention_backend("fast"):
        rng = np.random.default_rng(4)
        q, k, v = rng.normal(size=(2, 2, 300, 8)), rng.normal(size=(1, 2, 500, 8)), rng.normal(size=(500, 4))
        output, _ = fast_attention(q, k, v, scale=0.2, need_weights=False)
        np.testing.assert_allclose(output.data, ref.attention_formula(q, k, v, scale=0.2)[0], rtol=RTOL, atol=ATOL)


def test_logits_near_1e5_single_query_and_empty_inputs():
    with attention_backend("fast"):
        q = np.array([[2e5, 0, 0, 0], [-2e5, 0, 0, 0]])
        k = np.array([[1.0, 0, 0, 0], [0.99999, 0, 0, 0], [0.5, 0, 0, 0]])
        v = np.arange(6.0).reshape(3, 2)
        output, _ = fast_attention(q, k, v)
        np.testing.assert_allclose(output.data, ref.attention_formula(q, k, v)[0], rtol=1e-4, atol=1e-5)
        q, k, v = random_qkv(5, (2,), 1, 6)
        output, _ = fast_attention(q, k, v, mask=create_causal_mask(1, 6))
        np.testing.assert_allclose(output.data, ref.attention_formula(q, k, v)[0], rtol=RTOL, atol=ATOL)
        output, weights = fast_attention(*random_qkv(6, (2,), 3, 0))
        assert output.shape == (2, 3, 8) and weights.shape == (2, 3, 0)
        np.testing.assert_array_equal(output.data, 0.0)
        assert fast_attention(*random_qkv(7, (0,), 3, 4))[0].shape == (0, 3, 8)


def test_layers_run_the_fast_kernel_correctly():
    with attention_backend("fast"):
        assert get_attention_backend() == "fast"
        q, k, v = random_qkv(8, (2, 3), 6, 9)
        mask = create_causal_mask(6, 9)
        output, weights = ScaledDotProductAttention(temperature=2.0)(q, k, v, mask=mask, return_attention_weights=True)
        expected_output, expected_weights = ref.attention_formula(q, k, v, np.tril(np.ones((6, 9)), 3),
                                                                scale=1 / (np.sqrt(8) * 2.0))
        assert isinstance(output, Tensor)
        np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)

        layer = MultiHeadAttention(16, 4, num_kv_heads=2, seed=0)
        x = np.random.default_rng(9).normal(size=(2, 6, 16))
        expected, expected_weights = ref.multihead(weights_of(layer), 4, 2, x, keep=ref.causal_mask(6))
        output, weights = layer(x, mask=create_causal_mask(6), return_attention_weights=True)
        np.testing.assert_allclose(output.data, expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)


def test_cached_decoding_on_the_fast_kernel():
    with attention_backend("fast"):
        layer = MultiHeadAttention(16, 4, num_kv_heads=2, seed=1)
        x = np.random.default_rng(10).normal(size=(2, 8, 16))
        full = layer(x, mask=create_causal_mask(8)).data
        cache = KVCache(max_batch_size=2, max_seq_length=8, num_heads=2, head_dim=4)
        steps = [layer(x[:, :5], kv_cache=cache).data] + [layer(x[:, t:t + 1], kv_cache=cache).data
                                                            for t in range(5, 8)]
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=RTOL, atol=ATOL)


def test_backend_switching():
    with attention_backend("fast"):
        assert set(ATTENTION_BACKENDS) == {"math", "fast"}
        with attention_backend("math"):
            assert get_attention_backend() == "math"
        assert get_attention_backend() == "fast"
        with pytest.raises(RuntimeError):
            with attention_backend("math"):
                raise RuntimeError("restored even on errors")
        assert get_attention_backend() == "fast"
        with pytest.raises(ValueError, match=r"attention backend must be one of \('math', 'fast'\), got 'flash'"):
            set_attention_backend("flash")
        assert get_attention_backend() == "fast"


ABLATIONS = [kernel.Techniques()] + [kernel.Techniques(**{name: False})
                                     for name in kernel.Techniques.__dataclass_fields__]


@pytest.mark.parametrize("techniques", ABLATIONS, ids=lambda t: ",".join(
    name for name, on in t.__dict__.items() if not on) or "all")
@pytest.mark.parametrize("masking", ["none", "causal", "padding"])
@pytest.mark.parametrize("after_threaded_blas", [False, True], ids=["alone", "in a layer"])
def test_every_technique_switched_off_gives_the_same_numbers(techniques, masking, after_threaded_blas):
    """The kernel with each technique switched off, on plain and few-row tile layouts, on the pool and,
    as inside a layer after threaded BLAS, on the caller with BLAS's threads."""
    for lead, T, S in SHAPES[1:]:
        q, k, v = random_qkv(T + 5, lead, T, S)
        keep = {"none": None, "causal": None, "padding": np.arange(S) < S - 7}[masking]
        offset = S - T if masking == "causal" else None
        output, weights = kernel.attention(q, k, v, keep, 1 / np.sqrt(8), offset, True, techniques=techniques,
                                           after_threaded_blas=after_threaded_blas)
        reference_keep = np.tril(np.ones((T, S)), S - T) if masking == "causal" else keep
        expected_output, expected_weights = ref.attention_formula(q, k, v, reference_keep)
        np.testing.assert_allclose(output, expected_output, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(weights, expected_weights, rtol=RTOL, atol=ATOL)


LAYER_CASES = ["self", "causal", "grouped causal", "multi-query padding", "per-head random", "3-D mask", "cross",
               "large, tiled", "large, padded"]


def _layer_case(name):
    """(num_kv_heads, query shape, key/value shape or None, mask) of a layer case, built when a test runs."""
    rng = np.random.default_rng(20)
    lengths = np.array([5, 9])
    return {
        "self": (4, (2, 9), None, None),
        "causal": (4, (2, 9), None, create_causal_mask(9)),
        "grouped causal": (2, (2, 9), None, create_causal_mask(9)),
        "multi-query padding": (1, (2, 9), None, (np.arange(9)[None, :] < lengths[:, None])[:, None, None]),
        "per-head random": (2, (2, 9), None, rng.random((2, 4, 9, 9)) > 0.4),
        "3-D mask": (4, (2, 9), None, rng.random((2, 9, 9)) > 0.4),
        "cross": (2, (2, 6), (2, 11), None),
        "large, tiled": (2, (2, 300), None, create_causal_mask(300)),
        "large, padded": (4, (2, 300), None, (np.arange(300) < 280)[None, None, None]),
    }[name]


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("techniques", [None, kernel.Techniques(threads=False),
                                        kernel.Techniques(warm_blas_threads=False)],
                         ids=["all", "no pool", "pool in the layer"])
def test_multihead_layer_on_the_kernel_equals_the_math_path(case, techniques):
    num_kv_heads, x_shape, kv_shape, mask = _layer_case(case)
    rng = np.random.default_rng(21)
    layer = MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, seed=3).eval()
    x = rng.normal(size=x_shape + (16,)).astype(np.float32)
    kv = None if kv_shape is None else rng.normal(size=kv_shape + (16,)).astype(np.float32)
    with attention_backend("math"):
        expected, expected_weights = layer(x, kv, kv, mask=mask, return_attention_weights=True)
    with attention_backend("fast", techniques=techniques):
        output, weights = layer(x, kv, kv, mask=mask, return_attention_weights=True)
        assert layer(x, kv, kv, mask=mask).shape == output.shape
    np.testing.assert_allclose(output.data, expected.data, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(weights.data, expected_weights.data, rtol=RTOL, atol=ATOL)


def test_the_pool_runs_outside_layers_and_blas_threads_inside(monkeypatch):
    """A multi-head layer's projections leave BLAS's threads spinning, so its core runs on the caller with
    BLAS's threads; a core called on its own, or with BLAS on one thread (held so by the kernel's pool, or
    limited so by the user), uses the pool."""
    from threadpoolctl import threadpool_limits

    pooled = []
    real_map = kernel.POOL.map
    monkeypatch.setattr(kernel.POOL, "map", lambda function, tasks, threads=True: (
        pooled.append(threads), real_map(function, tasks, threads))[1])
    layer = MultiHeadAttention(16, 4, seed=3).eval()
    x = np.random.default_rng(23).normal(size=(2, 300, 16)).astype(np.float32)   # 2 x 4 x 300 x 300: tiled
    q, k, v = random_qkv(23, (2, 4), 300, 300)
    with attention_backend("fast"):
        layer(x)
        fast_attention(q, k, v)
        with kernel.POOL.blas_on_one_thread():
            layer(x)
        with threadpool_limits(1, user_api="blas"):
            layer(x)
    with attention_backend("fast", kernel.Techniques(warm_blas_threads=False)):
        layer(x)
    with attention_backend("fast", kernel.Techniques(threads=False)):
        fast_attention(q, k, v)
    assert pooled == [False, True, True, True, True, False], (
        f"pool used by: the layer, the core alone, the layer with BLAS held, the layer with BLAS limited by the "
        f"user, the layer without the rule, no pool at all: {pooled}")


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("with_mask", [False, True])
def test_cached_decoding_on_the_kernel_equals_the_math_path(num_kv_heads, with_mask):
    """Prefill then one-token steps, rows of equal and of different lengths, the cache left as the lesson's."""
    rng = np.random.default_rng(22)
    layer = MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, seed=4).eval()
    x = rng.normal(size=(2, 12, 16)).astype(np.float32)
    caches, outputs = {}, {}
    for backend in ("math", "fast"):
        cache = KVCache(max_batch_size=2, max_seq_length=14, num_heads=num_kv_heads, head_dim=4)
        cache.update(1, np.ones((num_kv_heads, 2, 4)), np.ones((num_kv_heads, 2, 4)))   # row 1 starts longer
        with attention_backend(backend):
            steps = [layer(x[:, :5], kv_cache=cache).data]
            for t in range(5, 12):
                mask = (np.arange(int(cache.cache_lengths.max()) + 1) != 3)[None, None, None] if with_mask else None
                steps.append(layer(x[:, t:t + 1], kv_cache=cache, mask=mask).data)
            cache.reset(1)
            steps.append(layer(x[:, :1], kv_cache=cache).data)                 # rows of different lengths again
        caches[backend], outputs[backend] = cache, np.concatenate(steps, axis=1)
    np.testing.assert_allclose(outputs["fast"], outputs["math"], rtol=RTOL, atol=ATOL)
    for name in ("cached_keys", "cached_values", "cache_lengths", "is_active"):
        np.testing.assert_allclose(getattr(caches["fast"], name), getattr(caches["math"], name), rtol=RTOL, atol=ATOL)


def test_long_causal_tiles_span_groups_of_heads_on_the_layer_layout(monkeypatch):
    """A grouped layer's 5-D heads with TILE_SCORES so small that causal tiles take one head each."""
    monkeypatch.setattr(kernel, "TILE_SCORES", 2 ** 12)
    layer = MultiHeadAttention(32, 8, num_kv_heads=2, seed=5).eval()
    x = np.random.default_rng(23).normal(size=(2, 300, 32)).astype(np.float32)
    with attention_backend("math"):
        expected = layer(x, mask=create_causal_mask(300)).data
    with attention_backend("fast"):
        output = layer(x, mask=create_causal_mask(300)).data
    np.testing.assert_allclose(output, expected, rtol=RTOL, atol=ATOL)


def test_under_fast_a_bug_planted_in_the_students_multihead_forward_changes_the_output(monkeypatch):
    """The fast backend replaces only the attention core: the student's forward still runs, bugs and all.

    The bug is the mutation table's kind: the keys projected with w_v instead of w_k, planted in the
    solution's own source and put behind the same boundary.
    """
    import inspect
    import textwrap

    from tinytorch.core import attention as lesson
    from tinytorch.core import _attention_checks as boundary

    forward = MultiHeadAttention.forward.student_function
    source = textwrap.dedent(inspect.getsource(forward))
    assert source.count("key @ self.w_k.data") == 1, "the solution's forward projects the keys once"
    namespace = dict(vars(lesson))
    exec(compile(source.replace("key @ self.w_k.data", "key @ self.w_v.data"), "planted_bug", "exec"), namespace)
    x = np.random.default_rng(24).normal(size=(2, 7, 16)).astype(np.float32)
    layer = MultiHeadAttention(16, 4, seed=6).eval()
    correct = {}
    for backend in ("math", "fast"):
        with attention_backend(backend):
            correct[backend] = layer(x, mask=create_causal_mask(7)).data
    monkeypatch.setattr(MultiHeadAttention, "forward", boundary.checked_method(namespace["forward"],
                                                                              "MultiHeadAttention.forward"))
    for backend in ("math", "fast"):
        with attention_backend(backend):
            buggy = layer(x, mask=create_causal_mask(7)).data
        assert np.abs(buggy - correct[backend]).max() > 1e-2, f"under {backend!r} the planted bug changed nothing"
        np.testing.assert_allclose(correct["fast"], correct["math"], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- the techniques, and the machine's name
@pytest.mark.parametrize("features, level", [
    ({"AVX2": True, "AVX512F": True, "AVX512_SKX": True}, "AVX-512"),
    ({"AVX2": True, "AVX512F": True, "AVX512_SKX": False}, "AVX2"),     # NumPy's AVX-512 groups disabled
    ({"AVX2": True}, "AVX2"),
    ({"ASIMD": True, "NEON": True}, "NEON"),
    ({"SSE2": True}, "baseline"),
])
def test_the_simd_level_is_named_from_numpys_cpu_features(features, level):
    assert kernel.simd_level(features) == level


def test_every_technique_is_on_unless_a_caller_passes_techniques():
    from tinytorch.core import _attention_backend as backend

    assert all(vars(kernel.Techniques()).values()), "each technique pays on some class and loses on none"
    override = kernel.Techniques(causal_tiles=False, threads=False)
    with attention_backend("fast", techniques=override):
        assert backend._backend_techniques() is override
    with attention_backend("fast"):
        assert backend._backend_techniques() is None                # None: every technique
    with pytest.raises(TypeError, match="techniques must be a Techniques or None, got dict"):
        set_attention_backend("fast", techniques={"threads": False})


AVX512_GROUPS = ("AVX512F AVX512CD AVX512VL AVX512BW AVX512DQ AVX512_SKX X86_V4 AVX512_CLX AVX512_CNL AVX512_ICL "
                 "AVX512_SPR")    # NumPy 2.4 dispatches to the X86_V4 group too: disabling AVX512_SKX alone is not enough


def test_a_process_with_numpys_avx512_groups_disabled_is_named_avx2():
    """The AVX2 class as the README simulates it: the bench's machine line must say AVX2, not AVX-512."""
    import os
    import subprocess
    import sys

    code = "from tinytorch.core import _attention_kernel as k; f = k.cpu_features(); print(k.simd_level(f), bool(f.get('AVX2')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "NPY_DISABLE_CPU_FEATURES": AVX512_GROUPS})
    level, has_avx2 = done.stdout.split()
    assert level != "AVX-512" and (level == "AVX2" or has_avx2 == "False"), done.stdout   # NEON, baseline: as they are

"""math_attention and the multi-head layer against the float64 reference on random small cases.

These need the reference itself, so they run in the course repository only.
"""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tinytorch.core.attention import MultiHeadAttention, create_causal_mask, math_attention

TOL = dict(rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(0, 3), H=st.integers(1, 4), T=st.integers(1, 12),
       S=st.integers(1, 12), d_k=st.integers(1, 8), d_v=st.integers(1, 8),
       form=st.sampled_from(["none", "random", "causal"]), scale=st.sampled_from([None, 0.3, 2.0]))
def test_math_attention_matches_float64_reference(ref, seed, B, H, T, S, d_k, d_v, form, scale):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((B, H, T, d_k), (B, H, S, d_k), (B, H, S, d_v)))
    mask = {"none": None, "random": rng.random((B, H, T, S)) < 0.6, "causal": create_causal_mask(T, S)}[form]
    output, weights = math_attention(q, k, v, mask, scale)
    keep = None if mask is None else np.asarray(getattr(mask, "data", mask)) != 0
    expected, expected_weights = ref.attention_formula(q, k, v, keep, scale)
    np.testing.assert_allclose(output.data, expected, **TOL)
    np.testing.assert_allclose(weights.data, expected_weights, **TOL)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 2**32 - 1), dims=st.sampled_from([(8, 2, 1), (8, 4, 2), (12, 6, 3), (16, 4, 4)]),
       B=st.integers(1, 3), T=st.integers(1, 8), S=st.integers(1, 8), masked=st.booleans())
def test_multihead_attention_matches_float64_reference(ref, seed, dims, B, T, S, masked):
    E, H, Hkv = dims
    rng = np.random.default_rng(seed)
    layer = MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=seed % 1000)
    x_q, x_kv = rng.standard_normal((B, T, E)).astype(np.float32), rng.standard_normal((B, S, E)).astype(np.float32)
    mask = rng.random((T, S)) < 0.6 if masked else None
    output, weights = layer(x_q, x_kv, mask=mask, return_attention_weights=True)
    parameters = [w.data for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]
    expected, expected_weights = ref.multihead(parameters, H, Hkv, x_q, x_kv, x_kv, mask)
    np.testing.assert_allclose(output.data, expected, **TOL)
    np.testing.assert_allclose(weights.data, expected_weights, **TOL)

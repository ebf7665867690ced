"""Part 5, `MultiHeadAttention`: against a head-by-head float64 reference built from the layer's weights."""
import re

import numpy as np
import pytest

from tinytorch.core.attention import MultiHeadAttention, create_causal_mask
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-5  # float32 layer against a float64 reference


def reference_mha(layer, x_q, x_k=None, x_v=None, keep=None):
    """Project, attend one head at a time (query head h reads kv head h // group), concatenate, project.

    `keep` broadcasts to (B, H, T, S). Returns (output (B, T, E), weights (B, H, T, S)) in float64.
    """
    x_q = np.asarray(x_q, dtype=np.float64)
    x_k = x_q if x_k is None else np.asarray(x_k, dtype=np.float64)
    x_v = x_k if x_v is None else np.asarray(x_v, dtype=np.float64)
    w_q, w_k, w_v, w_o = (w.data.astype(np.float64) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o))
    H, hd = layer.num_heads, layer.head_dim
    group = H // layer.num_kv_heads
    (B, T, E), S = x_q.shape, x_k.shape[1]
    keep = np.ones((B, H, T, S), bool) if keep is None else np.broadcast_to(np.asarray(keep) != 0, (B, H, T, S))
    output, weights = np.zeros((B, T, E)), np.zeros((B, H, T, S))
    for b in range(B):
        q_all, k_all, v_all = x_q[b] @ w_q, x_k[b] @ w_k, x_v[b] @ w_v
        context = []
        for h in range(H):
            g = h // group
            q, k, v = q_all[:, h * hd:(h + 1) * hd], k_all[:, g * hd:(g + 1) * hd], v_all[:, g * hd:(g + 1) * hd]
            scores = q @ k.T / np.sqrt(hd)
            for i in range(T):
                allowed = keep[b, h, i]
                if allowed.any():
                    exps = np.where(allowed, np.exp(scores[i] - scores[i][allowed].max()), 0.0)
                    weights[b, h, i] = exps / exps.sum()
            context.append(weights[b, h] @ v)
        output[b] = np.concatenate(context, axis=1) @ w_o
    return output, weights


def check(layer, x_q, x_k=None, x_v=None, mask=None, keep=None):
    """Run the layer with `mask` and compare output and weights with the reference using `keep`."""
    output, weights = layer(x_q, x_k, x_v, mask=mask, return_attention_weights=True)
    expected_output, expected_weights = reference_mha(layer, x_q, x_k, x_v, keep if keep is not None else mask)
    assert isinstance(output, Tensor) and isinstance(weights, Tensor)
    assert output.dtype == np.float32 and weights.dtype == np.float32
    assert output.shape == expected_output.shape and weights.shape == expected_weights.shape
    np.testing.assert_allclose(weights.data, expected_weights, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL)
    return output.data, weights.data


# ---------------------------------------------------------------- values
@pytest.mark.grades("test-multihead-attention")
@pytest.mark.parametrize("E, H, Hkv", [(8, 2, None), (12, 3, 3), (16, 4, 2), (16, 4, 1), (6, 1, None), (8, 8, 4)])
def test_self_attention_matches_reference(E, H, Hkv):
    layer = MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=E + H)
    x = np.random.default_rng(0).normal(size=(2, 5, E))
    _, weights = check(layer, x)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(layer(x).data, layer(x, x, x).data, rtol=0, atol=0)   # key, value default to query


@pytest.mark.grades("test-multihead-attention")
@pytest.mark.parametrize("Hkv", [None, 2, 1])
def test_cross_attention_with_other_lengths(Hkv):
    """Queries of length 3 attend to 6 keys; keys and values are different inputs."""
    rng = np.random.default_rng(1)
    layer = MultiHeadAttention(16, 4, num_kv_heads=Hkv, seed=2)
    check(layer, rng.normal(size=(2, 3, 16)), rng.normal(size=(2, 6, 16)), rng.normal(size=(2, 6, 16)))


@pytest.mark.grades("test-multihead-attention")
@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 4, 6), (1, 4, 6), (2, 4, 4, 6), (1, 4, 1, 6), (2, 1, 4, 6)])
def test_masks_of_every_layout(mask_shape):
    """(T, S) for all, (B, T, S) per batch row, 4-D broadcast over (B, H, T, S)."""
    rng = np.random.default_rng(3)
    layer = MultiHeadAttention(16, 4, seed=4)
    x_q, x_kv = rng.normal(size=(2, 4, 16)), rng.normal(size=(2, 6, 16))
    keep = rng.random(mask_shape) < 0.5
    keep[..., 3] = True
    keep_4d = keep[:, None] if keep.ndim == 3 else keep                        # (B, 1, T, S)
    check(layer, x_q, x_kv, x_kv, mask=keep, keep=keep_4d)
    check(layer, x_q, x_kv, x_kv, mask=Tensor(keep.astype(np.float32)), keep=keep_4d)


@pytest.mark.grades("test-multihead-attention")
def test_per_batch_masks_are_not_mixed_up():
    """A (B, T, S) mask hiding different keys in each batch row: row b only reads its own mask."""
    rng = np.random.default_rng(5)
    layer = MultiHeadAttention(8, 2, seed=6)
    x = rng.normal(size=(3, 4, 8))
    keep = np.ones((3, 4, 4), bool)
    keep[0, :, 0] = False
    keep[1, :, 1:] = False
    keep[2, :, 2] = False
    _, weights = check(layer, x, mask=keep, keep=keep[:, None])
    assert np.all(weights[0, :, :, 0] == 0) and np.all(weights[1, :, :, 1:] == 0) and np.all(weights[2, :, :, 2] == 0)
    np.testing.assert_allclose(weights[1, :, :, 0], 1.0, rtol=1e-6)


@pytest.mark.grades("test-multihead-attention")
@pytest.mark.parametrize("Hkv", [None, 2])
def test_causal_mask_ignores_future_tokens(Hkv):
    rng = np.random.default_rng(7)
    layer = MultiHeadAttention(16, 4, num_kv_heads=Hkv, seed=8)
    x = rng.normal(size=(2, 6, 16))
    mask = create_causal_mask(6)
    output, _ = check(layer, x, mask=mask, keep=np.tril(np.ones((6, 6))))
    changed = x.copy()
    changed[:, 4:] = rng.normal(size=(2, 2, 16)) * 10
    np.testing.assert_allclose(layer(changed, mask=mask).data[:, :4], output[:, :4], rtol=1e-5, atol=1e-6)


@pytest.mark.grades("test-multihead-attention")
def test_fully_masked_query_gives_zero_output():
    rng = np.random.default_rng(9)
    layer = MultiHeadAttention(8, 2, seed=10)
    keep = np.ones((2, 3, 5), bool)
    keep[0, 1] = False
    output, weights = check(layer, rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 5, 8)),
                            rng.normal(size=(2, 5, 8)), mask=keep, keep=keep[:, None])
    np.testing.assert_array_equal(weights[0, :, 1], 0.0)
    np.testing.assert_array_equal(output[0, 1], 0.0)
    assert np.all(np.isfinite(output))


@pytest.mark.grades("test-multihead-attention")
def test_forward_reads_the_current_weights():
    """In-place updates of w_*.data take effect: doubling w_o doubles the output; w_q = 0 gives uniform weights."""
    rng = np.random.default_rng(11)
    layer = MultiHeadAttention(8, 2, seed=12)
    x = rng.normal(size=(2, 5, 8))
    before = layer(x).data
    layer.w_o.data *= 2
    np.testing.assert_allclose(layer(x).data, 2 * before, rtol=1e-5, atol=1e-6)
    layer.w_q.data[...] = 0.0
    _, weights = check(layer, x)
    np.testing.assert_allclose(weights, 1 / 5, rtol=1e-6)
    for parameter in layer.parameters:
        parameter.data[...] = rng.normal(size=parameter.shape)
    check(layer, x)


@pytest.mark.grades("test-multihead-attention")
def test_identity_projections_reduce_to_attention_on_feature_slices():
    """With every weight the identity, head h is plain attention on features h*hd..(h+1)*hd-1 of x itself."""
    rng = np.random.default_rng(13)
    layer = MultiHeadAttention(4, 2, seed=0)
    for parameter in layer.parameters:
        parameter.data[...] = np.eye(4)
    x = rng.normal(size=(1, 3, 4))
    expected = np.zeros((3, 4))
    for h in range(2):
        part = x[0][:, 2 * h:2 * h + 2]
        scores = part @ part.T / np.sqrt(2)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        expected[:, 2 * h:2 * h + 2] = (weights / weights.sum(axis=1, keepdims=True)) @ part
    np.testing.assert_allclose(layer(x).data[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.grades("test-multihead-attention")
def test_seeded_layers_agree():
    x = np.random.default_rng(14).normal(size=(2, 4, 8))
    a, b, c = MultiHeadAttention(8, 2, seed=3), MultiHeadAttention(8, 2, seed=3), MultiHeadAttention(8, 2, seed=4)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    assert not np.allclose(a(x).data, c(x).data)
    check(a, x)


@pytest.mark.grades("test-multihead-attention")
def test_dropout_only_in_training():
    x = np.random.default_rng(15).normal(size=(2, 6, 8))
    layer = MultiHeadAttention(8, 2, dropout=0.5, seed=5)
    assert layer.training is True
    assert not np.allclose(layer(x).data, reference_mha(layer, x)[0], rtol=RTOL, atol=ATOL)
    assert layer.eval() is layer and layer.training is False
    check(layer, x)


@pytest.mark.grades("test-multihead-attention")
@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_float64_and_integer_inputs_give_float32(dtype):
    layer = MultiHeadAttention(8, 2, seed=16)
    x = np.random.default_rng(16).integers(-2, 3, size=(2, 3, 8)).astype(dtype)
    output = layer(x)
    assert output.dtype == np.float32
    np.testing.assert_allclose(output.data, reference_mha(layer, x)[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer(Tensor(x)).data, output.data)


@pytest.mark.grades("test-multihead-attention")
def test_single_token_empty_batch_and_empty_keys():
    rng = np.random.default_rng(17)
    layer = MultiHeadAttention(8, 2, seed=18)
    x = rng.normal(size=(3, 1, 8))
    _, weights = check(layer, x)                                                # T = 1: weight 1 on itself
    np.testing.assert_allclose(weights, 1.0)
    output, weights = layer(np.zeros((0, 4, 8)), return_attention_weights=True)
    assert output.shape == (0, 4, 8) and weights.shape == (0, 2, 4, 4)
    output, weights = layer(rng.normal(size=(2, 3, 8)), np.zeros((2, 0, 8)), np.zeros((2, 0, 8)),
                            return_attention_weights=True)
    assert output.shape == (2, 3, 8) and weights.shape == (2, 2, 3, 0) and output.dtype == np.float32
    np.testing.assert_array_equal(output.data, 0.0)


# ---------------------------------------------------------------- construction (provided code, not graded)
def test_attributes_shapes_and_parameters():
    layer = MultiHeadAttention(12, 4, num_kv_heads=2, seed=0)
    assert (layer.embed_dim, layer.num_heads, layer.num_kv_heads, layer.head_dim) == (12, 4, 2, 3)
    assert layer.w_q.shape == (12, 12) and layer.w_o.shape == (12, 12)
    assert layer.w_k.shape == (12, 6) and layer.w_v.shape == (12, 6)
    assert all(isinstance(w, Tensor) and w.dtype == np.float32 for w in layer.parameters)
    assert [id(w) for w in layer.parameters] == [id(w) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]
    assert [id(w) for w in layer.parameters()] == [id(w) for w in layer.parameters]
    assert MultiHeadAttention(8, 2).num_kv_heads == 2


def test_initial_scale_is_one_over_sqrt_embed_dim():
    layer = MultiHeadAttention(256, 4, seed=1)
    values = np.concatenate([w.data.ravel() for w in layer.parameters])
    np.testing.assert_allclose(values.std(), 1 / 16, rtol=0.02)                # 262144 draws
    expected = np.random.default_rng(1).standard_normal((256, 256), dtype=np.float32) * np.float32(1 / 16)
    np.testing.assert_allclose(layer.w_q.data, expected, rtol=1e-6)


def test_memory_usage():
    usage = MultiHeadAttention(16, 4, num_kv_heads=2).get_memory_usage()
    count = 16 * 16 * 2 + 16 * 8 * 2
    assert usage["parameter_count"] == count
    assert usage["parameter_mb"] == count * 4 / 2**20
    assert usage["parameters_per_head"] == count / 4
    assert usage["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 4
    assert usage["kv_cache_saving"] == 2


# ---------------------------------------------------------------- errors (provided validation, not graded)
def test_bad_construction_raises():
    with pytest.raises(ValueError, match="embed_dim=10 is not divisible by num_heads=3"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        MultiHeadAttention(8, 0)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got -2"):
        MultiHeadAttention(8, -2)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="embed_dim must be >= 1, got 0"):
        MultiHeadAttention(0, 1)
    with pytest.raises(TypeError, match="embed_dim must be an integer"):
        MultiHeadAttention(8.0, 2)


def test_bad_inputs_raise():
    layer = MultiHeadAttention(8, 2, seed=0)
    with pytest.raises(ValueError, match="query has embed_dim=7 but the layer expects 8"):
        layer(np.zeros((1, 3, 7)))
    with pytest.raises(ValueError, match="key has embed_dim=6 but the layer expects 8"):
        layer(np.zeros((1, 3, 8)), np.zeros((1, 4, 6)), np.zeros((1, 4, 8)))
    message = re.escape("query must have shape (batch, seq, embed_dim=8), got shape (3, 8)")
    with pytest.raises(ValueError, match=message):
        layer(np.zeros((3, 8)))
    with pytest.raises(ValueError, match="value has seq_k=5 but key has seq_k=4"):
        layer(np.zeros((1, 3, 8)), np.zeros((1, 4, 8)), np.zeros((1, 5, 8)))
    with pytest.raises(ValueError, match="batch sizes differ: query 2, key 1, value 1"):
        layer(np.zeros((2, 3, 8)), np.zeros((1, 4, 8)), np.zeros((1, 4, 8)))


def test_masks_that_do_not_fit_raise():
    layer = MultiHeadAttention(8, 2, seed=0)
    x = np.zeros((2, 3, 8))
    with pytest.raises(ValueError, match=re.escape("mask of shape (4, 4) does not broadcast to scores (2, 2, 3, 3)")):
        layer(x, mask=np.ones((4, 4)))
    with pytest.raises(ValueError, match=re.escape("needs batch 2 or 1, got mask of shape (3, 3, 3)")):
        layer(x, mask=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="got shape \\(3,\\)"):
        layer(x, mask=np.ones(3))

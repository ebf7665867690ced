"""Part 5c, `MultiHeadAttention`: the initialisation by its properties, the forward pass against the
float64 head-by-head reference.

How the weights start is the student's decision, so the forward tests give the layer the weights the
reference draws (`with_weights`) and compare outputs; the initialisation is graded by what every
sensible choice satisfies: the shapes, a spread that keeps a projection at its input's scale, and
seeds that repeat. Most graded cases carry a mask with a fully masked row, since a layer that drops
the user's mask is a realistic bug.
"""
import re

import numpy as np
from expected import weights_of, with_weights
import pytest

from tinytorch.core.attention import MultiHeadAttention, create_causal_mask, create_padding_mask
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-5  # float32 layer against a float64 reference
GRADES = pytest.mark.grades("test-multihead-attention")


def random_keep(rng, shape):
    """A random mask with the first query row fully masked and the second fully open."""
    keep = rng.random(shape) < 0.5
    keep[..., 0, :], keep[..., 1, :] = False, True
    return keep


def check(ref, case, seed, layer, x_q, x_k=None, x_v=None, mask=None, keep=None):
    """Run the layer and compare with the reference built from the seeded weights; returns (output, weights)."""
    with_weights(layer, seed)
    output, weights = layer(x_q, x_k, x_v, mask=mask, return_attention_weights=True)
    expected_weights = ref.init_weights(seed, layer.embed_dim, layer.num_heads, layer.num_kv_heads)
    expected_output, expected_attention = ref.multihead(expected_weights, layer.num_heads, layer.num_kv_heads,
                                                        x_q, x_k, x_v, keep if keep is not None else mask)
    assert isinstance(output, Tensor) and isinstance(weights, Tensor), case
    assert output.dtype == np.float32 and weights.dtype == np.float32, case
    assert output.shape == expected_output.shape and weights.shape == expected_attention.shape, (
        f"{case}: shapes {output.shape}, {weights.shape}; expected {expected_output.shape}, {expected_attention.shape}")
    np.testing.assert_allclose(weights.data, expected_attention, rtol=RTOL, atol=ATOL, err_msg=f"{case}: weights")
    np.testing.assert_allclose(output.data, expected_output, rtol=RTOL, atol=ATOL, err_msg=f"{case}: output")
    return output.data, weights.data


# ---------------------------------------------------------------- values
@GRADES
@pytest.mark.parametrize("E, H, Hkv", [(8, 2, None), (12, 3, 3), (16, 4, 2), (8, 8, 4)])
def test_masked_self_attention_matches_reference(ref, E, H, Hkv):
    rng = np.random.default_rng(E + H)
    layer = MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=E + H)
    x = rng.normal(size=(2, 5, E))
    check(ref, f"E={E}, H={H}, Hkv={Hkv}, (T, S) mask", E + H, layer, x, mask=random_keep(rng, (5, 5)))


@GRADES
@pytest.mark.parametrize("Hkv", [None, 2])
def test_masked_cross_attention_with_other_lengths(ref, Hkv):
    """Queries of length 3 attend to 6 keys; keys and values are different inputs."""
    rng = np.random.default_rng(1)
    layer = MultiHeadAttention(16, 4, num_kv_heads=Hkv, seed=2)
    x_q, x_k, x_v = rng.normal(size=(2, 3, 16)), rng.normal(size=(2, 6, 16)), rng.normal(size=(2, 6, 16))
    check(ref, f"cross-attention 3 -> 6, Hkv={Hkv}", 2, layer, x_q, x_k, x_v, mask=random_keep(rng, (3, 6)))


@GRADES
@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 4, 6), (1, 4, 6), (2, 4, 4, 6), (2, 1, 4, 6)])
def test_masks_of_every_layout(ref, mask_shape):
    """(T, S) for all, (B, T, S) per batch row, 4-D broadcast over (B, H, T, S)."""
    rng = np.random.default_rng(3)
    layer = MultiHeadAttention(16, 4, seed=4)
    x_q, x_kv = rng.normal(size=(2, 4, 16)), rng.normal(size=(2, 6, 16))
    keep = random_keep(rng, mask_shape)
    keep_4d = keep[:, None] if keep.ndim == 3 else keep                        # (B, 1, T, S)
    check(ref, f"mask of shape {mask_shape}", 4, layer, x_q, x_kv, x_kv, mask=keep, keep=keep_4d)


@GRADES
def test_per_batch_masks_are_not_mixed_up(ref):
    """A (B, T, S) mask hiding different keys in each batch row: row b only reads its own mask."""
    rng = np.random.default_rng(5)
    layer = MultiHeadAttention(8, 2, seed=6)
    x = rng.normal(size=(3, 4, 8))
    keep = np.ones((3, 4, 4), bool)
    keep[0, :, 0] = False
    keep[1, :, 1:] = False
    keep[2, :, 2] = False
    check(ref, "per-batch (3, 4, 4) mask", 6, layer, x, mask=keep, keep=keep[:, None])


@GRADES
@pytest.mark.parametrize("Hkv", [None, 2])
def test_causal_mask_matches_reference(ref, Hkv):
    rng = np.random.default_rng(7)
    layer = MultiHeadAttention(16, 4, num_kv_heads=Hkv, seed=8)
    check(ref, f"causal (6, 6), Hkv={Hkv}", 8, layer, rng.normal(size=(2, 6, 16)), mask=create_causal_mask(6),
          keep=ref.causal_mask(6))


@GRADES
def test_identity_projections_reduce_to_attention_on_feature_slices(ref):
    """With every weight the identity, head h is plain attention on features h*hd..(h+1)*hd-1 of x itself."""
    rng = np.random.default_rng(13)
    layer = MultiHeadAttention(4, 2, seed=0)
    for parameter in layer.parameters:
        parameter.data[...] = np.eye(4)
    x = rng.normal(size=(1, 3, 4))
    expected = np.zeros((3, 4))
    for h in range(2):
        expected[:, 2 * h:2 * h + 2] = ref.attention(x[0][:, 2 * h:2 * h + 2], x[0][:, 2 * h:2 * h + 2],
                                                     x[0][:, 2 * h:2 * h + 2])[0]
    np.testing.assert_allclose(layer(x).data[0], expected, rtol=1e-5, atol=1e-6,
                               err_msg="identity projections, 2 heads of width 2")


@GRADES
def test_forward_reads_the_current_weights(ref):
    """In-place updates of w_*.data take effect."""
    rng = np.random.default_rng(11)
    layer = with_weights(MultiHeadAttention(8, 2, num_kv_heads=1, seed=12), 12)
    for parameter in layer.parameters:
        parameter.data[...] = rng.normal(size=parameter.shape)
    x = rng.normal(size=(2, 5, 8))
    expected, _ = ref.multihead(weights_of(layer), 2, 1, x)
    np.testing.assert_allclose(layer(x).data, expected, rtol=RTOL, atol=ATOL, err_msg="after new weights")


# ---------------------------------------------------------------- the initialisation, by its properties
INIT = pytest.mark.grades("test-multihead-init")


@INIT
@pytest.mark.parametrize("E, H, Hkv", [(256, 8, None), (256, 8, 2), (192, 4, 1)])
def test_weights_have_the_projection_shapes_and_keep_the_input_scale(E, H, Hkv):
    layer = MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=1)
    kv = (Hkv or H) * (E // H)
    shapes = {"w_q": (E, E), "w_k": (E, kv), "w_v": (E, kv), "w_o": (E, E)}
    for name, shape in shapes.items():
        weight = getattr(layer, name)
        assert isinstance(weight, Tensor) and weight.data.dtype == np.float32, f"{name}: a float32 Tensor"
        assert weight.data.shape == shape, f"E={E}, H={H}, Hkv={Hkv}: {name} has shape {weight.data.shape}, expected {shape}"
        assert np.all(np.isfinite(weight.data)) and weight.data.std() > 0, f"{name}: finite and not constant"
    assert [w is getattr(layer, name) for w, name in zip(layer.parameters, shapes)] == [True] * 4, \
        "parameters lists w_q, w_k, w_v, w_o, the layer's own Tensors"
    x = np.random.default_rng(2).standard_normal((4, 16, E))                  # unit variance
    for name in shapes:
        spread = (x @ getattr(layer, name).data).std()
        assert 0.5 < spread < 1.6, (f"E={E}: x @ {name} of a unit-variance x has standard deviation {spread:.3f}; "
                                    "scale the weights so that a projection keeps its input's scale (about 1)")


@INIT
def test_the_same_seed_gives_the_same_weights_and_another_seed_others():
    first, again, other = (MultiHeadAttention(32, 4, num_kv_heads=2, seed=seed) for seed in (7, 7, 8))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        np.testing.assert_array_equal(getattr(first, name).data, getattr(again, name).data, err_msg=f"{name}, seed 7")
        assert not np.allclose(getattr(first, name).data, getattr(other, name).data), f"{name}: seeds 7 and 8 agree"
    assert (first.num_heads, first.num_kv_heads, first.head_dim, first.embed_dim) == (4, 2, 8, 32)
    layer = MultiHeadAttention(16, 4, dropout=0.25, seed=0)
    assert layer.dropout == 0.25 and layer.attention.dropout == 0.25, "the inner attention gets the dropout"
    assert MultiHeadAttention(16, 4, block_size=8).attention.block_size == 8, "the inner attention gets the block size"


# ---------------------------------------------------------------- robustness (not graded)
def test_unmasked_layers_of_every_shape_match_reference(ref):
    rng = np.random.default_rng(0)
    for E, H, Hkv in [(6, 1, None), (16, 4, 1), (8, 8, 8)]:
        layer = MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=E)
        x = rng.normal(size=(2, 5, E))
        check(ref, f"E={E}, H={H}, Hkv={Hkv}", E, layer, x)
        np.testing.assert_array_equal(layer(x).data, layer(x, x, x).data)      # key, value default to query


def test_seeded_layers_agree():
    x = np.random.default_rng(14).normal(size=(2, 4, 8))
    a, b, c = MultiHeadAttention(8, 2, seed=3), MultiHeadAttention(8, 2, seed=3), MultiHeadAttention(8, 2, seed=4)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    assert not np.allclose(a(x).data, c(x).data)


def test_dropout_only_in_training(ref):
    x = np.random.default_rng(15).normal(size=(2, 6, 8))
    layer = with_weights(MultiHeadAttention(8, 2, dropout=0.5, seed=5), 5)
    expected, _ = ref.multihead(weights_of(layer), 2, 2, x)
    assert layer.training is True
    assert not np.allclose(layer(x).data, expected, rtol=RTOL, atol=ATOL)
    assert layer.eval() is layer and layer.training is False
    np.testing.assert_allclose(layer(x).data, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_float64_and_integer_inputs_give_float32(ref, dtype):
    layer = with_weights(MultiHeadAttention(8, 2, seed=16), 16)
    x = np.random.default_rng(16).integers(-2, 3, size=(2, 3, 8)).astype(dtype)
    output = layer(x)
    assert output.dtype == np.float32
    np.testing.assert_allclose(output.data, ref.multihead(weights_of(layer), 2, 2, x)[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer(Tensor(x)).data, output.data)


def test_single_token_empty_batch_and_empty_keys(ref):
    rng = np.random.default_rng(17)
    layer = MultiHeadAttention(8, 2, seed=18)
    _, weights = check(ref, "one token", 18, layer, rng.normal(size=(3, 1, 8)))   # T = 1: weight 1 on itself
    np.testing.assert_allclose(weights, 1.0)
    output, weights = layer(np.zeros((0, 4, 8)), return_attention_weights=True)
    assert output.shape == (0, 4, 8) and weights.shape == (0, 2, 4, 4)
    output, weights = layer(rng.normal(size=(2, 3, 8)), np.zeros((2, 0, 8)), np.zeros((2, 0, 8)),
                            return_attention_weights=True)
    assert output.shape == (2, 3, 8) and weights.shape == (2, 2, 3, 0) and output.dtype == np.float32
    np.testing.assert_array_equal(output.data, 0.0)


def test_attributes_shapes_and_parameters():
    layer = MultiHeadAttention(12, 4, num_kv_heads=2, seed=0)
    assert (layer.embed_dim, layer.num_heads, layer.num_kv_heads, layer.head_dim) == (12, 4, 2, 3)
    assert layer.w_q.shape == (12, 12) and layer.w_o.shape == (12, 12)
    assert layer.w_k.shape == (12, 6) and layer.w_v.shape == (12, 6)
    assert all(isinstance(w, Tensor) and w.dtype == np.float32 for w in layer.parameters)
    assert [id(w) for w in layer.parameters] == [id(w) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]
    assert [id(w) for w in layer.parameters()] == [id(w) for w in layer.parameters]
    assert MultiHeadAttention(8, 2).num_kv_heads == 2


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


def test_a_kv_cache_that_is_not_a_kvcache_raises_type_error():
    layer = MultiHeadAttention(8, 2, seed=0)
    with pytest.raises(TypeError, match="kv_cache must be a KVCache or a PagedKVCache, got dict"):
        layer(np.ones((1, 2, 8)), kv_cache={})


# ---------------------------------------------------------------- the layer checked head by head (graded)
# Each workload is cross-attention (keys from another sequence of another length) with fewer
# key/value heads than query heads, each shared by several, and a mask with a fully masked row. The
# test gives the layer its weights, then checks the output with and without the attention weights
# against the reference's head-by-head answer (stored), so that one bug anywhere in the forward
# pass fails every workload.
HEAD_CONFIGS = [  # E, H, Hkv, B, T, S
    (16, 4, 2, 2, 3, 5), (24, 6, 2, 1, 4, 6), (24, 6, 3, 3, 5, 3), (32, 8, 2, 2, 2, 7), (32, 8, 4, 2, 6, 4),
    (12, 4, 2, 3, 3, 8), (16, 8, 2, 2, 4, 4)]
MASK_LAYOUTS = ["(T, S)", "(B, T, S)", "padding (B, 1, 1, S)", "(B, H, T, S)", "causal"]
HEAD_WORKLOADS = [(*config, MASK_LAYOUTS[(i + j) % len(MASK_LAYOUTS)], 10 * i + j)
                  for i, config in enumerate(HEAD_CONFIGS) for j in range(3)]


def layout_mask(layout, rng, B, H, T, S):
    """(mask given to the layer, the same mask as a boolean (B, H, T, S)-broadcastable array)."""
    if layout == "causal":
        mask = create_causal_mask(T, S)                                       # T > S: the first rows see nothing
        return mask, mask.data > 0
    if layout == "padding (B, 1, 1, S)":
        mask = create_padding_mask(np.array([0, S, S - 1][:B] if B > 1 else [S - 2]), S)   # row 0: no key at all
        return mask, mask.data > 0
    shape = {"(T, S)": (T, S), "(B, T, S)": (B, T, S), "(B, H, T, S)": (B, H, T, S)}[layout]
    keep = rng.random(shape) < 0.6
    keep[..., 0, :] = False                                                   # a fully masked query row
    return keep, keep[:, None] if keep.ndim == 3 else keep


@GRADES
@pytest.mark.parametrize("E, H, Hkv, B, T, S, layout, seed", HEAD_WORKLOADS)
def test_layer_head_by_head(ref, E, H, Hkv, B, T, S, layout, seed):
    rng = np.random.default_rng(seed)
    layer = with_weights(MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=seed), seed)
    case = f"E={E}, H={H}, Hkv={Hkv}, B={B}, T={T}, S={S}, {layout} mask, seed {seed}"
    x_q, x_kv = rng.normal(size=(B, T, E)), rng.normal(size=(B, S, E))
    mask, keep = layout_mask(layout, rng, B, H, T, S)
    expected_output, expected_weights = ref.multihead(weights_of(layer), H, Hkv, x_q, x_kv, x_kv, keep)
    output = layer(x_q, x_kv, x_kv, mask=mask)
    np.testing.assert_allclose(output.data, expected_output, rtol=1e-4, atol=1e-5, err_msg=f"{case}: output")
    output, weights = layer(x_q, x_kv, x_kv, mask=mask, return_attention_weights=True)
    np.testing.assert_allclose(output.data, expected_output, rtol=1e-4, atol=1e-5,
                               err_msg=f"{case}: output, weights returned")
    np.testing.assert_allclose(weights.data, expected_weights, rtol=1e-4, atol=1e-6, err_msg=f"{case}: weights")

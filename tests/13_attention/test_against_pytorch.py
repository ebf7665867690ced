"""Module 13 against PyTorch (skipped when torch is not installed).

Every comparison runs PyTorch in float32 under torch.no_grad() and uses atol = rtol = 1e-5.
Tests parametrized over the backend check the student's code on "math" and the provided fast
kernel on "fast". None of them grades a part: PyTorch is optional, so the points rest on the
NumPy reference, and these comparisons confirm that reference against an outside implementation.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tinytorch.core.attention import (MultiHeadAttention, ScaledDotProductAttention, attention_backend,  # noqa: E402
                                      attention_backward, blocked_attention, blocked_attention_backward,
                                      create_causal_mask, create_padding_mask, fast_attention, masked_softmax,
                                      math_attention, merge_heads, repeat_kv_heads, repeat_kv_heads_backward,
                                      split_heads)

TOL = dict(rtol=1e-5, atol=1e-5)


BACKENDS = pytest.mark.parametrize("backend", ["math", "fast"])  # the student's code, then the provided kernel


def as_torch(array):
    return torch.tensor(np.asarray(array), dtype=torch.float32)


def torch_mha(layer):
    """torch.nn.MultiheadAttention holding `layer`'s weights (ours apply x @ w, torch applies x @ W.T)."""
    module = torch.nn.MultiheadAttention(layer.embed_dim, layer.num_heads, bias=False, batch_first=True)
    with torch.no_grad():
        module.in_proj_weight.copy_(as_torch(np.concatenate([layer.w_q.data.T, layer.w_k.data.T, layer.w_v.data.T])))
        module.out_proj.weight.copy_(as_torch(layer.w_o.data.T))
    return module.eval()


def random_keep(rng, shape):
    """A random boolean mask in which every query row may attend to at least one key."""
    keep = rng.random(shape) < 0.5
    keep[..., np.arange(shape[-2]), rng.integers(0, shape[-1], shape[-2])] = True
    return keep


def run_both(layer, x_q, x_kv, keep=None, torch_mask=None):
    """Our (output, weights) and torch's; torch's boolean attn_mask marks what may NOT be attended."""
    output, weights = layer(x_q, x_kv, x_kv, mask=keep, return_attention_weights=True)
    with torch.no_grad():
        expected, expected_weights = torch_mha(layer)(as_torch(x_q), as_torch(x_kv), as_torch(x_kv),
                                                      attn_mask=torch_mask, need_weights=True,
                                                      average_attn_weights=False)
    return output.data, weights.data, expected.numpy(), expected_weights.numpy()


# ---------------------------------------------------------------- MultiHeadAttention vs nn.MultiheadAttention
@BACKENDS
@pytest.mark.parametrize("T, S", [(6, 6), (4, 9), (7, 3)])
def test_mha_without_mask(backend, T, S):
    """Self-attention when T == S, cross-attention otherwise."""
    with attention_backend(backend):
        rng = np.random.default_rng(T * 10 + S)
        layer = MultiHeadAttention(16, 4, seed=T)
        x_q = rng.standard_normal((2, T, 16), dtype=np.float32)
        x_kv = x_q if T == S else rng.standard_normal((2, S, 16), dtype=np.float32)
        output, weights, expected, expected_weights = run_both(layer, x_q, x_kv)
        np.testing.assert_allclose(output, expected, **TOL)
        np.testing.assert_allclose(weights, expected_weights, **TOL)


@BACKENDS
@pytest.mark.parametrize("T, S", [(6, 6), (4, 9)])
def test_mha_with_causal_mask(backend, T, S):
    with attention_backend(backend):
        rng = np.random.default_rng(T + S)
        layer = MultiHeadAttention(24, 3, seed=1)
        x_q = rng.standard_normal((2, T, 24), dtype=np.float32)
        x_kv = x_q if T == S else rng.standard_normal((2, S, 24), dtype=np.float32)
        mask = create_causal_mask(T, S)
        output, weights, expected, expected_weights = run_both(layer, x_q, x_kv, mask,
                                                               torch.from_numpy(mask.data == 0))
        np.testing.assert_allclose(output, expected, **TOL)
        np.testing.assert_allclose(weights, expected_weights, **TOL)


@BACKENDS
@pytest.mark.parametrize("per_batch", [False, True])
def test_mha_with_random_boolean_mask(backend, per_batch):
    """A (T, S) mask shared by the batch, or a (B, T, S) mask (torch wants it repeated per head)."""
    with attention_backend(backend):
        rng = np.random.default_rng(2 + per_batch)
        B, H, T, S = 3, 4, 5, 8
        layer = MultiHeadAttention(16, H, seed=2)
        x_q, x_kv = rng.standard_normal((B, T, 16), dtype=np.float32), rng.standard_normal((B, S, 16), dtype=np.float32)
        keep = random_keep(rng, (B, T, S) if per_batch else (T, S))
        hidden = torch.from_numpy(~keep)
        if per_batch:
            hidden = hidden.repeat_interleave(H, dim=0)                   # (B * H, T, S), batch-major
        output, weights, expected, expected_weights = run_both(layer, x_q, x_kv, keep, hidden)
        np.testing.assert_allclose(output, expected, **TOL)
        np.testing.assert_allclose(weights, expected_weights, **TOL)


@BACKENDS
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_vs_sdpa_enable_gqa(backend, num_kv_heads, causal):
    """MultiHeadAttention(num_kv_heads) against torch's SDPA with enable_gqa on the same projections."""
    with attention_backend(backend):
        B, T, E, H = 2, 7, 32, 4
        hd = E // H
        layer = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, seed=3)
        x = np.random.default_rng(num_kv_heads).standard_normal((B, T, E), dtype=np.float32)
        output = layer(x, mask=create_causal_mask(T) if causal else None).data
        with torch.no_grad():
            xt = as_torch(x)
            q = (xt @ as_torch(layer.w_q.data)).view(B, T, H, hd).transpose(1, 2)              # (B, H, T, hd)
            k = (xt @ as_torch(layer.w_k.data)).view(B, T, num_kv_heads, hd).transpose(1, 2)   # (B, Hkv, T, hd)
            v = (xt @ as_torch(layer.w_v.data)).view(B, T, num_kv_heads, hd).transpose(1, 2)
            context = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            expected = context.transpose(1, 2).reshape(B, T, E) @ as_torch(layer.w_o.data)
        np.testing.assert_allclose(output, expected.numpy(), **TOL)


# ---------------------------------------------------------------- kernels vs F.scaled_dot_product_attention
def torch_sdpa(q, k, v, keep=None, scale=None):
    with torch.no_grad():
        return F.scaled_dot_product_attention(as_torch(q), as_torch(k), as_torch(v),
                                              attn_mask=None if keep is None else torch.from_numpy(keep != 0),
                                              scale=scale).numpy()


def random_qkv(seed, lead=(2, 3), T=6, S=10, d_k=8, d_v=5):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(lead + shape, dtype=np.float32) for shape in ((T, d_k), (S, d_k), (S, d_v)))


def mask_cases(rng, T, S):
    """No mask, a bottom-right causal mask (our convention), and a random per-batch boolean mask."""
    return [None, create_causal_mask(T, S).data, random_keep(rng, (2, 1, T, S))]


def test_math_attention_vs_torch():
    q, k, v = random_qkv(0)
    for keep in mask_cases(np.random.default_rng(1), 6, 10):
        for scale in (None, 0.5):
            output, _ = math_attention(q, k, v, mask=keep, scale=scale)
            np.testing.assert_allclose(output.data, torch_sdpa(q, k, v, keep, scale), **TOL)
    q, k, v = random_qkv(2, T=5, S=5)
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(as_torch(q), as_torch(k), as_torch(v), is_causal=True).numpy()
    np.testing.assert_allclose(math_attention(q, k, v, create_causal_mask(5))[0].data, expected, **TOL)


def test_sdpa_layer_vs_torch():
    q, k, v = random_qkv(3)
    for keep in mask_cases(np.random.default_rng(4), 6, 10):
        np.testing.assert_allclose(ScaledDotProductAttention()(q, k, v, mask=keep).data, torch_sdpa(q, k, v, keep),
                                   **TOL)
        np.testing.assert_allclose(ScaledDotProductAttention(temperature=2.0)(q, k, v, mask=keep).data,
                                   torch_sdpa(q, k, v, keep, scale=1 / (np.sqrt(8) * 2.0)), **TOL)


@pytest.mark.parametrize("block_size", [1, 4, 7, 64])
def test_blocked_attention_vs_torch(block_size):
    q, k, v = random_qkv(5)
    for keep in mask_cases(np.random.default_rng(6), 6, 10):
        mask = create_causal_mask(6, 10) if keep is not None and keep.ndim == 2 else keep   # skips the future
        np.testing.assert_allclose(blocked_attention(q, k, v, mask=mask, block_size=block_size).data,
                                   torch_sdpa(q, k, v, keep), **TOL)


def test_fast_attention_vs_torch():
    with attention_backend("fast"):
        for T, S in ((6, 10), (384, 384), (300, 500)):                   # small and tiled, threaded paths
            q, k, v = random_qkv(T, lead=(2, 2), T=T, S=S)
            for keep in mask_cases(np.random.default_rng(7), T, S):
                mask = create_causal_mask(T, S) if keep is not None and keep.ndim == 2 else keep
                output, _ = fast_attention(q, k, v, mask=mask, need_weights=False)
                np.testing.assert_allclose(output.data, torch_sdpa(q, k, v, keep), **TOL)


# ---------------------------------------------------------------- building blocks
def test_masked_softmax_vs_torch():
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((2, 3, 4, 7), dtype=np.float32) * 3
    keep = random_keep(rng, (2, 1, 4, 7))
    with torch.no_grad():
        expected = torch.softmax(as_torch(scores).masked_fill(torch.from_numpy(~keep), float("-inf")), dim=-1)
    np.testing.assert_allclose(masked_softmax(scores, keep).data, expected.numpy(), **TOL)


def test_split_and_merge_heads_vs_torch_view_transpose():
    x = np.random.default_rng(9).standard_normal((2, 5, 12), dtype=np.float32)
    expected = as_torch(x).view(2, 5, 3, 4).transpose(1, 2)                # (B, H, T, hd)
    np.testing.assert_array_equal(split_heads(x, 3).data, expected.numpy())
    heads = np.random.default_rng(10).standard_normal((2, 3, 5, 4), dtype=np.float32)
    np.testing.assert_array_equal(merge_heads(heads).data, as_torch(heads).transpose(1, 2).reshape(2, 5, 12).numpy())


def test_repeat_kv_heads_vs_torch_repeat_interleave():
    x = np.random.default_rng(11).standard_normal((2, 2, 5, 4), dtype=np.float32)
    np.testing.assert_array_equal(repeat_kv_heads(x, 6).data, as_torch(x).repeat_interleave(3, dim=1).numpy())


# ---------------------------------------------------------------- gradients vs autograd (Part 11)
# Autograd differentiates torch's own float32 scaled_dot_product_attention. A gradient sums a few
# float32 products per entry more than the output does, so these comparisons allow rtol = 1e-4.
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def torch_sdpa_gradients(q, k, v, d_output, keep=None, scale=None, enable_gqa=False):
    """PyTorch autograd's (dq, dk, dv) of sum(d_output * scaled_dot_product_attention(q, k, v)), float32."""
    inputs = [as_torch(a).requires_grad_(True) for a in (q, k, v)]
    mask = None if keep is None else torch.from_numpy(np.asarray(keep) != 0)
    output = F.scaled_dot_product_attention(*inputs, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    output.backward(as_torch(d_output))
    return [tensor.grad.numpy() for tensor in inputs]


def both_backward_passes(q, k, v, d_output, mask, scale, block_size):
    """Our gradients from the saved weights and from the blocked pair, as arrays."""
    _, weights = math_attention(q, k, v, mask, scale=scale)
    saved = [g.data for g in attention_backward(d_output, q, k, v, weights, mask, scale=scale)]
    output, logsumexp = blocked_attention(q, k, v, mask, scale=scale, block_size=block_size, return_logsumexp=True)
    recomputed = [g.data for g in blocked_attention_backward(d_output, q, k, v, output, logsumexp, mask, scale=scale,
                                                             block_size=block_size)]
    return {"saved weights": saved, "recomputed": recomputed}


GRADIENT_CASES = ["causal (5, 9)", "causal (9, 5)", "causal (6, 6)", "padding (B, 1, 1, S)",
                  "boolean (B, 1, T, S) over heads, fully masked rows", "lead (), random mask, scale 0.7",
                  "lead (4,), random mask, scale 0.7", "lead (2, 3), random mask, scale 0.7",
                  "lead (2, 1, 3), random mask, scale 0.7"]


def gradient_case(name):
    """(q, k, v, our mask, torch's 0/1 mask, scale) of a named case: every kind of mask, scale and leading axes."""
    rng = np.random.default_rng(40 + GRADIENT_CASES.index(name))
    if name.startswith("causal"):                                  # offsets 4, -4 (rows that see nothing), 0
        T, S = (int(n) for n in name[len("causal ("):-1].split(", "))
        q, k, v = rng.normal(size=(2, 3, T, 8)), rng.normal(size=(2, 3, S, 8)), rng.normal(size=(2, 3, S, 4))
        mask = create_causal_mask(T, S)
        return q, k, v, mask, mask.data, None
    if name.startswith(("padding", "boolean")):
        q, k, v = rng.normal(size=(3, 2, 6, 8)), rng.normal(size=(3, 2, 7, 8)), rng.normal(size=(3, 2, 7, 4))
        if name.startswith("padding"):
            padding = create_padding_mask(np.array([7, 3, 1]), 7)
            return q, k, v, padding, padding.data, None
        over_heads = rng.random((3, 1, 6, 7)) < 0.5
        over_heads[:, :, 2] = False                                # a fully masked row in every head
        return q, k, v, over_heads, over_heads, 0.3
    lead = {"lead ()": (), "lead (4,)": (4,), "lead (2, 3)": (2, 3), "lead (2, 1, 3)": (2, 1, 3)}[name.split(", random")[0]]
    q, k, v = rng.normal(size=lead + (5, 8)), rng.normal(size=lead + (6, 8)), rng.normal(size=lead + (6, 4))
    keep = rng.random(lead + (5, 6)) < 0.6
    keep[..., 0, :] = False
    return q, k, v, keep, keep, 0.7


@pytest.mark.parametrize("block_size", [2, 4])
@pytest.mark.parametrize("name", GRADIENT_CASES)
def test_both_backward_passes_vs_autograd(name, block_size):
    q, k, v, mask, keep, scale = gradient_case(name)
    d_output = np.random.default_rng(41).normal(size=np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
                                                + (q.shape[-2], v.shape[-1]))
    expected = torch_sdpa_gradients(q, k, v, d_output, keep, scale)
    for path, gradients in both_backward_passes(q, k, v, d_output, mask, scale, block_size).items():
        for gradient, got, want in zip(("d_query", "d_key", "d_value"), gradients, expected):
            np.testing.assert_allclose(got, want, **GRAD_TOL, err_msg=f"{name}, {path}, block_size={block_size}: "
                                                                    f"{gradient}")


def test_broadcast_key_and_value_gradients_vs_autograd():
    """One key and value for every batch row and head: autograd sums their gradients, and so does the boundary."""
    rng = np.random.default_rng(42)
    q, k, v = rng.normal(size=(2, 3, 5, 8)), rng.normal(size=(1, 3, 7, 8)), rng.normal(size=(7, 4))
    d_output = rng.normal(size=(2, 3, 5, 4))
    expected = torch_sdpa_gradients(q, np.broadcast_to(k, (2, 3, 7, 8)), np.broadcast_to(v, (2, 3, 7, 4)), d_output,
                                    create_causal_mask(5, 7).data)
    expected = [expected[0], expected[1].sum(axis=0, keepdims=True), expected[2].sum(axis=(0, 1))]
    for path, gradients in both_backward_passes(q, k, v, d_output, create_causal_mask(5, 7), None, 3).items():
        for gradient, got, want in zip(("d_query", "d_key", "d_value"), gradients, expected):
            assert got.shape == want.shape, f"{path}: {gradient} shape {got.shape}"
            np.testing.assert_allclose(got, want, **GRAD_TOL, err_msg=f"{path}: {gradient}")


@pytest.mark.parametrize("num_kv_heads", [1, 2, 3])
def test_grouped_heads_backward_vs_autograd_enable_gqa(num_kv_heads):
    """Our repeat, attention and group sum against autograd through SDPA(enable_gqa=True), causal with an offset."""
    rng = np.random.default_rng(43 + num_kv_heads)
    q, k, v = rng.normal(size=(2, 6, 4, 8)), rng.normal(size=(2, num_kv_heads, 7, 8)), rng.normal(size=(2, num_kv_heads, 7, 4))
    d_output = rng.normal(size=(2, 6, 4, 4))
    mask = create_causal_mask(4, 7)
    expected = torch_sdpa_gradients(q, k, v, d_output, mask.data, None, enable_gqa=True)
    k_rep, v_rep = repeat_kv_heads(k, 6), repeat_kv_heads(v, 6)
    for path, (d_q, d_k_rep, d_v_rep) in both_backward_passes(q, k_rep, v_rep, d_output, mask, None, 2).items():
        got = [d_q, repeat_kv_heads_backward(d_k_rep, num_kv_heads).data,
               repeat_kv_heads_backward(d_v_rep, num_kv_heads).data]
        for gradient, actual, want in zip(("d_query", "d_key", "d_value"), got, expected):
            np.testing.assert_allclose(actual, want, **GRAD_TOL, err_msg=f"{num_kv_heads} kv heads, {path}: {gradient}")


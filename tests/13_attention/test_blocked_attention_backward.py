"""Part 11, the logsumexp of `blocked_attention` and `blocked_attention_backward`: FlashAttention-2's backward.

Each graded workload runs the student's whole training pair: the blocked forward with its
logsumexp, then the backward from that output and logsumexp, and checks everything at once
against the float64 reference: the logsumexp (-inf exactly for a row that sees no key), the
gradients under a causal mask whose stop lies `offset` keys past a block's last row and under a
random mask with fully masked rows (exactly zero gradient), an explicit scale, and broadcast
leading axes; and that no query block reads a key block the causal mask hides.
"""

import numpy as np
import pytest

from tinytorch.core._attention_checks import keep_mask
from tinytorch.core.attention import blocked_attention, blocked_attention_backward, create_causal_mask
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-4, 2e-5   # float32 gradients through a recomputed exp(s - L) against float64 ones
GRADES = pytest.mark.grades("test-blocked-attention-backward")


def training_pair(q, k, v, d_output, mask, scale, block_size):
    """The student's forward (output, logsumexp) and backward (d_query, d_key, d_value), as arrays."""
    forward = blocked_attention(q, k, v, mask, scale=scale, block_size=block_size, return_logsumexp=True)
    assert isinstance(forward, tuple) and len(forward) == 2, "return_logsumexp=True returns (output, logsumexp)"
    output, logsumexp = forward
    gradients = blocked_attention_backward(d_output, q, k, v, output, logsumexp, mask, scale=scale,
                                           block_size=block_size)
    assert isinstance(gradients, tuple) and len(gradients) == 3 and all(isinstance(g, Tensor) for g in gradients)
    return output.data, logsumexp.data, [g.data for g in gradients]


def never_reads_the_last_key(q, k, v, d_output, output, logsumexp, mask, scale, block_size):
    """The student's backward with NaN in the last key and value rows, which only the last query may see.

    Called as the boundary calls it (float32 arrays, the causal mask as a boolean array carrying its
    offset), since the public entry point refuses NaN. Returns d_query and the first row of the last
    query block: every row before it must stay finite.
    """
    poisoned_k, poisoned_v = (np.array(a, dtype=np.float32) for a in (k, v))
    poisoned_k[..., -1, :] = np.nan
    poisoned_v[..., -1, :] = np.nan
    q32, d32 = np.asarray(q, dtype=np.float32), np.asarray(d_output, dtype=np.float32)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    keep = keep_mask(mask, lead + (q.shape[-2], k.shape[-2]))
    with np.errstate(invalid="ignore"):
        d_query, _, _ = blocked_attention_backward.student_function(d32, q32, poisoned_k, poisoned_v, output,
                                                                    logsumexp, keep, scale, block_size)
    return d_query, (q.shape[-2] - 1) // block_size * block_size


# ---------------------------------------------------------------- the logsumexp (graded)
@GRADES
def test_worked_logsumexp():
    """Scores (1, 3) in blocks of one key: L = 3 + log(1 + e^-2) = 3.127; a row that sees no key: -inf."""
    q, k, v = np.array([[1.0], [1.0]]), np.array([[1.0], [3.0]]), np.array([[10.0], [20.0]])
    output, logsumexp = blocked_attention(q, k, v, mask=np.array([[1, 1], [0, 0]]), scale=1.0, block_size=1,
                                          return_logsumexp=True)
    assert logsumexp.shape == (2,), f"logsumexp has one number per query row: shape (2,), got {logsumexp.shape}"
    np.testing.assert_allclose(logsumexp.data[0], 3 + np.log(1 + np.exp(-2.0)), rtol=1e-6)
    assert logsumexp.data[1] == -np.inf, f"a fully masked row's logsumexp is -inf, got {logsumexp.data[1]}"
    np.testing.assert_allclose(output.data, [[18.808], [0.0]], atol=1e-3)


# ---------------------------------------------------------------- the whole training pair on many workloads (graded)
# (lead of q, k, v, T, S, block_size, scale): decoding's shapes (S > T, the stop `offset` keys past a block's last
# row), T > S (the first rows see nothing under the causal mask), blocks of one and blocks larger than T.
WORKLOADS = [(((2, 3), (2, 3), (2, 3)), 7, 9, 2, 0.6), (((2,), (2,), (2,)), 9, 4, 3, 0.45),
             (((), (), ()), 8, 8, 3, None), (((3,), (3,), (3,)), 6, 11, 4, 0.8), (((2, 2), (1, 2), (2,)), 5, 10, 2, 0.7),
             (((1,), (1,), (1,)), 6, 13, 5, None), (((2,), (), ()), 10, 6, 4, 1.3), (((), (), ()), 3, 7, 1, 0.5),
             (((2,), (2,), (2,)), 4, 9, 3, 0.9), (((1, 2), (1, 2), (1, 2)), 12, 12, 5, None),
             (((2,), (2,), (2,)), 3, 10, 2, 0.6), (((), (), ()), 5, 12, 2, None)]


@GRADES
@pytest.mark.parametrize("leads, T, S, block_size, scale", WORKLOADS)
def test_every_property_on_a_workload(ref, leads, T, S, block_size, scale):
    q_lead, k_lead, v_lead = leads
    rng = np.random.default_rng(T * 100 + S * 10 + block_size)
    q, k = rng.normal(size=q_lead + (T, 4)) * 1.5, rng.normal(size=k_lead + (S, 4)) * 1.5
    v = rng.normal(size=v_lead + (S, 3))
    lead = np.broadcast_shapes(q_lead, k_lead, v_lead)
    d_output = rng.normal(size=lead + (T, 3))
    shapes = (q.shape, k.shape, v.shape)
    case = f"q {q.shape}, k {k.shape}, v {v.shape}, block_size={block_size}, scale={scale}"

    keep = ref.causal_mask(T, S)
    output, logsumexp, gradients = training_pair(q, k, v, d_output, create_causal_mask(T, S), scale, block_size)
    expected_lse = ref.logsumexp(q, k, keep, scale)
    assert logsumexp.shape == expected_lse.shape, f"{case}: logsumexp shape {logsumexp.shape}"
    blind = max(0, T - S)                                                     # causal rows that see no key
    assert np.isneginf(logsumexp[..., :blind]).all(), f"{case}, causal: rows that see no key have logsumexp -inf"
    np.testing.assert_allclose(logsumexp[..., blind:], expected_lse[..., blind:], rtol=1e-5, atol=1e-5,
                               err_msg=f"{case}, causal: logsumexp")
    for name, got, want, shape in zip(("d_query", "d_key", "d_value"), gradients,
                                      ref.attention_gradients(q, k, v, d_output, keep, scale), shapes):
        assert got.shape == shape, f"{case}: {name} has shape {got.shape}, its input's is {shape}"
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{case}, causal mask: {name}")
    np.testing.assert_array_equal(gradients[0][..., :blind, :], 0.0, err_msg=f"{case}: rows that see no key")

    poisoned, last_block = never_reads_the_last_key(q, k, v, d_output, output, logsumexp, create_causal_mask(T, S),
                                                    scale or 0.5, block_size)
    assert np.isfinite(poisoned[..., :last_block, :]).all(), (
        f"{case}: query rows 0..{last_block - 1} read the last key, which lies in the future of all of them; "
        f"stop each query block's loop over keys where the forward stops")

    keep = rng.random(lead + (T, S)) < 0.5
    keep[..., 0, :] = False                                                   # a fully masked row
    keep[..., 1, :] = True
    keep[..., 1, :block_size] = False                                         # masked in the first key block only
    output, logsumexp, gradients = training_pair(q, k, v, d_output, keep, scale, block_size)
    assert np.isneginf(logsumexp[..., 0]).all(), f"{case}, random mask: a fully masked row's logsumexp is -inf"
    np.testing.assert_allclose(logsumexp[..., 1:], ref.logsumexp(q, k, keep, scale)[..., 1:], rtol=1e-5, atol=1e-5,
                               err_msg=f"{case}, random mask: logsumexp")
    for name, got, want in zip(("d_query", "d_key", "d_value"), gradients,
                               ref.attention_gradients(q, k, v, d_output, keep, scale)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{case}, random mask: {name}")
    np.testing.assert_array_equal(gradients[0][..., 0, :], 0.0, err_msg=f"{case}: a fully masked row's d_query")


@GRADES
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 9), (2, 1, 6, 9), (1, 9)])
def test_padding_and_head_broadcast_masks(ref, mask_shape):
    """A padding mask (B, 1, 1, S), a mask shared by the heads (B, 1, T, S) and one row for all queries."""
    rng = np.random.default_rng(31)
    q, k, v = rng.normal(size=(2, 3, 6, 4)), rng.normal(size=(2, 3, 9, 4)), rng.normal(size=(2, 3, 9, 2))
    d_output = rng.normal(size=(2, 3, 6, 2))
    keep = rng.random(mask_shape) < 0.6
    keep[..., -1] = False
    keep[..., 0] = True
    _, _, gradients = training_pair(q, k, v, d_output, keep.astype(np.float32), 0.7, 4)
    for name, got, want in zip(("d_query", "d_key", "d_value"), gradients,
                               ref.attention_gradients(q, k, v, d_output, keep, 0.7)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"mask {mask_shape}: {name}")
    np.testing.assert_array_equal(gradients[2][..., -1, :], 0.0, err_msg=f"mask {mask_shape}: a hidden key's d_value")


@GRADES
def test_never_forms_a_T_by_S_array(ref, peak_bytes):
    """T = S = 1024: a (T, S) float32 array is 4 MiB; with 64-wide blocks the backward's peak stays under 1 MiB."""
    rng = np.random.default_rng(32)
    q, k, v, d_output = (rng.standard_normal((1024, 16), dtype=np.float32) for _ in range(4))
    output, logsumexp = (r.data for r in blocked_attention(q, k, v, block_size=64, return_logsumexp=True))
    (d_query, d_key, d_value), peak = peak_bytes(
        lambda: blocked_attention_backward(d_output, q, k, v, output, logsumexp, block_size=64))
    assert peak < 2**20, f"the backward's peak was {peak} bytes; a (1024, 1024) float32 array alone is 4 MiB"
    expected, _, _ = ref.attention_gradients(q[:8], k, v, d_output[:8])      # query i's gradient needs only row i
    assert d_query.shape == (1024, 16) and d_key.shape == d_value.shape == (1024, 16)
    np.testing.assert_allclose(d_query.data[:8], expected, rtol=RTOL, atol=ATOL, err_msg="d_query of the first 8 rows")


# ---------------------------------------------------------------- robustness and errors (provided, not graded)
def test_empty_keys_give_zero_gradients():
    q, k, v = np.ones((3, 2)), np.ones((0, 2)), np.ones((0, 2))
    output, logsumexp = blocked_attention(q, k, v, return_logsumexp=True)
    assert np.isneginf(logsumexp.data).all()
    d_query, d_key, d_value = blocked_attention_backward(np.ones((3, 2)), q, k, v, output, logsumexp)
    np.testing.assert_array_equal(d_query.data, 0.0)
    assert d_key.shape == (0, 2) and d_value.shape == (0, 2)


def test_return_logsumexp_must_be_a_flag():
    with pytest.raises(TypeError, match="return_logsumexp must be True or False, got str 'yes'"):
        blocked_attention(np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)), return_logsumexp="yes")


@pytest.mark.parametrize("change, message", [
    (dict(logsumexp=np.array([np.nan, 0.0, 0.0])), "logsumexp holds NaN or \\+inf"),
    (dict(logsumexp=np.zeros(4)), r"logsumexp must have shape \(3,\), the forward's, got \(4,\)"),
    (dict(output=np.zeros((3, 3))), r"output must have shape \(3, 2\), the forward's, got \(3, 3\)"),
    (dict(block_size=0), "block_size must be >= 1, got 0"),
])
def test_bad_saved_arrays_raise(change, message):
    arguments = dict(d_output=np.zeros((3, 2)), query=np.zeros((3, 4)), key=np.zeros((5, 4)), value=np.zeros((5, 2)),
                     output=np.zeros((3, 2)), logsumexp=np.zeros(3))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        blocked_attention_backward(**arguments)

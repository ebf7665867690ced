"""Part 8, `blocked_attention`: the online softmax must give the formula's output for every block size and mask.

Graded cases span several key blocks (so the running maximum and sum must be rescaled) and
nearly all carry a mask: causal with and without an offset, or random with fully masked rows.
"""
import warnings

import numpy as np
from expected import weights_of, with_weights
import pytest

from tinytorch.core._attention_checks import keep_mask
from tinytorch.core.attention import (MultiHeadAttention, ScaledDotProductAttention, blocked_attention,
                                      create_causal_mask, math_attention)
from tinytorch.core.tensor import Tensor

RTOL, ATOL = 1e-5, 1e-5  # float32 result against a float64 reference
GRADES = pytest.mark.grades("test-blocked-attention")


def random_qkv(seed, lead=(2, 3), T=7, S=9, d_k=4, d_v=3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=lead + (T, d_k)), rng.normal(size=lead + (S, d_k)), rng.normal(size=lead + (S, d_v))


def check(ref, case, output, q, k, v, keep=None, scale=None, rtol=RTOL, atol=ATOL):
    expected, _ = ref.attention(q, k, v, keep, scale)
    output = output.data if isinstance(output, Tensor) else output
    assert output.shape == expected.shape, f"{case}: shape {output.shape}, expected {expected.shape}"
    np.testing.assert_allclose(output, expected, rtol=rtol, atol=atol, err_msg=case)


# ---------------------------------------------------------------- values
@GRADES
@pytest.mark.parametrize("T, S", [(8, 8), (7, 7), (3, 10), (10, 4)])
@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_causal_masks(ref, T, S, block_size):
    """Square and offset causal masks; with T > S the first queries see nothing and give zeros."""
    q, k, v = random_qkv(T * 10 + S, T=T, S=S)
    output = blocked_attention(q, k, v, mask=create_causal_mask(T, S), block_size=block_size)
    assert isinstance(output, Tensor) and output.dtype == np.float32
    check(ref, f"causal ({T}, {S}) mask, block_size={block_size}", output, q, k, v, ref.causal_mask(T, S))


@GRADES
@pytest.mark.parametrize("mask_shape", [(7, 9), (2, 1, 7, 9), (2, 3, 7, 9), (1, 9)])
@pytest.mark.parametrize("block_size", [2, 4])
def test_random_masks_with_fully_masked_rows(ref, mask_shape, block_size):
    """Any mask, including rows masked only in some blocks and rows masked in all of them (zero output)."""
    q, k, v = random_qkv(3)
    keep = np.random.default_rng(4).random(mask_shape) < 0.4
    if len(mask_shape) > 2:
        keep[..., 2, :] = False                                  # a fully masked row
        keep[..., 3, :4] = False                                 # masked in the first blocks only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = blocked_attention(q, k, v, mask=keep.astype(np.float32), block_size=block_size)
    check(ref, f"random mask {mask_shape}, block_size={block_size}", output, q, k, v, keep)


@GRADES
@pytest.mark.parametrize("block_size", [2, 3, 4])
def test_explicit_scale_causal_mask_and_broadcast_leading_axes(ref, block_size):
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 3, 5, 4)), rng.normal(size=(1, 3, 9, 4)), rng.normal(size=(9, 2))
    output = blocked_attention(q, k, v, mask=create_causal_mask(5, 9), scale=0.7, block_size=block_size)
    check(ref, f"scale=0.7, causal (5, 9) mask, block_size={block_size}", output, q, k, v, ref.causal_mask(5, 9),
          scale=0.7)


@GRADES
def test_hand_computed_case_fixes_the_scale():
    """d_k = 4: scores (ln 3, 0) over two blocks of one key each, weights (3/4, 1/4)."""
    query = np.array([[2 * np.log(3.0), 0.0, 0.0, 0.0]])
    key = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    value = np.array([[4.0, 0.0], [0.0, 8.0]])
    np.testing.assert_allclose(blocked_attention(query, key, value, block_size=1).data, [[3.0, 2.0]], rtol=1e-6,
                               err_msg="scores (ln 3, 0) in two blocks of one key")


@GRADES
@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_offset_causal_mask_by_hand(block_size):
    """All-zero queries weigh every visible key alike, so each row is the mean of the values it may see.

    create_causal_mask(4, 9) has offset 5: query i sees keys 0..i+5. With value j = (2j, 1) the rows
    are the means of 0, 2, ..., 2(i+5): (5, 1), (6, 1), (7, 1), (8, 1). A loop that stops at the
    block's last row without adding the offset averages only the first keys; one that reads every
    key block reads the last key, which only the last query may see, in the earlier query blocks too.
    """
    q, k = np.zeros((4, 2)), np.random.default_rng(5).normal(size=(9, 2))
    v = np.stack([2.0 * np.arange(9), np.ones(9)], axis=1)
    mask = create_causal_mask(4, 9)
    output = blocked_attention(q, k, v, mask=mask, block_size=block_size).data
    np.testing.assert_allclose(output, [[5.0, 1.0], [6.0, 1.0], [7.0, 1.0], [8.0, 1.0]], rtol=1e-6,
                               err_msg=f"create_causal_mask(4, 9), offset 5, block_size={block_size}")
    poisoned, last_block = never_reads_the_last_key(q, k, v, mask, 1.0, block_size)
    assert last_block > 0 and np.isfinite(poisoned[:last_block]).all(), (
        f"block_size={block_size}: query rows 0..{last_block - 1} read the last key, which only query 3 may see")


@GRADES
def test_running_maximum_rises_across_blocks(ref):
    """The largest score sits in the last block and scores span about 1e5: the rescaling must be exact."""
    q = np.array([[1e5, 0, 0, 0], [-1e5, 0, 0, 0]])
    k = np.zeros((6, 4))
    k[:, 0] = [-1.0, 0.5, 0.99999, 0.0, 1.0 - 1e-5, 1.0]      # scores up to 1e5, the maximum last
    v = np.random.default_rng(6).normal(size=(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = blocked_attention(q, k, v, scale=1.0, block_size=2)
    check(ref, "scores up to 1e5, maximum in the last block", output, q, k, v, scale=1.0, rtol=1e-4)


@GRADES
def test_never_forms_the_full_score_matrix(ref, peak_bytes):
    """T = S = 1024: a (T, S) float32 array is 4 MiB; with 64-wide blocks the peak stays far below 1 MiB."""
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1024, 16), dtype=np.float32) for _ in range(3))
    output, peak = peak_bytes(lambda: blocked_attention(q, k, v, block_size=64))
    check(ref, "first 64 of 1024 queries, block_size=64", output.data[:64], q[:64], k, v)
    assert peak < 1024 * 1024 * 4 / 4, f"peak {peak} bytes, expected under 1 MiB"


@GRADES
def test_layers_with_block_size(ref):
    """ScaledDotProductAttention and MultiHeadAttention with block_size run the blocked kernel correctly."""
    q, k, v = random_qkv(14)
    check(ref, "ScaledDotProductAttention(block_size=3), causal (7, 9)",
          ScaledDotProductAttention(block_size=3)(q, k, v, mask=create_causal_mask(7, 9)), q, k, v,
          ref.causal_mask(7, 9))
    x = np.random.default_rng(15).normal(size=(2, 6, 16))
    blocked = with_weights(MultiHeadAttention(16, 4, num_kv_heads=2, seed=1, block_size=4), 1)
    expected, _ = ref.multihead(weights_of(blocked), 4, 2, x, keep=ref.causal_mask(6))
    np.testing.assert_allclose(blocked(x, mask=create_causal_mask(6)).data, expected, rtol=RTOL, atol=ATOL,
                               err_msg="MultiHeadAttention(16, 4, num_kv_heads=2, block_size=4), causal")


# ---------------------------------------------------------------- robustness (not graded)
@pytest.mark.parametrize("block_size", [1, 9, 128])
def test_no_mask_one_block_or_many(ref, block_size):
    q, k, v = random_qkv(block_size)
    check(ref, f"no mask, block_size={block_size}", blocked_attention(q, k, v, block_size=block_size), q, k, v)


def test_temperature_on_the_blocked_layer(ref):
    q, k, v = random_qkv(16)
    check(ref, "temperature 2", ScaledDotProductAttention(temperature=2.0, block_size=4)(q, k, v), q, k, v,
          scale=0.25)                                                             # 1/(sqrt(4)*2)


@pytest.mark.parametrize("dtype", [np.float64, np.int64])
def test_float64_and_integer_inputs_give_float32(ref, dtype):
    rng = np.random.default_rng(7)
    q, k, v = (rng.integers(-2, 3, size=shape).astype(dtype) for shape in ((5, 4), (6, 4), (6, 2)))
    output = blocked_attention(q, k, v, block_size=4)
    assert output.dtype == np.float32
    check(ref, f"{np.dtype(dtype).name} inputs", output, q, k, v)


def test_single_token_empty_batch_and_empty_keys(ref):
    q, k, v = random_qkv(8, T=1, S=1)
    np.testing.assert_allclose(blocked_attention(q, k, v, block_size=2).data, v, rtol=1e-6)
    assert blocked_attention(*random_qkv(10, lead=(0,)), block_size=2).shape == (0, 7, 3)
    output = blocked_attention(*random_qkv(11, T=4, S=0), block_size=2)
    assert output.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(output.data, 0.0)


# ---------------------------------------------------------------- errors (provided validation, not graded)
@pytest.mark.parametrize("block_size, error, message", [(0, ValueError, "block_size must be >= 1, got 0"),
                                                        (-4, ValueError, "block_size must be >= 1, got -4"),
                                                        (2.0, TypeError, "block_size must be an integer")])
def test_bad_block_size_raises(block_size, error, message):
    with pytest.raises(error, match=message):
        blocked_attention(*random_qkv(0), block_size=block_size)


def test_inputs_are_checked_like_math_attention():
    with pytest.raises(ValueError, match="key has d_k=7 but query has d_k=8"):
        blocked_attention(np.zeros((3, 8)), np.zeros((4, 7)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="value has seq_k=5 but key has seq_k=6"):
        blocked_attention(np.zeros((3, 8)), np.zeros((6, 8)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 4\) does not broadcast to scores \(2, 5, 6\)"):
        blocked_attention(np.zeros((2, 5, 8)), np.zeros((2, 6, 8)), np.zeros((2, 6, 2)), mask=np.ones((3, 4)))


def test_layer_with_block_size_cannot_return_weights():
    x = np.zeros((1, 3, 8))
    with pytest.raises(ValueError, match="return_attention_weights=True needs the full weight matrix, which "
                                         "block_size=2 never forms"):
        MultiHeadAttention(8, 2, block_size=2)(x, return_attention_weights=True)


# ---------------------------------------------------------------- every property on many workloads (graded)
# Each workload checks everything at once against the student's own math_attention, so that any
# single bug of the online softmax fails all of them: an explicit scale, a causal mask whose
# early rows may see nothing (T > S) or whose future is skipped, and a random mask with a fully
# masked row and a row masked only in the first key blocks. The last four shapes are decoding's:
# a few queries after a longer cache (S > T), so each block's causal stop lies `offset` keys past
# its last row. Each workload also takes a mask whose query axis has size 1, as a padding mask has.
WORKLOAD_SHAPES = [((2, 3), 7, 9), ((2,), 9, 4), ((), 8, 8), ((3,), 6, 11), ((1, 2), 10, 6), ((2, 2), 6, 6),
                   ((2,), 11, 7), ((2,), 4, 9), ((2,), 5, 10), ((1,), 6, 13), ((), 3, 7)]
WORKLOADS = [(lead, T, S, block_size, 0.35 + 0.2 * (index % 5))
             for index, ((lead, T, S), block_size) in enumerate(
                 (shape, block_size) for shape in WORKLOAD_SHAPES for block_size in (1, 2, 3, 4, 5))]


def never_reads_the_last_key(q, k, v, mask, scale, block_size):
    """Blocked attention with NaN in the last value row, which only the last query may see.

    The loop over key blocks stops at the last key a block's last row may see, so every query block
    but the last never reads that row and keeps a finite output. The public entry point refuses NaN,
    so the student's function is called as the boundary calls it: with float32 arrays and the causal
    mask as the boolean array that carries its offset. Returns the output and the first row of the
    last query block.
    """
    poisoned = np.array(v, dtype=np.float32)
    poisoned[..., -1, :] = np.nan
    q, k = np.asarray(q, dtype=np.float32), np.asarray(k, dtype=np.float32)
    keep = keep_mask(mask, q.shape[:-2] + (q.shape[-2], k.shape[-2]))
    with np.errstate(invalid="ignore"):                      # the last query block does read the NaN row
        output = blocked_attention.student_function(q, k, poisoned, keep, scale, block_size)
    return output, (q.shape[-2] - 1) // block_size * block_size


@GRADES
@pytest.mark.parametrize("lead, T, S, block_size, scale", WORKLOADS)
def test_every_property_on_a_workload(lead, T, S, block_size, scale):
    rng = np.random.default_rng(T * 100 + S * 10 + block_size)
    q, k, v = rng.normal(size=lead + (T, 4)) * 2, rng.normal(size=lead + (S, 4)) * 2, rng.normal(size=lead + (S, 3))
    case = f"lead {lead}, T={T}, S={S}, block_size={block_size}, scale={scale:.2f}"

    causal = create_causal_mask(T, S)
    expected = math_attention(q, k, v, causal, scale=scale)[0].data
    output = blocked_attention(q, k, v, mask=causal, scale=scale, block_size=block_size).data
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5, err_msg=f"{case}, causal mask")
    blind = max(0, T - S)                                                 # rows before any key: zero output
    np.testing.assert_array_equal(output[..., :blind, :], 0.0, err_msg=f"{case}: rows that see no key")

    poisoned, last_block = never_reads_the_last_key(q, k, v, causal, scale, block_size)
    assert np.isfinite(poisoned[..., :last_block, :]).all(), (
        f"{case}: query rows 0..{last_block - 1} read the last key, which lies in the future of all of them; "
        f"stop each query block's loop over keys at min(S, i1 + offset)")
    np.testing.assert_allclose(poisoned[..., :last_block, :], expected[..., :last_block, :], rtol=1e-4, atol=1e-5,
                               err_msg=f"{case}: rows before the last query block")

    keep = rng.random(lead + (T, S)) < 0.5
    keep[..., 0, :] = False                                               # a fully masked row
    keep[..., 1, :] = True
    keep[..., 1, :2 * block_size] = False                                 # masked in the first key blocks only
    expected = math_attention(q, k, v, keep, scale=scale)[0].data
    output = blocked_attention(q, k, v, mask=keep, scale=scale, block_size=block_size).data
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5, err_msg=f"{case}, random mask")
    np.testing.assert_array_equal(output[..., 0, :], 0.0, err_msg=f"{case}: a fully masked row")

    padding = rng.random(lead[:1] + (1,) * len(lead[1:]) + (1, S)) < 0.6   # one row of flags, every query
    padding[..., 0] = True
    expected = math_attention(q, k, v, padding, scale=scale)[0].data
    output = blocked_attention(q, k, v, mask=padding, scale=scale, block_size=block_size).data
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-5,
                               err_msg=f"{case}, a mask of shape {padding.shape}: its query axis of size 1 "
                                       f"broadcasts to all T rows")

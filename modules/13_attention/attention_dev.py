# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Module 13: Attention
#
# > Scaled dot-product attention, multi-head attention, KV caches and their costs, in NumPy.
#
# Attention lets every position of a sequence read from every other position, weighting each by
# how well a *query* matches a *key*. It is the operation at the heart of every transformer, and
# it is also the operation that decides how long a context a model can afford: its memory grows
# with the square of the sequence length, and generating text one token at a time repeats almost
# all of its work unless a cache keeps it.
#
# This module builds attention and then measures it, so that the costs are numbers you produced
# rather than claims you read.
#
# **What you will build**
#
# | part | what | you write |
# |---|---|---|
# | 1 | `create_causal_mask`: which keys each query may see | the mask |
# | 2 | `masked_softmax`: a softmax that survives huge logits and masked rows | the softmax |
# | 3 | `math_attention`: softmax(Q Kᵀ / √d_k) V, exactly as written | the formula |
# | 4 | `ScaledDotProductAttention`: the layer, with dropout, temperature and kernels | (provided) |
# | 5 | `split_heads`, `merge_heads`, `repeat_kv_heads`, `MultiHeadAttention` | heads and projections |
# | 6 | `KVCache` and cached decoding | the cache update |
# | 7 | `fast_attention`: the production path | (provided, a lesson in patterns) |
# | 8 | `blocked_attention`: attention that never forms the T × S matrix | the online softmax |
# | 9 | `AttentionProfiler`: measured time and memory | (provided) |
#
# **Prerequisites**: module 02 (`Tensor`) and module 12 (`Embedding`, `PositionalEncoding`).
# **Time**: 5-6 hours. **Next**: module 14 builds transformer blocks out of these layers.
#
# Work through the cells in order. Each part ends with a `test_unit_*` cell that checks your code
# against values worked out independently; run it before moving on.

# %%
#| default_exp core.attention

# %%
#| export
import math
import os
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from tinytorch.core.tensor import Tensor

# %% [markdown]
# ## Names used throughout
#
# Every shape in this module is written with the same letters:
#
# | letter | meaning |
# |---|---|
# | `B` | batch size |
# | `H` | number of query heads; `Hkv` the number of key/value heads |
# | `T` | number of queries (the sequence being processed) |
# | `S` | number of keys and values (T for self-attention, more with a cache) |
# | `E` | embedding width (`embed_dim`) |
# | `hd` | width of one head, `E // H` |
#
# Every public function accepts a `Tensor` or a plain NumPy array (or nested lists) and returns
# `Tensor`s holding float32. The two helpers below do that conversion and the input checks, so
# the parts you write can work on plain arrays. A wrong input raises a `ValueError` or `TypeError`
# whose message names the argument, what was expected and what was given.

# %%
#| export
def _to_array(x, name: str) -> np.ndarray:
    """`x` (a Tensor, an array or nested lists of numbers) as a float32 array."""
    data = x.data if isinstance(x, Tensor) else x
    if data is None:
        raise TypeError(f"{name} must be a Tensor or an array of numbers, got None")
    try:
        array = np.asarray(data)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a Tensor or an array of numbers, got {type(x).__name__}") from error
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def _to_mask(mask, scores_shape: tuple, name: str = "mask") -> np.ndarray | None:
    """A boolean 'may attend' array that broadcasts to `scores_shape`, or None for no mask."""
    if mask is None:
        return None
    data = mask.data if isinstance(mask, Tensor) else mask
    try:
        array = np.asarray(data)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a Tensor or an array, got {type(mask).__name__}") from error
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be boolean or numeric, got dtype {array.dtype}")
    if not _broadcasts_to(array.shape, scores_shape):
        raise ValueError(f"{name} of shape {array.shape} does not broadcast to scores {tuple(scores_shape)}")
    return array if array.dtype == np.bool_ else array != 0


def _check_int(value, name: str, minimum: int) -> int:
    """`value` as an int, at least `minimum`; TypeError for non-integers, ValueError below it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)

# %% [markdown]
# ## Part 1: Masks, and the causal mask
#
# A mask says which keys each query may attend to. One convention holds everywhere in TinyTorch:
# **nonzero or `True` means "may attend"; zero or `False` means "masked out"**. A mask can be
# boolean or numeric, and it broadcasts against the scores, shape `(..., T, S)`, by NumPy's rules:
# a `(T, S)` mask applies to every batch row and head; a `(B, 1, 1, S)` padding mask hides the
# same keys from every query of a row.
#
# A language model predicts token *i + 1* from tokens *0..i*, so while training on a whole
# sentence at once, query *i* must not see keys after *i*. That is the **causal mask**: the lower
# triangle of a T × T matrix of ones.
#
# ```
# T = S = 4            T = 2, S = 5 (offset 3)
# 1 0 0 0              1 1 1 1 0
# 1 1 0 0              1 1 1 1 1
# 1 1 1 0
# 1 1 1 1
# ```
#
# When a chunk of T new queries follows S - T keys that are already cached, query *i* sits at
# position *i + (S - T)*, so it may see keys *j ≤ i + (S − T)*. That is the same triangle, shifted
# right by the offset S − T; the default `key_len = seq_len` gives offset 0.
#
# **Your task**: build the `(T, S)` float32 mask with ones where `j <= i + offset`.
# Hint: `np.tril` takes a diagonal offset `k`.
#
# The function returns a `CausalMask`, a read-only `Tensor` that remembers its offset. Attention
# reads the offset to skip blocks of keys that lie wholly in the future instead of computing
# them and throwing them away (Part 7).

# %% nbgrader={"grade": false, "grade_id": "causal-mask", "locked": false, "schema_version": 3, "solution": true}
#| export
class CausalMask(Tensor):
    """A read-only causal mask that remembers its diagonal offset."""

    def __init__(self, data, offset: int):
        super().__init__(np.array(data, dtype=np.float32))
        self.data.flags.writeable = False  # the offset must keep describing the data
        self.offset = int(offset)


def create_causal_mask(seq_len: int, key_len: int | None = None) -> CausalMask:
    """Mask letting query i attend to keys j <= i + (key_len - seq_len).

    Args:
        seq_len: number of queries T (>= 0).
        key_len: number of keys S (>= 0); defaults to T.
    Returns:
        CausalMask of shape (T, S), float32: 1 = may attend, 0 = masked out.
    """
    seq_len = _check_int(seq_len, "seq_len", 0)
    key_len = seq_len if key_len is None else _check_int(key_len, "key_len", 0)
    offset = key_len - seq_len
    ### BEGIN SOLUTION
    mask = np.tril(np.ones((seq_len, key_len), dtype=np.float32), k=offset)
    ### END SOLUTION
    return CausalMask(mask, offset)

# %% nbgrader={"grade": true, "grade_id": "test-causal-mask", "locked": true, "points": 5, "schema_version": 3, "solution": false}
def test_unit_causal_mask():
    """The causal mask is the lower triangle, shifted right by key_len - seq_len."""
    mask = create_causal_mask(4)
    expected = np.array([[1, 0, 0, 0],
                         [1, 1, 0, 0],
                         [1, 1, 1, 0],
                         [1, 1, 1, 1]], dtype=np.float32)
    assert isinstance(mask, Tensor) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask.data, expected)

    offset_mask = create_causal_mask(2, key_len=5)  # 3 cached keys come first
    np.testing.assert_array_equal(offset_mask.data, [[1, 1, 1, 1, 0],
                                                     [1, 1, 1, 1, 1]])
    assert offset_mask.offset == 3
    assert create_causal_mask(1, key_len=6).data.sum() == 6  # one new token sees every key
    assert create_causal_mask(0).shape == (0, 0)
    print("causal mask: lower triangle, offset form and empty case all correct")


test_unit_causal_mask()

# %% [markdown]
# ## Part 2: A softmax that survives
#
# Attention turns each row of scores into weights with a softmax,
# $\mathrm{softmax}(x)_j = e^{x_j} / \sum_k e^{x_k}$. Written naively it breaks in two ways:
#
# 1. **Overflow.** float32 overflows above about $e^{88}$. Scores of a few hundred are ordinary,
#    so $e^{x}$ becomes `inf` and `inf / inf` is `nan`. The fix is free: softmax does not change
#    when the same constant is subtracted from every entry of a row, so subtract the row maximum
#    first. Then the largest exponent is $e^0 = 1$ and nothing overflows.
# 2. **Masking.** A masked position must get weight exactly 0. Setting its score to $-\infty$
#    does that, since $e^{-\infty} = 0$. But if *every* key of a row is masked, the row maximum
#    is itself $-\infty$, and $-\infty - (-\infty)$ is `nan`. A fully masked row has nothing to
#    attend to, so define its weights as all zero: treat its maximum as 0 and divide by 1
#    instead of by a zero total.
#
# **Your task**: implement the masked, stable softmax over the last axis. `keep` is already a
# boolean array (or `None`) that broadcasts to `scores`.
# Hints: `np.where(keep, scores, -np.inf)`; `scores.max(axis=-1, keepdims=True, initial=-np.inf)`
# also works for rows with no entries at all; `np.isneginf` finds the fully masked rows.

# %% nbgrader={"grade": false, "grade_id": "masked-softmax", "locked": false, "schema_version": 3, "solution": true}
#| export
def masked_softmax(scores, mask=None) -> Tensor:
    """Softmax over the last axis; masked positions get weight 0.

    Args:
        scores: (..., T, S) logits.
        mask: broadcastable to scores; nonzero/True = keep. Fully masked rows give all-zero weights.
    Returns:
        Tensor (..., T, S), float32; each row sums to 1, or to 0 when fully masked.
    """
    scores = _to_array(scores, "scores")
    if scores.ndim < 1:
        raise ValueError(f"scores must have at least 1 axis, got shape {scores.shape}")
    keep = _to_mask(mask, scores.shape)
    ### BEGIN SOLUTION
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)                  # masked -> weight exp(-inf) = 0
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # (..., T, 1)
    row_max = np.where(np.isneginf(row_max), 0.0, row_max)      # fully masked rows: no nan
    exps = np.exp(scores - row_max)                              # every exponent <= 0
    totals = exps.sum(axis=-1, keepdims=True)                    # (..., T, 1)
    weights = exps / np.where(totals > 0.0, totals, 1.0)         # fully masked rows stay 0
    ### END SOLUTION
    return Tensor(weights.astype(np.float32, copy=False))

# %% nbgrader={"grade": true, "grade_id": "test-masked-softmax", "locked": true, "points": 10, "schema_version": 3, "solution": false}
def test_unit_masked_softmax():
    """Values against the definition, stability for huge logits, masks, fully masked rows."""
    scores = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    by_hand = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    weights = masked_softmax(scores).data
    np.testing.assert_allclose(weights[0], by_hand, rtol=1e-6)
    np.testing.assert_allclose(weights[1], [1 / 3] * 3, rtol=1e-6)

    huge = masked_softmax(np.array([[1000.0, 1001.0, 5000.0]])).data   # exp(5000) overflows
    assert np.all(np.isfinite(huge))
    np.testing.assert_allclose(huge, [[0.0, 0.0, 1.0]], atol=1e-7)

    mask = np.array([[1, 1, 0], [0, 0, 0]])
    masked = masked_softmax(scores, mask).data
    np.testing.assert_allclose(masked[0, :2], np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum(), rtol=1e-6)
    assert masked[0, 2] == 0.0
    np.testing.assert_array_equal(masked[1], [0.0, 0.0, 0.0])            # fully masked: zeros, no nan
    print("masked softmax: exact values, stable at 5000, masked and fully masked rows correct")


test_unit_masked_softmax()

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
# Read this sentence: *"The trophy didn't fit in the suitcase because it was too big."* What is
# "it"? You answered by looking back at two earlier words, *trophy* and *suitcase*, and weighing
# which one fits "too big". A model reading the sentence has to do the same: when it reaches
# "it", it must pull in information from the right earlier word, and which word is right depends
# on the words themselves, not on their distance. That is what attention does.
#
# Every position of a sequence asks a question (its *query*), every position advertises what it
# holds (its *key*), and each position reads a mix of all the others (their *values*), weighted by
# how well its query matches each key:
#
# ```
#   "it" ──query──►  ┌──────────┬──────────┬──────────┐
#                    │ The      │ trophy   │ suitcase │   keys: one per earlier word
#                    └──────────┴──────────┴──────────┘
#   match scores:       0.1        3.2        2.9         (made-up scores, for illustration)
#   softmax weights:    0.03       0.56       0.41        (positive, summing to 1)
#   "it" reads:      0.03·v(The) + 0.56·v(trophy) + 0.41·v(suitcase)
# ```
#
# Attention is the operation at the heart of every transformer, and it is also the operation that
# decides how long a context a model can afford: its memory grows with the square of the sequence
# length, and generating text one token at a time repeats almost all of its work unless a cache
# keeps it.
#
# You will build attention whole, from the mask to the measurement, and then measure it, so that
# the costs are numbers you produced rather than claims you read.
#
# | part | you build |
# |---|---|
# | 1 | `create_causal_mask` and `create_padding_mask`: which keys each query may see |
# | 2 | `masked_softmax`: a softmax that survives huge logits and fully masked rows |
# | 3 | `math_attention`: softmax(Q Kᵀ / √d_k) V, exactly as written |
# | 4 | `attention_with_dropout`: dropout on the attention weights, which the provided `ScaledDotProductAttention` layer runs in training |
# | 5 | `split_heads`, `merge_heads`, `repeat_kv_heads`, and `MultiHeadAttention`'s `__init__`, `forward` and `get_memory_usage` |
# | 6 | `KVCache`: the cache update, its memory cost, and the positions of cached decoding |
# | 7 | (read) how a fast kernel computes the same numbers, with a short tiled kernel to run |
# | 8 | `blocked_attention`: the online softmax that never forms the T × S matrix |
# | 9 | `AttentionProfiler`: robust timing and the log-log fit of measured costs |
# | 10 | `PagedKVCache` with forks, `simulate_serving` and `kv_cache_capacity`: serving many requests from one memory budget |
# | 11 | `attention_backward`, `repeat_kv_heads_backward`, the logsumexp and `blocked_attention_backward`: training attention, and the memory FlashAttention saves |
#
# **Prerequisites**: module 02 (`Tensor`) and module 12 (`Embedding`, `PositionalEncoding`).
# **Time**: 7-8 hours. **Next**: module 14 builds transformer blocks out of these layers.
#
# Every part opens with a small example you can check by hand, then asks you to write the code
# under `# YOUR CODE HERE`. The `test_unit_*` cell after it checks your code on that same
# example and on larger ones. Each part ends with a short *Try it* exercise: change something,
# run it, and see what happens. Those are not graded.
#
# Beside this notebook are the provided parts: the input checks in `_attention_checks_dev.py`,
# what your classes extend in `_attention_bases_dev.py`, the switch to the tuned kernel in
# `_attention_backend_dev.py`, the kernel and its thread pool in `_attention_kernel_dev.py`, the
# figures in `_attention_figures_dev.py`, and the gradient check and training demonstration of
# Part 11 in `_attention_training_dev.py`. You never need to read them, but you may.

# %%
#| default_exp core.attention

# %%
#| export
import math
import sys
import time
import tracemalloc

import numpy as np

from tinytorch.core.tensor import ParameterList, Tensor
from tinytorch.core._attention_bases import KVCacheBase, Layer, PagedKVCacheBase, ProfilerSweeps
from tinytorch.core._attention_checks import checked

# %%
from tinytorch.core._attention_figures import (
    draw_attention_flow, draw_block_tables, draw_blocked_loop, draw_head_split, draw_kv_cache, generation_spikes,
    plot_generation, plot_head_weights, plot_scaling, plot_serving_memory, plot_training,
)
from tinytorch.core._attention_training import gradient_check, measure_backward_scaling, train_reversal

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
# **Your code works on plain float32 NumPy arrays.** The `@checked` line above a function (or a
# class) makes it a public entry point: a call from outside checks the inputs once, hands your
# code float32 arrays and boolean masks, and gives `Tensor`s back to the caller. A wrong input
# raises a `ValueError` or `TypeError` whose message names the argument, what was expected and
# what was given, before your code runs; you never write those checks. When your functions call
# each other (your `math_attention` calling your `masked_softmax`, or your layer's `forward`
# calling `self.attention(...)`), nothing is checked again: arrays go in and arrays come out.

# %% [markdown]
# ## Part 1: Masks say which keys each query may see
#
# A mask is an array the shape of the scores, (…, T, S): entry [i, j] says whether query *i*
# may attend to key *j*. One convention holds everywhere in TinyTorch: **nonzero or `True` means
# "may attend"; zero or `False` means "masked out"**. Masks broadcast against the scores by
# NumPy's rules, so a (T, S) mask applies to every batch row and head.
#
# ### The causal mask
#
# A language model predicts token *i + 1* from tokens *0..i*, so while training on a whole
# sentence at once, query *i* must not see keys after *i*. That is the **causal mask**: ones on
# and below the diagonal.
#
# When a chunk of T new queries follows S − T keys that are already cached (Part 6), query *i*
# sits at position *i + (S − T)*, so it may see keys *j ≤ i + (S − T)*. Same triangle, shifted
# right by the **offset** S − T. Worked by hand:
#
# ```
# create_causal_mask(3)          create_causal_mask(2, key_len=5)   offset 5 - 2 = 3
# [[1, 0, 0],                    [[1, 1, 1, 1, 0],                  query 0 sits at position 3
#  [1, 1, 0],                     [1, 1, 1, 1, 1]]                  query 1 sits at position 4
#  [1, 1, 1]]
# ```
#
# ### The padding mask
#
# Sentences in a batch have different lengths, but an array needs one length. So short rows are
# **padded** with filler tokens up to the longest, and the padding must never be attended to:
# it is not part of the sentence. A padding mask is built from each row's true length. Row *b*
# may attend to keys *j < lengths[b]*, whatever the query, so the mask has shape (B, 1, 1, S):
# one row of S flags per batch row, broadcast over heads and queries.
#
# ```
# create_padding_mask([2, 3], key_len=4)   shape (2, 1, 1, 4)
# row 0: [1, 1, 0, 0]      two real tokens, two pads
# row 1: [1, 1, 1, 0]      three real tokens, one pad
# ```
#
# Masks combine by multiplying: `causal * padding` is 1 only where both allow, shape
# (B, 1, T, S).
#
# **Your task**: build both masks as float32 arrays of ones and zeros (plain arrays: the provided
# boundary hands callers a causal mask that also carries its `.offset`). Think of the mask entry
# as a comparison between a key's position and a limit: the limit is *i + offset* for the causal
# mask, and the row's length for the padding mask. `np.arange` gives positions; adding axes of
# size 1 (`[:, None]`) lets NumPy compare every query with every key at once.

# %% nbgrader={"grade": false, "grade_id": "masks", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def create_causal_mask(seq_len: int, key_len: int | None = None):
    """Mask letting query i attend to keys j <= i + (key_len - seq_len).

    Args:
        seq_len: number of queries T (>= 0).
        key_len: number of keys S (>= 0); defaults to T.
    Returns:
        (T, S) float32 array: 1 = may attend, 0 = masked out (a `CausalMask` to callers outside).
    """
    ### BEGIN SOLUTION
    offset = key_len - seq_len                             # cached keys before the first query
    query_positions = np.arange(seq_len)[:, None] + offset  # (T, 1): where each query sits
    key_positions = np.arange(key_len)[None, :]            # (1, S)
    return (key_positions <= query_positions).astype(np.float32)  # (T, S)
    ### END SOLUTION


@checked
def create_padding_mask(lengths, key_len: int):
    """Mask letting every query of batch row b attend to keys j < lengths[b].

    Args:
        lengths: (B,) integer array, the true lengths of the rows, each in 0..key_len.
        key_len: number of keys S, the padded length.
    Returns:
        (B, 1, 1, S) float32 array: 1 = a real token, 0 = padding.
    """
    ### BEGIN SOLUTION
    key_positions = np.arange(key_len)[None, :]            # (1, S)
    is_real = key_positions < lengths[:, None]             # (B, S)
    return is_real[:, None, None, :].astype(np.float32)    # (B, 1, 1, S)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-masks", "locked": true, "points": 8, "schema_version": 3, "solution": false}
def test_unit_masks():
    """The worked examples: a causal triangle, its offset form, and a padding mask."""
    np.testing.assert_array_equal(create_causal_mask(3).data, [[1, 0, 0], [1, 1, 0], [1, 1, 1]],
                                  err_msg="create_causal_mask(3)")
    offset_mask = create_causal_mask(2, key_len=5)
    np.testing.assert_array_equal(offset_mask.data, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                                  err_msg="create_causal_mask(2, key_len=5): 3 cached keys come first")
    assert offset_mask.offset == 3
    padding = create_padding_mask(np.array([2, 3]), key_len=4)
    assert padding.shape == (2, 1, 1, 4), f"padding mask shape: expected (2, 1, 1, 4), got {padding.shape}"
    np.testing.assert_array_equal(padding.data[:, 0, 0], [[1, 1, 0, 0], [1, 1, 1, 0]],
                                  err_msg="create_padding_mask([2, 3], key_len=4)")
    both = create_causal_mask(4).data * padding.data                       # (2, 1, 4, 4)
    np.testing.assert_array_equal(both[0, 0, 3], [1, 1, 0, 0], err_msg="causal * padding, row 0, query 3")
    print("masks: causal, offset causal and padding masks match the worked examples")


test_unit_masks()

# %% [markdown]
# **Try it.** Print `create_causal_mask(4, key_len=2)`. The offset is negative: which queries
# see no key at all, and why can that happen only when there are more queries than keys? Then
# build `create_causal_mask(6).data * create_padding_mask(np.array([4]), 6).data` and read off
# which keys query 5 may see.

# %% [markdown]
# ## Part 2: A softmax that survives
#
# Attention turns each row of scores into weights with a softmax,
# $\mathrm{softmax}(x)_j = e^{x_j} / \sum_k e^{x_k}$: positive, and summing to 1 along the row.
# Worked by hand for the row [1, 2, 3]:
#
# | | key 0 | key 1 | key 2 | sum |
# |---|---|---|---|---|
# | $e^{x}$ | 2.718 | 7.389 | 20.086 | 30.193 |
# | weight | 0.090 | 0.245 | 0.665 | 1 |
# | weight, key 2 masked | 2.718 / 10.107 = 0.269 | 0.731 | 0 | 1 |
#
# Written naively, the softmax breaks in two ways:
#
# 1. **Overflow.** float32 overflows above about $e^{88}$. Scores of a few hundred are ordinary,
#    so $e^{x}$ becomes `inf` and `inf / inf` is `nan`. The fix is free: softmax does not change
#    when the same constant is subtracted from every entry of a row, so subtract the row's
#    maximum first. The largest exponent is then $e^0 = 1$ and nothing overflows. The row
#    [1001, 1002, 1003] has exactly the weights of [1, 2, 3].
# 2. **Masking.** A masked position must get weight exactly 0. Setting its score to $-\infty$
#    does that, since $e^{-\infty} = 0$. But if *every* key of a row is masked, the row maximum
#    is itself $-\infty$, and $-\infty - (-\infty)$ is `nan`. A fully masked row has nothing to
#    attend to, so define its weights as all zero, never `nan`.
#
# **Your task**: the masked, numerically stable softmax over the last axis, for scores of any
# number of leading axes (…, T, S). `mask` is a boolean array that broadcasts to `scores`, or
# `None` for no mask. A score that is already −inf also counts as masked. Hints: `np.where`
# picks between two arrays by a condition; `max` and `sum` take `axis=-1, keepdims=True` so the
# result still broadcasts against the row; `max` also takes `initial=` for rows with no entries.
# Decide what a fully masked row's maximum and total should be replaced by so that its weights
# come out 0.

# %% nbgrader={"grade": false, "grade_id": "masked-softmax", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def masked_softmax(scores, mask=None):
    """Softmax over the last axis; masked positions get weight 0.

    Args:
        scores: (..., T, S) float32 array; -inf means masked out.
        mask: boolean array broadcastable to scores, True = keep; or None. Fully masked rows give zeros.
    Returns:
        (..., T, S) float32 array; each row sums to 1, or to 0 when fully masked.
    """
    ### BEGIN SOLUTION
    scores = scores if mask is None else np.where(mask, scores, -np.inf)   # masked: exp(-inf) = 0
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # (..., T, 1)
    row_max = np.where(np.isneginf(row_max), 0.0, row_max)         # fully masked rows: no nan
    exps = np.exp(scores - row_max)                                # every exponent <= 0
    totals = exps.sum(axis=-1, keepdims=True)                      # (..., T, 1)
    totals = np.where(totals > 0.0, totals, 1.0)                   # fully masked rows stay 0
    return (exps / totals).astype(np.float32)                      # (..., T, S)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-masked-softmax", "locked": true, "points": 10, "schema_version": 3, "solution": false}
def test_unit_masked_softmax():
    """The worked example, its shifted copy at 1000, a masked key, a fully masked row, and axes."""
    def check(name, actual, expected):
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4, err_msg=name)

    check("softmax([1, 2, 3])", masked_softmax(np.array([1.0, 2.0, 3.0])).data, [0.090, 0.245, 0.665])
    check("softmax([1001, 1002, 1003]): subtract the row max", masked_softmax(np.array([1001.0, 1002.0, 1003.0])).data,
          [0.090, 0.245, 0.665])
    check("softmax runs along the last axis of a (2, 3) array",
          masked_softmax(np.array([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0]])).data, [[0.090, 0.245, 0.665], [1 / 3] * 3])
    check("softmax([1, 2, 3]) with key 2 masked", masked_softmax(np.array([1.0, 2.0, 3.0]), [1, 1, 0]).data,
          [0.269, 0.731, 0.0])
    check("a (2, 2) input, row 0 normal, row 1 fully masked: zeros, not nan",
          masked_softmax(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1, 1], [0, 0]])).data,
          [[0.269, 0.731], [0.0, 0.0]])
    print("masked softmax: the worked example, stability at 1000, masks and fully masked rows all correct")


test_unit_masked_softmax()

# %% [markdown]
# **Try it.** Divide the scores [1, 2, 3] by a *temperature* τ before the softmax, for
# τ = 0.25, 1 and 4, and compute each row's entropy $-\sum_j w_j \log w_j$. Which τ makes the
# weights close to one-hot, and which close to uniform? (The most and least an entropy over three
# keys can be are log 3 ≈ 1.10 and 0.)

# %% [markdown]
# ## Part 3: Scaled dot-product attention
#
# Each query asks a question, each key advertises what its position holds, and each value is
# what that position hands over. The score of query $i$ against key $j$ is their dot product;
# the softmax of a row of scores says how much of each value query $i$ takes:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_k}}\right) V$$
#
# with $Q$ of shape (T, d_k), $K$ of shape (S, d_k) and $V$ of shape (S, d_v). The scores
# $QK^\top$ are (T, S); the output is (T, d_v): one weighted mix of the values per query.
#
# **Worked by hand.** One query q = [1, 0], two keys [1, 0] and [0, 1], values [10] and [20],
# d_k = 2:
#
# | step | key 0 | key 1 |
# |---|---|---|
# | q · k | 1 | 0 |
# | × 1/√2 | 0.707 | 0 |
# | softmax | 0.670 | 0.330 |
#
# output = 0.670 · 10 + 0.330 · 20 = **13.30**. The query matches key 0, so it takes mostly key
# 0's value. With `scale=1.0` instead of 1/√2 the weights are 0.731 and 0.269, and the output
# is 12.69: a larger scale makes the softmax sharper.
#
# **Why divide by √d_k?** If the entries of $q$ and $k$ are independent with mean 0 and
# variance 1, then $q \cdot k = \sum_{m=1}^{d_k} q_m k_m$ is a sum of $d_k$ terms of variance 1,
# so its variance is $d_k$. With d_k = 64 the scores have a standard deviation of 8, the softmax
# saturates into a near one-hot row, and its gradients vanish. Dividing by $\sqrt{d_k}$ brings the
# variance back to 1 whatever the head width.
#
# **Shapes.** The whole computation, for one batch row and one head:
#
# ```
#   Q (T, d_k) ──┐
#                ├─ Q Kᵀ · scale ─► scores (T, S) ─ mask, softmax ─► weights (T, S) ──┐
#   K (S, d_k) ──┘                                                                     ├─ @ ─► output (T, d_v)
#   V (S, d_v) ────────────────────────────────────────────────────────────────────────┘
# ```
#
# Any number of leading axes (batch, heads) come along for free: NumPy's `@` multiplies the
# last two axes and broadcasts the rest. To transpose only the last two axes of K use
# `np.swapaxes(k, -1, -2)`; `.T` would reverse all of them.
#
# **Your task**: the formula, using your `masked_softmax`. The checked inputs are float32
# arrays `query`, `key`, `value`, the boolean `mask` (or `None`), and `scale`, the number that
# multiplies the scores: 1/√d_k unless the caller passed another `scale`. Use `scale`, not
# your own 1/√d_k: the layer of Part 4 passes a different one. Return the output and the
# weights as arrays.

# %% nbgrader={"grade": false, "grade_id": "math-attention", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def math_attention(query, key, value, mask=None, scale=None):
    """Attention computed exactly as the formula reads (PyTorch calls this the math backend).

    Args:
        query: (..., T, d_k); key: (..., S, d_k); value: (..., S, d_v) float32 arrays; leading axes broadcast.
        mask: boolean array broadcastable to (..., T, S), True = may attend; or None.
        scale: the number that multiplies the scores: 1/sqrt(d_k) unless the caller chose another.
    Returns:
        (output (..., T, d_v), weights (..., T, S)) float32 arrays.
    """
    ### BEGIN SOLUTION
    scores = (query @ np.swapaxes(key, -1, -2)) * np.float32(scale)   # (..., T, S)
    weights = masked_softmax(scores, mask)                             # (..., T, S)
    output = weights @ value                                           # (..., T, d_v)
    return output.astype(np.float32), weights
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-math-attention", "locked": true, "points": 12, "schema_version": 3, "solution": false}
def test_unit_math_attention():
    """The worked example, an explicit scale, a mask, and a batch against a loop over queries."""
    q, k, v = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0], [20.0]])
    output, weights = math_attention(q, k, v)
    np.testing.assert_allclose(weights.data, [[0.670, 0.330]], atol=1e-3, err_msg="worked example: weights")
    np.testing.assert_allclose(output.data, [[13.30]], atol=1e-2, err_msg="worked example: output")
    output, weights = math_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(output.data, [[12.69]], atol=1e-2, err_msg="scale=1.0 must replace 1/sqrt(d_k)")
    output, _ = math_attention(q, k, v, mask=np.array([[0, 1]]))
    np.testing.assert_allclose(output.data, [[20.0]], atol=1e-5, err_msg="key 0 masked: all weight on key 1")

    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 6, 8)), rng.normal(size=(2, 3, 6, 5))
    output, weights = math_attention(q, k, v)
    np.testing.assert_allclose(weights.data.sum(axis=-1), 1.0, rtol=1e-5, err_msg="every row of weights sums to 1")
    for b, h in np.ndindex(2, 3):                  # leading axes are a batch: each slice alone gives the same
        alone, _ = math_attention(q[b, h], k[b, h], v[b, h])
        np.testing.assert_allclose(output.data[b, h], alone.data, rtol=1e-5, atol=1e-6, err_msg=f"batch {b}, head {h}")
    print("math attention: the worked example, explicit scale, masks and batched heads all correct")


test_unit_math_attention()

# %% [markdown]
# The picture of what you just computed, for two queries and three keys: Q and K make the
# scores, the softmax turns each row into weights, and the weights mix the rows of V.

# %%
flow_q = np.array([[1.0, 0.0], [0.0, 2.0]])
flow_k = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
flow_v = np.array([[10.0], [20.0], [30.0]])
flow_output, flow_weights = math_attention(flow_q, flow_k, flow_v)
draw_attention_flow(flow_q, flow_k, flow_v, flow_weights.data, flow_output.data)

# %% [markdown]
# ### Attention does not know where tokens are
#
# Shuffle the tokens of a sequence (the rows of Q, K and V together) and attention's output is
# shuffled the same way, and is otherwise unchanged: every query still meets every key, and a
# sum does not care about order. Attention is *permutation equivariant*. To attention, "dog
# bites man" and "man bites dog" are the same bag of words. That is why module 12 adds a
# positional encoding to the embeddings before the first attention layer: the positions must be
# written into the vectors themselves.

# %%
rng = np.random.default_rng(1)
tokens = rng.normal(size=(5, 4))                              # 5 tokens, used as Q, K and V
order = np.array([3, 0, 4, 1, 2])
output_then_shuffled = math_attention(tokens, tokens, tokens)[0].data[order]
shuffled_then_output = math_attention(tokens[order], tokens[order], tokens[order])[0].data
print("shuffling the tokens shuffles the output the same way:",
      np.allclose(output_then_shuffled, shuffled_then_output, atol=1e-6))

# %% [markdown]
# **Try it.** Pass the tokens through module 12's `PositionalEncoding(4, max_seq_length=8)`,
# which adds the positions itself (shuffle the tokens first, *then* add the positions), and run
# the comparison again. Why does it now print
# `False`? Then pass a causal mask to both calls: is attention with a causal mask still
# permutation equivariant?

# %% [markdown]
# ## Part 4: The attention layer
#
# `ScaledDotProductAttention` wraps the formula as a layer with the knobs real models use:
#
# - **`temperature`** divides the scores once more: below 1 sharpens the weights, above 1
#   flattens them. The scale becomes $1 / (\sqrt{d_k} \cdot \text{temperature})$.
# - **`dropout`** zeroes each attention weight with probability *p* during training, so that the
#   model cannot lean on any single key, and divides the survivors by 1 − *p*, so that each
#   weight keeps its expected value. Worked by hand: with p = 0.5 the weights [0.670, 0.330]
#   become [1.340, 0] or [0, 0.660] or [1.340, 0.660] or [0, 0], each with probability 1/4, and
#   on average [0.670, 0.330] again. As in PyTorch, dropout acts only in training mode, and a
#   new layer starts in training mode: `layer.eval()` turns dropout off, `layer.train()` on
#   again, and `seed=` makes it repeatable.
# - **`block_size`** switches to the memory-efficient blocked kernel of Part 8.
#
# Like every TinyTorch layer it derives from `Layer` (provided): `layer(x)` is `layer.forward(x)`,
# and `train()` / `eval()` set `training` on the layer and on the layers inside it.
#
# **Which kernel runs.** Production libraries keep several kernels for one operation: PyTorch's
# `scaled_dot_product_attention` picks between a "math" kernel, the formula as written, and fused
# kernels that are faster but harder to read. This layer does the same. `"math"` runs your
# `math_attention`; `"fast"` runs the provided tuned kernel of Part 7, which computes the same
# numbers. **The default is `"math"`: your code.** Every layer, demo and figure in this notebook,
# and module 14 on top of it, runs what you wrote, so a bug of yours shows in the pictures too.
# Part 7 shows the one switch that turns the tuned kernel on, and measures what it buys.
#
# **Your task**: `attention_with_dropout`, which the layer below runs in training mode when
# `dropout > 0`: attention whose weights are dropped out as described above, and the output
# those weights give. `rng` is the layer's generator, `np.random.default_rng(seed)`: draw one
# uniform random number per weight from it (`rng.random(weights.shape)` draws them all at once)
# and keep a weight with probability 1 − p, for instance when its number is at least p. Any such
# draw is right: the tests check what dropout is, not one stream of numbers (each weight is 0 or
# its value / (1 − p), about 1 − p of them survive, the same seed drops the same weights, and the
# output comes from the dropped weights). Return the output and the dropped weights.

# %% nbgrader={"grade": false, "grade_id": "sdpa-layer", "locked": false, "schema_version": 3, "solution": true}
#| export
def attention_with_dropout(query, key, value, mask, scale: float, dropout: float, rng):
    """Attention whose weights are dropped out with probability `dropout`, the survivors scaled by 1 / (1 - p).

    Args:
        query, key, value, mask, scale: as for `math_attention` (checked arrays).
        dropout: p, in [0, 1); rng: a np.random.Generator, one uniform draw per weight.
    Returns:
        (output (..., T, d_v), dropped weights (..., T, S)) float32 arrays.
    """
    ### BEGIN SOLUTION
    _, weights = math_attention(query, key, value, mask, scale)
    survives = rng.random(weights.shape) >= dropout                      # each weight survives with 1 - p
    weights = np.where(survives, weights * np.float32(1.0 / (1.0 - dropout)), np.float32(0.0))
    return (weights @ value).astype(np.float32), weights.astype(np.float32)
    ### END SOLUTION

# %% [markdown]
# The layer itself is provided. It picks the attention core, in this one place: your dropout in
# training mode; the tuned kernel of Part 7 when it is switched on; otherwise the blocked loop
# of Part 8 when `block_size` is set, and your `math_attention`. Everything around the core
# (the multi-head layer, the caches) is always your code.

# %%
#| export
from tinytorch.core._attention_backend import get_attention_backend, parallel_blocked_attention, tuned_attention


@checked
class ScaledDotProductAttention(Layer):
    """softmax(Q Kᵀ / (√d_k · temperature)) V, with masks, dropout and a choice of kernels."""

    def __init__(self, dropout: float = 0.0, temperature: float = 1.0, block_size: int | None = None,
                 seed: int | None = None):
        self.dropout, self.temperature, self.block_size = dropout, temperature, block_size
        self._rng = np.random.default_rng(seed)

    def forward(self, query, key, value, mask=None, return_attention_weights: bool = False):
        """Attend from query (..., T, d_k) to key (..., S, d_k) and value (..., S, d_v); mask: True = may attend.

        Returns the output (..., T, d_v), or (output, weights (..., T, S)) with return_attention_weights.
        """
        scale = 1.0 / (math.sqrt(query.shape[-1]) * self.temperature)
        if self.training and self.dropout > 0:
            output, weights = attention_with_dropout(query, key, value, mask, scale, self.dropout, self._rng)
        elif get_attention_backend() == "fast":                          # the tuned core, switched on by choice
            output, weights = tuned_attention(query, key, value, mask, scale, return_attention_weights)
        elif self.block_size is not None:
            output, weights = parallel_blocked_attention(blocked_attention, query, key, value, mask, scale,
                                                         self.block_size), None
        else:
            output, weights = math_attention(query, key, value, mask, scale)
        return (output, weights) if return_attention_weights else output

# %% nbgrader={"grade": true, "grade_id": "test-sdpa-layer", "locked": true, "points": 5, "schema_version": 3, "solution": false}
def test_unit_scaled_dot_product_attention():
    """The layer runs the formula, applies temperature, and drops out only in training."""
    q, k, v = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0], [20.0]])
    np.testing.assert_allclose(ScaledDotProductAttention().eval()(q, k, v).data, [[13.30]], atol=1e-2,
                               err_msg="the worked example of Part 3")
    cooled = ScaledDotProductAttention(temperature=1 / np.sqrt(2)).eval()(q, k, v)   # scale becomes 1
    np.testing.assert_allclose(cooled.data, [[12.69]], atol=1e-2, err_msg="temperature 1/sqrt(2): scale 1")

    layer = ScaledDotProductAttention(dropout=0.5, seed=0)
    outcomes = set()
    for _ in range(40):
        output, weights = layer(q, k, v, return_attention_weights=True)
        outcomes.add(tuple(np.round(weights.data[0].astype(np.float64), 2).tolist()))
        np.testing.assert_allclose(output.data, weights.data @ v, rtol=1e-5, err_msg="output = dropped weights @ V")
    assert outcomes == {(1.34, 0.66), (1.34, 0.0), (0.0, 0.66), (0.0, 0.0)}, \
        f"dropout p=0.5 of [0.670, 0.330]: expected the four outcomes of the worked example, got {sorted(outcomes)}"

    big_q, big_k, big_v = (np.random.default_rng(seed).normal(size=(4, 4, 24, 24)) for seed in (1, 2, 3))
    undropped = math_attention(big_q, big_k, big_v)[1].data                   # 9216 weights
    for p in (0.2, 0.7):
        weights = ScaledDotProductAttention(dropout=p, seed=0)(big_q, big_k, big_v,
                                                               return_attention_weights=True)[1].data
        kept = weights != 0
        np.testing.assert_allclose(weights[kept], undropped[kept] / (1 - p), rtol=1e-5,
                                   err_msg=f"p={p}: each survivor is its weight / (1 - p)")
        bound = 5 * np.sqrt(kept.size * p * (1 - p))               # 5 standard deviations of Binomial(n, 1 - p)
        assert abs(kept.sum() - kept.size * (1 - p)) < bound, \
            f"p={p}: kept {kept.mean():.3f} of the weights, expected 1 - p = {1 - p} (each survives with 1 - p)"
    np.testing.assert_allclose(layer.eval()(q, k, v).data, [[13.30]], atol=1e-2, err_msg="eval(): no dropout")
    print("attention layer: formula, temperature, and dropout in training only, as worked by hand")


test_unit_scaled_dot_product_attention()

# %% [markdown]
# **Try it.** Run the worked example through `ScaledDotProductAttention(dropout=0.5, seed=1)`
# 10,000 times in training mode and average the weights. How close do they come to
# [0.670, 0.330], and why does dividing by 1 − p make that happen?

# %% [markdown]
# ## Part 5: Many heads
#
# One attention computes one weighting per query. But a word may need to look back at its
# subject for agreement, at the previous word for syntax, and at a name three sentences earlier,
# all at once. **Multi-head attention** runs H attentions side by side, each in its own
# hd = E / H dimensional slice, then mixes their results:
#
# 1. Project the inputs: $Q = X_q W_q$, $K = X_k W_k$, $V = X_v W_v$, each (B, T or S, E).
# 2. **Split** the last axis into H heads of width hd and move heads next to batch:
#    (B, T, E) → (B, T, H, hd) → (B, H, T, hd). Each head is now an ordinary attention problem.
# 3. Attend per head (Part 4), giving (B, H, T, hd).
# 4. **Merge** the heads back, the exact inverse of the split: (B, H, T, hd) → (B, T, H, hd) →
#    (B, T, E), then apply the output projection $W_o$ so that the heads' results can mix.
#
# The heads cost no more parameters or FLOPs than one head of width E: they only cut the same
# matrices into slices. What changes is that the softmax runs H times, on H different scorings.
#
# **Worked by hand.** Two positions with E = 4 features, [10, 11, 12, 13] and [20, 21, 22, 23],
# and H = 2 heads of hd = 2. Head 0 gets features 0-1 of *every* position, [[10, 11], [20, 21]],
# and head 1 gets features 2-3, [[12, 13], [22, 23]]: consecutive groups of hd, the layout
# PyTorch's `nn.MultiheadAttention` uses. A reshape straight to (B, H, T, hd) would give head 0
# [[10, 11], [12, 13]], both halves of position 0: it scrambles positions across heads and still
# runs without error, which is why the tests compare values.
#
# ```
#   x (B, T, E=4)         reshape (B, T, H=2, hd=2)        transpose (B, H, T, hd)
#   pos 0: 10 11 12 13    pos 0: [10 11] [12 13]           head 0: pos 0 [10 11]   head 1: pos 0 [12 13]
#   pos 1: 20 21 22 23    pos 1: [20 21] [22 23]                   pos 1 [20 21]           pos 1 [22 23]
# ```

# %%
draw_head_split(embed_dim=8, num_heads=4, seq_len=3)

# %% [markdown]
# **Your task**: `split_heads` and `merge_heads`. Each is a reshape that cuts (or joins) the
# feature axis and a transpose that moves the head axis (or puts it back). Check each step's
# shape against the shape chain in the picture's title.

# %% nbgrader={"grade": false, "grade_id": "split-merge-heads", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def split_heads(x, num_heads: int):
    """(B, T, E) -> (B, H, T, hd): cut the features into H consecutive groups of hd = E // H."""
    ### BEGIN SOLUTION
    B, T, E = x.shape
    heads = x.reshape(B, T, num_heads, E // num_heads)   # (B, T, H, hd)
    return heads.transpose(0, 2, 1, 3)                   # (B, H, T, hd)
    ### END SOLUTION


@checked
def merge_heads(x):
    """(B, H, T, hd) -> (B, T, H * hd): the inverse of `split_heads`."""
    ### BEGIN SOLUTION
    B, H, T, hd = x.shape
    merged = x.transpose(0, 2, 1, 3)                     # (B, T, H, hd)
    return merged.reshape(B, T, H * hd)                  # (B, T, E)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-split-merge-heads", "locked": true, "points": 6, "schema_version": 3, "solution": false}
def test_unit_split_merge_heads():
    """The worked example, every head's slice of a (2, 3, 8) input, and merge undoing split."""
    np.testing.assert_array_equal(split_heads(np.array([[[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]]]), 2).data,
                                  [[[[10.0, 11.0], [20.0, 21.0]], [[12.0, 13.0], [22.0, 23.0]]]],
                                  err_msg="worked example, (1, 2, 4) into 2 heads: head h holds features h*hd..(h+1)*hd-1 "
                                          "of every position; reshape to (B, T, H, hd), then move the head axis")
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)   # B=2, T=3, E=8
    heads = split_heads(x, 4).data
    assert heads.shape == (2, 4, 3, 2), f"split_heads((2, 3, 8), 4): expected shape (2, 4, 3, 2), got {heads.shape}"
    for b, h in np.ndindex(2, 4):
        np.testing.assert_array_equal(heads[b, h], x[b, :, 2 * h:2 * h + 2], err_msg=f"batch {b}, head {h}")
    np.testing.assert_array_equal(merge_heads(heads).data, x, err_msg="merge_heads(split_heads(x)) must give x")
    print("split_heads / merge_heads: each head holds its own feature slice; merge inverts split")


test_unit_split_merge_heads()

# %% [markdown]
# ### Sharing keys and values between heads
#
# During generation every head keeps its keys and values in the KV cache (Part 6), so the cache
# grows by 2 · H · hd numbers per token per layer. **Grouped-query attention** (GQA, Ainslie et
# al., 2023) keeps fewer key/value heads, Hkv, and lets each serve a group of G = H / Hkv query
# heads; **multi-query attention** (Shazeer, 2019) is the extreme Hkv = 1. The cache shrinks by
# G while the queries keep all their heads. Llama 2 70B, for example, uses 8 key/value heads
# for 64 query heads.
#
# Query head h reads key/value head h // G. Worked by hand with H = 4 and Hkv = 2 (G = 2):
# query heads 0 and 1 read kv head 0; query heads 2 and 3 read kv head 1. So the kv heads
# [a, b] become [a, a, b, b], *grouped*, not [a, b, a, b], *tiled*. That is the grouping
# PyTorch uses for `scaled_dot_product_attention(..., enable_gqa=True)`.
#
# **Your task**: `repeat_kv_heads` turns (B, Hkv, S, hd) into (B, H, S, hd) with that grouping,
# so that ordinary per-head attention can follow. Look for the NumPy function that repeats each
# entry in place along an axis.

# %% nbgrader={"grade": false, "grade_id": "repeat-kv-heads", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def repeat_kv_heads(x, num_heads: int):
    """(B, Hkv, S, hd) -> (B, H, S, hd): query head h reads key/value head h // (H // Hkv)."""
    ### BEGIN SOLUTION
    group = num_heads // x.shape[1]                      # G query heads per kv head
    return x if group == 1 else np.repeat(x, group, axis=1)   # (B, H, S, hd)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-repeat-kv-heads", "locked": true, "points": 4, "schema_version": 3, "solution": false}
def test_unit_repeat_kv_heads():
    """The worked example: kv heads [a, b] serve query heads [a, a, b, b]; and 2 kv heads for 6."""
    a, b = np.full((1, 3), 1.0), np.full((1, 3), 2.0)
    kv = np.stack([a, b])[None]                                      # (1, 2, 1, 3)
    np.testing.assert_array_equal(repeat_kv_heads(kv, 4).data[0, :, 0, 0], [1.0, 1.0, 2.0, 2.0],
                                  err_msg="kv heads [a, b] for 4 query heads must be [a, a, b, b]")
    kv = np.random.default_rng(2).normal(size=(2, 2, 5, 4)).astype(np.float32)
    repeated = repeat_kv_heads(kv, 6).data
    for h in range(6):
        np.testing.assert_array_equal(repeated[:, h], kv[:, h // 3], err_msg=f"query head {h} reads kv head {h // 3}")
    print("repeat_kv_heads: query head h reads kv head h // G")


test_unit_repeat_kv_heads()

# %% [markdown]
# ### The multi-head layer
#
# `MultiHeadAttention` owns four weight matrices, applied as `x @ w`: `w_q` (E, E), `w_k` and
# `w_v` (E, Hkv · hd), and `w_o` (E, E). They start random, scaled by 1/√E so that a projection
# keeps its input's scale, and `seed=` makes them repeatable. `forward` reads them on every call,
# so an optimizer that updates them in place changes the very next forward.
#
# A mask may be (T, S) for every row and head, (B, T, S) for one mask per batch row, or 4-D and
# broadcastable to (B, H, T, S), such as a padding mask (B, 1, 1, S). The provided check turns
# it into one that broadcasts over the heads, so you can pass `mask` straight to the attention.
#
# **Worked by hand.** E = 4, H = 2 heads of hd = 2, and two tokens x₀ = [1, 0, 0, 0] and
# x₁ = [0, 0, 2, 0]. Make w_q, w_k and w_v the identity, so that Q = K = V = X, and w_o = 2·I.
# Head 0 reads features 0-1, where x₀ = [1, 0] and x₁ = [0, 0]; head 1 reads features 2-3, where
# x₀ = [0, 0] and x₁ = [2, 0]. With 1/√2 as the scale:
#
# ```
# head 0: scores [[0.707, 0], [0, 0]]   weights [[0.670, 0.330], [0.5, 0.5]]      output [[0.670, 0], [0.5, 0]]
# head 1: scores [[0, 0], [0, 2.828]]   weights [[0.5, 0.5], [0.056, 0.944]]      output [[1.0, 0], [1.889, 0]]
# merge:  [[0.670, 0, 1.0, 0], [0.5, 0, 1.889, 0]]       × w_o = 2·I:   [[1.340, 0, 2.0, 0], [1.0, 0, 3.777, 0]]
# ```
#
# With a causal mask, token 0 sees only itself: its row becomes [2.0, 0, 0, 0]. With one kv head
# (w_k = w_v = the first two columns of the identity, so both query heads read features 0-1 of
# the keys and values), head 1's second query scores [1.414, 0] and takes 0.804 of x₀'s [1, 0]:
# the output is [[1.340, 0, 1.0, 0], [1.0, 0, 1.609, 0]]. And a padded batch must give each real
# token the same output as its sentence alone: with `create_padding_mask([3, 5], 5)`, row 0's
# three real tokens come out as if the 3-token sentence were attended on its own.
#
# **Your task**: the whole layer.
#
# - `__init__`: keep the sizes the layer needs, make its four weights (`Tensor`s, so that an
#   optimizer can update them in place), and its inner `ScaledDotProductAttention` with the
#   dropout, block size and seed it was given. How you initialise the weights is your decision;
#   the tests check what any sensible choice must satisfy: the shapes, a spread that keeps a
#   projection at its input's scale, and the same weights for the same `seed`.
# - `forward`: from the inputs to the output, as in the four steps above. With a `kv_cache`, the
#   new keys and values go into the cache (`kv_cache.append`, which you write in Part 6), and
#   the queries attend over everything cached, with the mask `append` hands back combined with
#   the caller's by logical and. The cache holds the Hkv key and value heads, so repeat them for
#   the H query heads after appending, not before. Hand the weights back too when the caller asks
#   for them.
# - `get_memory_usage`: the two numbers a serving engineer asks first. `parameter_counts`, a
#   dict of each weight's number of parameters by name (w_q, w_k, w_v, w_o), and
#   `kv_cache_bytes_per_token`, the bytes one token adds to a KV cache for this layer. The
#   provided boundary adds the totals and the names module 14 reads: `parameter_count`,
#   `parameter_mb` and `kv_cache_saving` (H / Hkv) among them.
#
# The provided code (the tuned kernel, the `dropout` property, module 14) reads your layer's
# attributes by name, so `__init__` must set them: `embed_dim`, `num_heads`, `num_kv_heads`
# (Hkv; the provided check has already replaced a None by `num_heads`), `head_dim` (hd), the
# four weights, and `attention`, the inner `ScaledDotProductAttention`, whose `block_size` and
# `dropout` it reads in turn.

# %% nbgrader={"grade": false, "grade_id": "multihead-attention", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
class MultiHeadAttention(Layer):
    """Multi-head attention with optional grouped key/value heads and KV caching."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, seed: int | None = None,
                 num_kv_heads: int | None = None, block_size: int | None = None):
        """E = embed_dim split into num_heads heads; num_kv_heads (default: num_heads) key/value heads."""
        ### BEGIN SOLUTION
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim                  # Hkv * hd columns for keys and values
        rng, std = np.random.default_rng(seed), np.float32(1.0 / math.sqrt(embed_dim))
        self.w_q = Tensor(rng.standard_normal((embed_dim, embed_dim), dtype=np.float32) * std)
        self.w_k = Tensor(rng.standard_normal((embed_dim, kv_dim), dtype=np.float32) * std)
        self.w_v = Tensor(rng.standard_normal((embed_dim, kv_dim), dtype=np.float32) * std)
        self.w_o = Tensor(rng.standard_normal((embed_dim, embed_dim), dtype=np.float32) * std)
        self.attention = ScaledDotProductAttention(dropout=dropout, block_size=block_size, seed=seed)
        ### END SOLUTION

    @property
    def parameters(self) -> ParameterList:
        """[w_q, w_k, w_v, w_o]: a list, and also callable as `parameters()`."""
        return ParameterList([self.w_q, self.w_k, self.w_v, self.w_o])

    @property
    def dropout(self) -> float:
        """The dropout rate on the attention weights."""
        return self.attention.dropout

    @property
    def scaled_attention(self) -> ScaledDotProductAttention:
        """The inner attention layer (another name for `attention`)."""
        return self.attention

    def forward(self, query, key=None, value=None, mask=None, return_attention_weights: bool = False,
                kv_cache=None):
        """Multi-head attention from query to key/value (self-attention when they are omitted).

        Args:
            query: (B, T, E) float32 array; key, value: (B, S, E), already defaulted to query and key.
            mask: boolean array broadcasting to (B, H, T, S), True = may attend; or None.
            return_attention_weights: also return the (B, H, T, S) weights.
            kv_cache: a KVCache, or None; with one, the new keys and values are appended to it (Part 6).
        Returns:
            output (B, T, E), or (output, weights), float32 arrays.
        """
        ### BEGIN SOLUTION
        q = split_heads(query @ self.w_q.data, self.num_heads)          # (B, H, T, hd)
        k = split_heads(key @ self.w_k.data, self.num_kv_heads)         # (B, Hkv, S, hd)
        v = split_heads(value @ self.w_v.data, self.num_kv_heads)       # (B, Hkv, S, hd)
        if kv_cache is not None:
            k, v, visible = kv_cache.append(k, v)                        # (B, Hkv, L, hd), (B, 1, T, L)
            mask = visible if mask is None else np.logical_and(mask, visible)
        k = repeat_kv_heads(k, self.num_heads)                           # (B, H, L, hd)
        v = repeat_kv_heads(v, self.num_heads)                           # (B, H, L, hd)
        if return_attention_weights:
            context, weights = self.attention(q, k, v, mask=mask, return_attention_weights=True)
            return merge_heads(context) @ self.w_o.data, weights          # (B, T, E), (B, H, T, L)
        return merge_heads(self.attention(q, k, v, mask=mask)) @ self.w_o.data   # (B, T, E)
        ### END SOLUTION

    def get_memory_usage(self) -> dict:
        """The parameters of each weight and the bytes one token adds to a KV cache for this layer.

        Returns (to callers outside, with totals in MiB added by the boundary):
            {"parameter_counts": {"w_q": ..., "w_k": ..., "w_v": ..., "w_o": ...}, "kv_cache_bytes_per_token": ...}
        """
        ### BEGIN SOLUTION
        counts = {name: w.size for name, w in zip(("w_q", "w_k", "w_v", "w_o"), self.parameters)}
        bytes_per_token = 2 * self.num_kv_heads * self.head_dim * np.dtype(np.float32).itemsize   # K and V
        return {"parameter_counts": counts, "kv_cache_bytes_per_token": bytes_per_token}
        ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-multihead-init", "locked": true, "points": 3, "schema_version": 3, "solution": false}
def test_unit_multihead_init():
    """Your initialisation: the projections' shapes, a spread that keeps a projection at its input's scale, seeds."""
    layer = MultiHeadAttention(embed_dim=256, num_heads=8, num_kv_heads=2, seed=0)
    shapes = {"w_q": (256, 256), "w_k": (256, 64), "w_v": (256, 64), "w_o": (256, 256)}
    x = np.random.default_rng(1).standard_normal((4, 16, 256))                # unit variance
    for name, shape in shapes.items():
        weight = getattr(layer, name).data
        assert weight.shape == shape, f"{name}: expected shape {shape}, got {weight.shape}"
        spread = (x @ weight).std()
        assert 0.5 < spread < 1.6, f"x @ {name} of a unit-variance x has standard deviation {spread:.3f}, not about 1"
    again = MultiHeadAttention(embed_dim=256, num_heads=8, num_kv_heads=2, seed=0)
    np.testing.assert_array_equal(again.w_q.data, layer.w_q.data, err_msg="the same seed must give the same weights")
    print("multi-head init: shapes, spread and seeds as they should be")


test_unit_multihead_init()

# %% nbgrader={"grade": true, "grade_id": "test-multihead-attention", "locked": true, "points": 8, "schema_version": 3, "solution": false}
def test_unit_multihead_attention():
    """The worked example (plain, causal and grouped), and a padded row that reads as if alone."""
    x = np.array([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]])              # (B, T, E) = (1, 2, 4)
    layer = MultiHeadAttention(embed_dim=4, num_heads=2, seed=0)
    layer.w_q.data[...], layer.w_k.data[...], layer.w_v.data[...] = np.eye(4), np.eye(4), np.eye(4)
    layer.w_o.data[...] = 2 * np.eye(4)
    np.testing.assert_allclose(layer(x).data[0], [[1.340, 0, 2.000, 0], [1.000, 0, 3.777, 0]], atol=2e-3,
                               err_msg="worked example: 2 heads, identity projections, w_o = 2I")
    np.testing.assert_allclose(layer(x, mask=create_causal_mask(2)).data[0], [[2.000, 0, 0, 0], [1.000, 0, 3.777, 0]],
                               atol=2e-3, err_msg="worked example with a causal mask: token 0 sees only itself")
    grouped = MultiHeadAttention(embed_dim=4, num_heads=2, num_kv_heads=1, seed=0)
    grouped.w_q.data[...], grouped.w_o.data[...] = np.eye(4), 2 * np.eye(4)
    grouped.w_k.data[...], grouped.w_v.data[...] = np.eye(4)[:, :2], np.eye(4)[:, :2]
    np.testing.assert_allclose(grouped(x).data[0], [[1.340, 0, 1.000, 0], [1.000, 0, 1.609, 0]], atol=2e-3,
                               err_msg="worked example, one kv head (features 0-1) serving both query heads")
    _, weights = layer(x, return_attention_weights=True)
    np.testing.assert_allclose(weights.data[0, 1], [[0.5, 0.5], [0.056, 0.944]], atol=2e-3,
                               err_msg="head 1's weights in the worked example")

    rng = np.random.default_rng(3)
    padded = rng.normal(size=(2, 5, 16))
    padded[0, 3:] = 100.0                                                   # row 0: 3 real tokens, then junk
    layer = MultiHeadAttention(embed_dim=16, num_heads=4, seed=0)
    alone = layer(padded[:1, :3]).data
    with_padding = layer(padded, mask=create_padding_mask(np.array([3, 5]), 5)).data
    np.testing.assert_allclose(with_padding[0, :3], alone[0], rtol=1e-4, atol=1e-5,
                               err_msg="a padding mask: row 0's real tokens as if alone")
    print("multi-head attention: the worked example (plain, causal, grouped) and a padded batch all correct")


test_unit_multihead_attention()

# %% [markdown]
# **Try it.** Build `MultiHeadAttention(embed_dim=16, num_heads=4, seed=0)` and compare its
# output with and without `create_padding_mask(np.array([3, 5]), 5)` for row 1, which has no
# padding. Why is it identical? Then set `layer.w_o.data[:] = 0`: what comes out, and what does
# that tell you about where the heads' results are mixed?

# %% [markdown]
# ## Part 6: The KV cache
#
# A language model writes text one token at a time: run the model on the tokens so far, pick the
# next token, append it, repeat. Done naively, step *t* recomputes the keys and values of all *t*
# earlier tokens, although they have not changed: with causal attention, token *j*'s key and
# value depend only on tokens 0..*j*. Generating N tokens then costs
# $\sum_{t=1}^{N} O(t) = O(N^2)$ projections, and attention itself another $O(N^2)$ per step.
#
# A **KV cache** stores each token's keys and values once, when they are first computed. A
# decoding step then projects only the newest token, appends its key and value to the cache, and
# attends from one query to the t cached keys: O(t) work per token instead of O(t²).
#
# This cache preallocates one array per side, (max_batch, Hkv, max_seq, hd), and keeps one
# length per batch row. An update writes the new positions at `[length : length + new_len]`,
# exactly where they belong: no copies, no growing arrays, no reallocation while decoding.
#
# **Worked by hand.** A cache with max_seq_length 6. Row 0 holds 4 positions; appending 1 more
# writes position 4 and makes the length 5. Appending 2 more would need 7 > 6 positions: the
# provided check refuses before anything is written, so a failed update never leaves a
# half-written cache.
#
# ```
#   positions:       0    1    2    3    4    5          max_seq_length = 6
#   row 0 before:  [ k0 | k1 | k2 | k3 |    |    ]       length 4
#   update(0, k4): [ k0 | k1 | k2 | k3 | k4 |    ]       writes [4:5], length 5
#   update(0, 2):  refused: 5 + 2 = 7 > 6, nothing written
# ```
#
# **What it costs.** Each cached token holds a key and a value per kv head:
# 2 × Hkv × hd × 4 bytes (float32) per layer. For a 32-layer model with 32 heads of 128 that is
# 1 MiB per token, so a 4096-token context takes 4 GiB of cache per sequence. This is why
# serving systems page the cache in blocks (vLLM's PagedAttention), share key/value heads (GQA,
# Part 5) or store it in 8 bits.

# %% [markdown]
# ### Decoding with the cache: positions and the offset mask
#
# Pass a cache to `MultiHeadAttention.forward(..., kv_cache=cache)` and the layer hands this
# call's keys and values to `cache.append`, batch row b to cache row b. One code path serves both
# phases of generation:
#
# - **prefill**: the whole prompt in one call (T = prompt length), and
# - **decode**: one token per call (T = 1).
#
# The heart of the cache is knowing *where* the new queries sit. After appending, row b holds
# `lengths[b]` positions, and this call's T queries are its last T: query i sits at position
# `lengths[b] − T + i`. It may see every key at or before its own position, the offset causal
# mask of Part 1, row by row. Rows may hold different lengths (a batch of prompts of different
# sizes), so each row gets its own offset; keys past a row's length are padding up to the
# longest row and must stay hidden, which the same comparison does for free.
#
# **Worked by hand.** Two rows holding 3 and 1 positions; append T = 2 new positions. The
# lengths become [5, 3] and the longest is L = 5. Row 0's queries sit at positions 3 and 4,
# row 1's at 1 and 2:
#
# ```
# row 0, query at 3: [1, 1, 1, 1, 0]      row 1, query at 1: [1, 1, 0, 0, 0]
# row 0, query at 4: [1, 1, 1, 1, 1]      row 1, query at 2: [1, 1, 1, 0, 0]
# ```

# %%
draw_kv_cache(prompt_length=4, steps=3, max_seq_length=8)

# %% [markdown]
# **Your task**: the cache, whole. The arrays, `get_sequence` (a row read back as views) and
# `reset` are provided by `KVCacheBase`; the row and room checks run before your code does.
# `KVCache(max_batch_size, max_seq_length, num_heads, head_dim)` keeps its arguments as
# attributes of those names, where `num_heads` is the number of **kv** heads, Hkv, and makes
# `cached_keys` and `cached_values`, (max_batch_size, Hkv, max_seq_length, hd) zeros, and
# `cache_lengths`, one int per row.
#
# - `update(batch_idx, new_keys, new_values)`: write the (Hkv, new_len, hd) keys and values
#   after what the row holds, advance its length, and return the row's whole cached keys and
#   values as views into the preallocated arrays (slicing makes views; copying would defeat
#   the cache).
# - `append(new_keys, new_values)`, which the multi-head layer calls: update each batch row
#   0..B−1 with its (Hkv, T, hd) slice (calling your `self.update` is right: inside your code it
#   is not checked again and returns arrays), then return the cached keys and values of those rows up
#   to the longest one, L, (B, Hkv, L, hd) each, and the (B, 1, T, L) boolean mask of which
#   cached keys each new query may see. B may be 0 (an empty batch): then L is 0, and a maximum
#   over no rows needs `initial=0`, as in Part 2.
# - `get_memory_usage`: `total_bytes`, what the cache allocates for keys and values together;
#   `bytes_per_token`, what one cached token takes; and `utilization`, the fraction of the
#   cache's positions, over all rows, that are filled. The caller gets them through the provided
#   boundary, which turns `total_bytes` into `total_mb` (MiB) and adds `mb_per_sequence`: the
#   cells and tests below read `total_mb`.

# %% nbgrader={"grade": false, "grade_id": "kv-cache", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
class KVCache(KVCacheBase):
    """Preallocated keys and values for incremental decoding, one length per batch row.

    KVCache(max_batch_size, max_seq_length, num_heads, head_dim): the arrays cached_keys and
    cached_values, (max_batch_size, num_heads, max_seq_length, head_dim), and cache_lengths are
    made by the provided `KVCacheBase`, with `get_sequence` and `reset`.
    """

    def update(self, batch_idx: int, new_keys, new_values):
        """Append (Hkv, new_len, hd) keys and values to row `batch_idx`.

        Returns:
            (keys, values): the row's whole cached sequence, (Hkv, length, hd) each, as views.
        """
        ### BEGIN SOLUTION
        start = int(self.cache_lengths[batch_idx])
        end = start + new_keys.shape[1]
        self.cached_keys[batch_idx, :, start:end] = new_keys             # (Hkv, new_len, hd)
        self.cached_values[batch_idx, :, start:end] = new_values
        self.cache_lengths[batch_idx] = end
        return self.cached_keys[batch_idx, :, :end], self.cached_values[batch_idx, :, :end]
        ### END SOLUTION

    def append(self, new_keys, new_values):
        """Append (B, Hkv, T, hd) keys and values to rows 0..B-1 and say what each new query may see.

        Returns:
            keys, values: (B, Hkv, L, hd) arrays, every row's cache up to the longest row L;
            visible: (B, 1, T, L) boolean array, True where query i of row b may attend to key j.
        """
        ### BEGIN SOLUTION
        B, _, T, _ = new_keys.shape
        for b in range(B):
            self.update(b, new_keys[b], new_values[b])
        lengths = self.cache_lengths[:B]                                        # (B,) after appending
        longest = int(lengths.max()) if B else T
        keys = self.cached_keys[:B, :, :longest]                                # (B, Hkv, L, hd)
        values = self.cached_values[:B, :, :longest]                            # (B, Hkv, L, hd)
        query_positions = lengths[:, None] - T + np.arange(T)[None, :]          # (B, T)
        key_positions = np.arange(longest)                                      # (L,)
        visible = key_positions[None, None, :] <= query_positions[:, :, None]   # (B, T, L)
        return keys, values, visible[:, None]                                   # ..., (B, 1, T, L)
        ### END SOLUTION

    def get_memory_usage(self) -> dict:
        """What the cache allocates and how full it is.

        Returns (to callers outside, with MiB and per-sequence figures added by the boundary):
            {"total_bytes": ..., "bytes_per_token": ..., "utilization": ...}
        """
        ### BEGIN SOLUTION
        total_bytes = self.cached_keys.nbytes + self.cached_values.nbytes
        bytes_per_token = 2 * self.num_heads * self.head_dim * self.cached_keys.itemsize
        utilization = float(self.cache_lengths.sum()) / (self.max_batch_size * self.max_seq_length)
        return {"total_bytes": total_bytes, "bytes_per_token": bytes_per_token, "utilization": utilization}
        ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-kv-cache", "locked": true, "points": 6, "schema_version": 3, "solution": false}
def test_unit_kv_cache():
    """The worked example: 4 positions, then 1 more, then a refused overflow; then a reset row reused."""
    rng = np.random.default_rng(4)
    cache = KVCache(max_batch_size=2, max_seq_length=6, num_heads=2, head_dim=3)
    first_k, first_v = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 3))
    cache.update(0, first_k, first_v)
    next_k, next_v = rng.normal(size=(2, 1, 3)), rng.normal(size=(2, 1, 3))
    keys, values = cache.update(0, next_k, next_v)
    np.testing.assert_allclose(keys.data, np.concatenate([first_k, next_k], axis=1), rtol=1e-6,
                               err_msg="row 0's keys after appending 4 then 1 positions")
    np.testing.assert_allclose(values.data, np.concatenate([first_v, next_v], axis=1), rtol=1e-6,
                               err_msg="row 0's values after appending 4 then 1 positions")
    assert cache.cache_lengths.tolist() == [5, 0], f"lengths: expected [5, 0], got {cache.cache_lengths.tolist()}"
    assert np.shares_memory(cache.get_sequence(0)[0].data, cache.cached_keys), "get_sequence must return views, not copies"

    before = cache.cached_keys.copy()
    try:
        cache.update(0, rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3)))
        raise AssertionError("appending 2 positions to a row holding 5 of 6 must raise")
    except ValueError:
        pass
    np.testing.assert_array_equal(cache.cached_keys, before, err_msg="a refused update must change nothing")

    cache.reset(0)
    assert cache.cache_lengths.tolist() == [0, 0], f"reset(0): lengths expected [0, 0], got {cache.cache_lengths.tolist()}"
    keys, _ = cache.update(0, next_k, next_v)
    np.testing.assert_allclose(keys.data, next_k, rtol=1e-6, err_msg="after reset(0), the row starts again at 0")
    print("KV cache: appends, views, per-row lengths, refused overflow and reset all correct")


test_unit_kv_cache()

# %% nbgrader={"grade": true, "grade_id": "test-cached-decoding", "locked": true, "points": 10, "schema_version": 3, "solution": false}
def test_unit_cached_decoding():
    """The worked example's mask, and prefill + one-token steps equal to one causal forward."""
    cache = KVCache(max_batch_size=2, max_seq_length=6, num_heads=1, head_dim=2)
    cache.update(0, np.ones((1, 3, 2)), np.ones((1, 3, 2)))                # rows hold 3 and 1 positions
    cache.update(1, np.ones((1, 1, 2)), np.ones((1, 1, 2)))
    keys, _, visible = cache.append(np.zeros((2, 1, 2, 2)), np.zeros((2, 1, 2, 2)))
    assert keys.shape == (2, 1, 5, 2), f"keys: expected (2, 1, 5, 2), padded to the longest row, got {keys.shape}"
    np.testing.assert_array_equal(visible[:, 0], [[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                                                  [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]],
                                  err_msg="the worked example: rows holding 3 and 1 positions, 2 appended")

    rng = np.random.default_rng(5)
    for num_kv_heads in (4, 2, 1):
        layer = MultiHeadAttention(embed_dim=16, num_heads=4, num_kv_heads=num_kv_heads, seed=1)
        x = rng.normal(size=(2, 9, 16)).astype(np.float32)
        full = layer(x, mask=create_causal_mask(9)).data
        cache = KVCache(max_batch_size=2, max_seq_length=9, num_heads=num_kv_heads, head_dim=4)
        steps = [layer(x[:, :5], kv_cache=cache).data]                          # prefill 5 tokens
        steps += [layer(x[:, t:t + 1], kv_cache=cache).data for t in range(5, 9)]   # decode 4 more
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5,
                                   err_msg=f"prefill + decode against one causal forward, {num_kv_heads} kv heads")
    print("cached decoding: the worked mask, and prefill + decode equal one causal forward for MHA, GQA and MQA")


test_unit_cached_decoding()

# %% [markdown]
# ### What grouped key/value heads save
#
# The cache holds Hkv heads, not H. The same 8-query-head layer with 8, 2 and 1 key/value heads,
# caching a batch of 4 sequences of up to 2,048 tokens. The megabytes are what the cache
# allocates (computed by your `get_memory_usage` from its arrays' sizes). Before you run it,
# work out the first row yourself: 4 sequences × 2,048 positions × 2 (keys and values) × 8 heads
# × 64 numbers × 4 bytes. How much smaller will the other two rows be?

# %%
for kv_heads in (8, 2, 1):
    layer = MultiHeadAttention(embed_dim=512, num_heads=8, num_kv_heads=kv_heads, seed=0)
    cache = KVCache(max_batch_size=4, max_seq_length=2048, num_heads=kv_heads, head_dim=layer.head_dim)
    usage, info = cache.get_memory_usage(), layer.get_memory_usage()
    print(f"num_kv_heads={kv_heads}: cache {usage['total_mb']:6.1f} MiB, {usage['bytes_per_token']:5d} bytes "
          f"per token, projections {info['parameter_count']:,} parameters, saving {info['kv_cache_saving']:.0f}x")

# %% [markdown]
# **What the layer and its cache cost, by hand.** `MultiHeadAttention(embed_dim=16, num_heads=4,
# num_kv_heads=2)` has hd = 4. Its weights hold w_q 16 × 16 = 256, w_k and w_v 16 × 8 = 128
# each, and w_o 256 parameters: 768 in all, 768 × 4 bytes = 3 KiB. Each token it caches adds a
# key and a value for 2 kv heads of width 4: 2 × 2 × 4 × 4 = **64 bytes**, half of what 4 kv
# heads would take. A `KVCache(max_batch_size=2, max_seq_length=8, num_heads=2, head_dim=4)`
# for it allocates 2 rows × 8 positions × 64 bytes = 1 KiB, and after rows of 5 and 3 tokens its
# utilization is 8 / 16 = 0.5.

# %% nbgrader={"grade": true, "grade_id": "test-memory-costs", "locked": true, "points": 3, "schema_version": 3, "solution": false}
def test_unit_memory_costs():
    """The worked example: the parameters of a grouped-query layer and the bytes of its cache."""
    layer = MultiHeadAttention(embed_dim=16, num_heads=4, num_kv_heads=2, seed=0)
    info = layer.get_memory_usage()
    assert info["parameter_counts"] == {"w_q": 256, "w_k": 128, "w_v": 128, "w_o": 256}, \
        f"parameter_counts: got {info['parameter_counts']}"
    assert info["parameter_count"] == 768 and info["parameter_mb"] == 3 / 1024, \
        f"768 parameters, 3 KiB: got {info['parameter_count']} and {info['parameter_mb']} MiB"
    assert info["kv_cache_bytes_per_token"] == 64, f"64 bytes per cached token: got {info['kv_cache_bytes_per_token']}"

    cache = KVCache(max_batch_size=2, max_seq_length=8, num_heads=2, head_dim=4)
    x = np.random.default_rng(5).normal(size=(2, 5, 16))
    layer(x, kv_cache=cache)                                            # both rows hold 5 tokens
    cache.reset(1)
    cache.update(1, np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))           # row 1 now holds 3
    usage = cache.get_memory_usage()
    assert usage["total_mb"] == 1 / 1024, f"2 rows x 8 positions x 64 bytes = 1 KiB: got {usage['total_mb']} MiB"
    assert usage["bytes_per_token"] == 64, f"bytes_per_token: expected 64, got {usage['bytes_per_token']}"
    assert usage["utilization"] == 0.5, f"rows of 5 and 3 of 2 x 8 positions: expected 0.5, got {usage['utilization']}"
    print("memory costs: the layer's parameters and its cache's bytes match the worked example")


test_unit_memory_costs()

# %% [markdown]
# **Try it.** Prefill a cache with a 5-token prompt, then call the layer with T = 2 new tokens at
# once (speculative decoding checks several guessed tokens in one call). Compare with the last
# two rows of one causal forward over all 7 tokens. Then make the cache one position too short
# and read the error: what changed in the cache?

# %% [markdown]
# ## Part 7: Production patterns: the same numbers, computed faster
#
# Your `math_attention` is the definition of attention, and it is correct. It is also slower than
# it needs to be, for the reasons production kernels are built around:
#
# 1. **Memory traffic, not arithmetic.** Every step of the formula makes a new (…, T, S) array:
#    the scores, the scaled scores, the masked scores, the exponentials, the weights. At
#    B = 4, H = 8, T = S = 512 each is 32 MiB, far larger than the CPU caches, so each step
#    streams it from main memory and back. The arithmetic per byte is tiny; the memory bus is
#    the limit.
# 2. **One core.** NumPy's element-wise functions (`exp`, `max`, the divisions) run on one core;
#    only the matrix products use the BLAS library's threads.
# 3. **Work that is thrown away.** With a causal mask, almost half of the scores are computed and
#    then set to −∞.
#
# The idea of a fast kernel fits in a short function. Below, `tiled_attention` processes a
# block of query rows at a time, so that the block's scores stay in the CPU cache; it scales Q
# once instead of the scores; it exponentiates in place; it divides the (rows, d_v) output by
# the row sums instead of the (rows, S) weights; and with `causal=True` each block reads only
# the keys its last row may see. It is single-threaded and is not exported: it is here to read
# and to run.

# %%
from tinytorch.core._attention_backend import attention_backend, fast_attention, single_threaded_blas


def tiled_attention(q, k, v, causal=False, rows=64):
    """softmax(q kᵀ / √d) v for 2-D q (T, d), k (S, d), v (S, dv), one block of query rows at a time."""
    T, S = q.shape[0], k.shape[0]
    q = q * (1.0 / np.sqrt(q.shape[1]))                       # scale Q once: T·d multiplies, not T·S
    output = np.empty((T, v.shape[1]), dtype=np.float32)
    for r0 in range(0, T, rows):
        r1 = min(r0 + rows, T)
        seen = min(S, r1 + S - T) if causal else S              # keys the block's last row may see
        scores = q[r0:r1] @ k[:seen].T                          # (rows, seen): fits in the CPU cache
        if causal:                                              # only the diagonal part is masked
            hidden = np.arange(seen)[None, :] > np.arange(r0, r1)[:, None] + (S - T)
            scores[hidden] = -np.inf
        scores -= scores.max(axis=1, keepdims=True)
        np.exp(scores, out=scores)                              # in place: no new array
        output[r0:r1] = (scores @ v[:seen]) / scores.sum(axis=1, keepdims=True)   # normalise late
    return output


rng = np.random.default_rng(6)
q7, k7, v7 = (rng.standard_normal((1024, 64), dtype=np.float32) for _ in range(3))
reference = math_attention(q7, k7, v7, mask=create_causal_mask(1024))[0].data
print("tiled causal attention equals math_attention:",
      np.allclose(tiled_attention(q7, k7, v7, causal=True), reference, atol=1e-5))
with single_threaded_blas():                                    # one core for both, a fair comparison
    for name, run in (("math_attention", lambda: math_attention(q7, k7, v7, mask=create_causal_mask(1024))),
                      ("tiled_attention", lambda: tiled_attention(q7, k7, v7, causal=True))):
        times = []
        for _ in range(7):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"{name:>16}: median {np.median(times) * 1e3:6.2f} ms over 7 runs (causal, T = S = 1024, one thread)")

# %% [markdown]
# The provided `fast_attention` (in `_attention_backend_dev.py`, on the kernel in
# `_attention_kernel_dev.py`) is the same idea, industrial:
#
# - it runs the tiles on a **thread pool**: the calling thread plus one more thread per further
#   core. NumPy releases Python's global interpreter lock inside `exp` and inside BLAS, so the
#   threads really run in parallel, and BLAS is held at one thread while they do, so that the two
#   kinds of threads do not fight over the cores;
# - inside your multi-head layer it leaves the pool alone. Your projections have just run on
#   BLAS's own threads, and after a call OpenBLAS keeps them spinning for about 0.1 s, waiting for
#   more work. A pool thread would share a core with one of them, so the tiles run on the calling
#   thread and let BLAS use its threads. (If BLAS is limited to one thread, none spin, and the
#   pool runs as usual.)
# - it tiles every batch and head, and with a causal mask its tiles span all heads at once (a
#   group of them at very long sequences), so that one batched product replaces many small ones;
# - it reads a `CausalMask`'s offset to skip the future without ever looking at the mask.
#
# It replaces only the attention core, inside `ScaledDotProductAttention`: your multi-head
# layer and your caches run around it exactly as on the math path.
#
# Each of these is kept only because a measurement showed it pays: `tito bench --ablation`
# switches them off one at a time, and the kernel's file opens with what each one bought.
#
# **Why keep both?** PyTorch makes the same choice with its "math" and fused kernels. The
# readable version is the specification: the fast one is tested against it, so an optimisation
# can never silently change the answer. Grading runs the readable one, your code.
#
# **The switch.** Every attention layer runs your `math_attention` unless you turn the tuned
# kernel on, which is one named switch: `with attention_backend("fast"):` around the calls that
# should use it, or `set_attention_backend("fast")` once for the whole process
# (`set_attention_backend("math")` turns it off again). Before you run the cell below, write
# down a guess: how many times faster than your code will the tuned kernel be on a
# (1, 8, 512, 64) attention on your machine?

# %%
switch_layer = ScaledDotProductAttention().eval()
q_switch, k_switch, v_switch = (rng.standard_normal((1, 8, 512, 64), dtype=np.float32) for _ in range(3))
switch_times = {}
with single_threaded_blas():                  # as Part 9 measures: BLAS threads would fight the timing
    for backend in ("math", "fast"):
        with attention_backend(backend):
            switch_layer(q_switch, k_switch, v_switch)            # warm-up, not timed
            times = []
            for _ in range(9):
                start = time.perf_counter()
                switch_layer(q_switch, k_switch, v_switch)
                times.append(time.perf_counter() - start)
            switch_times[backend] = np.percentile(times, [25, 50, 75])
for backend, label in (("math", "your math path"), ("fast", "attention_backend('fast')")):
    q25, median, q75 = switch_times[backend] * 1e3
    print(f"{label:>26}: median {median:6.1f} ms, spread {q75 - q25:5.1f} ms over 9 calls")
print(f"the tuned kernel is {switch_times['math'][1] / switch_times['fast'][1]:.1f}x faster here "
      f"(BLAS held at one thread; the tuned kernel runs its own thread per core)")

# %%
def test_unit_fast_attention():
    """The provided fast kernel agrees with your math_attention on every kind of mask."""
    rng = np.random.default_rng(6)
    cases = {"no mask": ((2, 3, 300, 16), (2, 3, 280, 16), None),
             "causal": ((2, 3, 300, 16), (2, 3, 300, 16), create_causal_mask(300)),
             "offset causal": ((1, 2, 260, 8), (1, 2, 400, 8), create_causal_mask(260, 400)),
             "random mask": ((4, 1, 5, 8), (4, 1, 9, 8), rng.random((4, 1, 5, 9)) > 0.5),
             "shared key head": ((2, 4, 320, 8), (2, 1, 320, 8), rng.random((320, 320)) > 0.3)}
    for name, (q_shape, k_shape, mask) in cases.items():
        q, k = rng.normal(size=q_shape), rng.normal(size=k_shape)
        v = rng.normal(size=k_shape[:-1] + (6,))
        expected_output, expected_weights = math_attention(q, k, v, mask)
        output, weights = fast_attention(q, k, v, mask)
        np.testing.assert_allclose(output.data, expected_output.data, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(weights.data, expected_weights.data, rtol=1e-4, atol=1e-6, err_msg=name)
    print("fast attention: equals math_attention for plain, causal, offset, random and shared-head masks")


test_unit_fast_attention()

# %% [markdown]
# **Try it.** Change `rows` in `tiled_attention` to 8, 64, 512 and 1024, and time each. Why is
# a very small block slow (think of Python's per-call overhead) and a very large one slow too
# (think of the cache)? Then run `tiled_attention` without `causal` and compare: how close to
# half the time does skipping the future get you?

# %% [markdown]
# ## Part 8: Attention that never forms the T × S matrix
#
# Even the fast kernel builds every score once. The *memory* that attention needs is what limits
# context length: the weights of one layer at T = S = 4096 with 8 heads are 8 · 4096² · 4 bytes
# = 512 MiB, and the math path holds several such arrays at once. Doubling the context quadruples
# them.
#
# FlashAttention (Dao et al., 2022) computes exactly the same output while holding only one small
# block of scores at a time. The obstacle is the softmax: a row's normalisation needs the maximum
# and the sum over *all* its keys, which seem to need the whole row. The **online softmax**
# (Milakov and Gimelshein, 2018) removes it. Walk over the keys block by block and keep, for each
# query row, three running quantities:
#
# - $m$, the largest score seen so far,
# - $\ell = \sum_j e^{s_j - m}$ over the keys seen so far,
# - $a = \sum_j e^{s_j - m}\, v_j$, the unnormalised output.
#
# When a new block of scores $s'$ arrives, the maximum may grow to $m' = \max(m, \max s')$. Every
# term stored so far was computed relative to $m$; multiplying by $c = e^{m - m'}$ rewrites it
# relative to $m'$:
#
# $$\ell \leftarrow c\,\ell + \sum_{j \in \text{block}} e^{s'_j - m'}, \qquad
#   a \leftarrow c\,a + \sum_{j \in \text{block}} e^{s'_j - m'}\, v_j, \qquad m \leftarrow m'.$$
#
# After the last block the output is $a / \ell$, the same number the full softmax gives, up to
# float rounding.
#
# **Worked by hand.** One query with scores [1, 3] against values [10, 20], in blocks of one key.
# After key 0: m = 1, ℓ = e⁰ = 1, a = 10. Key 1 arrives with score 3: m' = 3, c = e^(1−3) =
# 0.135, so ℓ = 0.135 + 1 = 1.135 and a = 0.135 · 10 + 20 = 21.35. The output is
# a / ℓ = **18.81**, and the full softmax gives weights [0.119, 0.881] and 0.119 · 10 + 0.881 · 20
# = 18.81. Forget the rescaling by c and you get (10 + 20) / 2 = 15.
#
# Two details keep it exact under masks. Masked scores are −∞ and contribute $e^{-\infty} = 0$.
# A row that has seen only masked keys so far has $m = -\infty$; use 0 in its place when
# exponentiating (as in Part 2), so that nothing becomes `nan`, and divide by 1 when ℓ = 0 at the
# end. With a causal mask of offset S − T, a query block of rows i0..i1 − 1 ends with the query
# at position i1 − 1 + offset, so the keys from min(S, i1 + offset) on are every row's future:
# the loop over key blocks stops there, and nothing after it is computed.
#
# ```
#   T = S = 12, block_size = 4, causal (offset 0)     key blocks →   0..3    4..7    8..11
#   query block 0..3   stops at key 4: reads key block 0 only        [diag]  skip    skip
#   query block 4..7   stops at key 8: reads key blocks 0, 1         [full]  [diag]  skip
#   query block 8..11  stops at key 12: reads key blocks 0, 1, 2     [full]  [full]  [diag]
#   per query block, running m, ℓ, a: (rows, 1), (rows, 1), (rows, d_v); never a (T, S) array
# ```

# %%
draw_blocked_loop(seq_len=12, key_len=12, block_size=4, causal=True)

# %% [markdown]
# The scores now take O(block²) memory per head instead of O(T · S). (A mask you pass is yours
# and stays as large as it is: `create_causal_mask(T)` is itself a T × S array. What blocked
# attention removes are the scores, exponentials and weights the formula would add.)
#
# **Your task**: the whole loop. For each block of `block_size` query rows, scale its queries,
# start m, ℓ and a, walk over the key blocks, updating them, and write a / ℓ into the block's
# rows of the output. Leading axes (batch, heads) broadcast as in `math_attention`. With a
# causal mask, stop each query block at min(S, i1 + offset), after the last key its last row may
# see: a causal mask arrives with its offset as `mask.offset` (`getattr(mask, "offset", None)`
# is None for any other mask), and no key after that stop may be read, not even in a block that
# straddles it. Keep m and ℓ of shape (…, rows, 1) and a of shape (…, rows, d_v), so that they
# broadcast against each block's (…, rows, cols) scores.
#
# A mask may have axes of size 1 that broadcast, such as a (B, 1, 1, S) padding mask: one row of
# flags serves every query. Slicing such an axis at rows i0:i1 gives an empty array past the first
# row, so broadcast the mask to (…, T, S) first (`np.broadcast_to` makes a view, not a copy) and
# slice that. The leading shape of m, ℓ, a and the output is that of query, key, value and the
# mask broadcast together (`np.broadcast_shapes`).
#
# With `return_logsumexp=True`, also return each row's m + log ℓ, shape (…, T), and −inf for a
# row that sees no key: what a training step keeps for the backward pass of Part 11, whose
# graded tests check it.

# %% nbgrader={"grade": false, "grade_id": "blocked-attention", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def blocked_attention(query, key, value, mask=None, scale=None, block_size: int = 128, return_logsumexp: bool = False):
    """Attention computed block by block with an online softmax; never forms the T x S scores.

    Args:
        query, key, value, mask, scale: as for `math_attention`; a causal mask carries its `offset`.
        block_size: queries and keys per block.
        return_logsumexp: also return each row's m + log(l), what training keeps (Part 11).
    Returns:
        (..., T, d_v) float32 array, equal to `math_attention`'s output; with return_logsumexp,
        (output, logsumexp (..., T)), -inf for a row that sees no key.
    """
    ### BEGIN SOLUTION
    lead = np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    T, S, dv = query.shape[-2], key.shape[-2], value.shape[-1]
    offset = getattr(mask, "offset", None)                              # a causal mask's offset, or None
    keep = None if mask is None else np.broadcast_to(mask, lead + (T, S))   # a view, not a copy
    output = np.zeros(lead + (T, dv), dtype=np.float32)
    logsumexp = np.full(lead + (T,), -np.inf, dtype=np.float32)          # Part 11: m + log l per row
    for i0 in range(0, T, block_size):
        i1 = min(i0 + block_size, T)
        stop = S if offset is None else min(S, max(0, i1 + offset))         # keys after it: every row's future
        q_block = query[..., i0:i1, :] * np.float32(scale)                  # (..., rows, d)
        row_max = np.full(lead + (i1 - i0, 1), -np.inf, dtype=np.float32)  # m
        row_sum = np.zeros(lead + (i1 - i0, 1), dtype=np.float32)          # l
        acc = np.zeros(lead + (i1 - i0, dv), dtype=np.float32)             # a
        for j0 in range(0, stop, block_size):
            j1 = min(j0 + block_size, stop)
            scores = q_block @ np.swapaxes(key[..., j0:j1, :], -1, -2)     # (..., rows, cols)
            if mask is not None:                                            # keep: the mask, broadcast
                scores = np.where(keep[..., i0:i1, j0:j1], scores, -np.inf)
            new_max = np.maximum(row_max, scores.max(axis=-1, keepdims=True))
            safe_max = np.where(np.isneginf(new_max), 0.0, new_max)         # rows that saw no key yet
            correction = np.exp(row_max - safe_max)                         # c = e^(m - m')
            exps = np.exp(scores - safe_max)                                # (..., rows, cols)
            row_sum = row_sum * correction + exps.sum(axis=-1, keepdims=True)
            acc = acc * correction + exps @ value[..., j0:j1, :]            # (..., rows, dv)
            row_max = new_max
        output[..., i0:i1, :] = acc / np.where(row_sum > 0.0, row_sum, 1.0)
        logsumexp[..., i0:i1] = (row_max + np.log(np.where(row_sum > 0.0, row_sum, 1.0)))[..., 0]   # -inf: no key
    return (output, logsumexp) if return_logsumexp else output
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-blocked-attention", "locked": true, "points": 10, "schema_version": 3, "solution": false}
def test_unit_blocked_attention():
    """The worked example, every mask and block size against math_attention, and the causal stop."""
    from tinytorch.core._attention_checks import keep_mask
    output = blocked_attention(np.array([[1.0]]), np.array([[1.0], [3.0]]), np.array([[10.0], [20.0]]),
                               scale=1.0, block_size=1)
    np.testing.assert_allclose(output.data, [[18.81]], atol=1e-2, err_msg="worked example: scores [1, 3], blocks of 1")

    rng = np.random.default_rng(7)
    q, k, v = rng.normal(size=(2, 3, 37, 8)) * 3, rng.normal(size=(2, 3, 53, 8)) * 3, rng.normal(size=(2, 3, 53, 5))
    cases = {"no mask": (k, v, None), "offset causal": (k, v, create_causal_mask(37, 53)),
             "random mask": (k, v, rng.random((2, 1, 37, 53)) > 0.6),
             "padding (2, 1, 1, 53): one row of flags for every query": (k, v, create_padding_mask(np.array([40, 53]), 53)),
             "causal, first 17 rows see nothing": (k[..., :20, :], v[..., :20, :], create_causal_mask(37, 20))}
    for name, (keys, values, mask) in cases.items():
        expected = math_attention(q, keys, values, mask)[0].data
        for block_size in (1, 8, 16, 64):
            try:
                actual = blocked_attention(q, keys, values, mask, block_size=block_size).data
            except ValueError as error:                                 # e.g. a mask block of the wrong shape
                raise AssertionError(f"mask: {name}, block_size={block_size}: {error}") from error
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4,
                                       err_msg=f"mask: {name}, block_size={block_size}")
    layer = ScaledDotProductAttention(block_size=16)                 # the layer runs blocks on every core
    np.testing.assert_allclose(layer(q, k, v, mask=create_causal_mask(37, 53)).data,
                               math_attention(q, k, v, create_causal_mask(37, 53))[0].data, rtol=1e-4, atol=1e-4,
                               err_msg="ScaledDotProductAttention(block_size=16), offset causal")

    # The causal stop: with create_causal_mask(4, 9) (offset 5) and blocks of 2, rows 0-1 see keys 0..6 and
    # stop at key 7; only row 3 sees key 8. A NaN in value row 8 must not reach rows 0-1. The input checks
    # refuse NaN, so this calls your function as the layer does, past them, with the causal mask as the
    # boolean array that keeps its offset.
    poisoned = np.arange(18, dtype=np.float32).reshape(9, 2)
    poisoned[8] = np.nan
    causal = keep_mask(create_causal_mask(4, 9), (4, 9))
    with np.errstate(invalid="ignore"):
        output = blocked_attention.student_function(np.zeros((4, 2), np.float32), np.ones((9, 2), np.float32),
                                                    poisoned, causal, 1.0, 2)
    assert np.isfinite(output[:2]).all(), \
        "create_causal_mask(4, 9), blocks of 2: query rows 0-1 read key 8, past their stop min(S, i1 + offset) = 7"
    print("blocked attention: the worked example, math_attention's output for every mask and block size, "
          "and no key read past the causal stop")


test_unit_blocked_attention()

# %% [markdown]
# **Try it.** Set c to 1 in your loop (no rescaling) and rerun the worked example: you should
# get 15 instead of 18.81. Then, once you have written `AttentionProfiler.peak_memory` in
# Part 9, measure the peak memory of `blocked_attention` against `math_attention` at T = 2048
# for block sizes 32, 128 and 512: which block size would you pick, and why?

# %% [markdown]
# ## Part 9: Measuring what attention costs
#
# Claims about complexity are easy to make and easy to get wrong; a measurement settles them,
# if it is made well. A laptop is busy with other work, and one timing can be off by a factor of
# ten. So `AttentionProfiler` measures the way benchmarks do:
#
# - **time** with `time.perf_counter`, the clock meant for measuring intervals. A few **warm-up**
#   calls come first and are not timed: the first call pays for page faults, cache misses and
#   thread start-up. Then several timed **repeats**, summarised by their **median**, which a
#   few slow outliers do not move, and their **spread**, the interquartile range (the 75th
#   minus the 25th percentile), so that you can see when a number is noisy.
# - **threads held fixed**: the whole sweep runs with BLAS on one thread. Otherwise the library
#   switches between one and several threads at some size, and a second thread that waits for a
#   busy core makes one size look many times slower than its neighbours.
# - **peak memory** with `tracemalloc`, which NumPy reports every array allocation to: the peak
#   number of bytes allocated during a call, above what was allocated when it started.
#
# **Fitting the exponent.** A cost that grows as $c \cdot T^p$ is a straight line on log-log
# axes: $\log(\text{cost}) = \log c + p \log T$. So fit a straight line to (log T, log cost) by
# least squares, and its slope is the measured exponent p. Worked by hand: times of 3, 12 and
# 48 ms at T = 100, 200 and 400 quadruple with each doubling, and the slope is
# log(4) / log(2) = **2**.
#
# **Your task**: four measurements, each a method of `AttentionProfiler`.
#
# - `measure_time(function)`: warm up, time the repeats, and summarise them in milliseconds as
#   the median, the spread and every run.
# - `peak_memory(function)`: the bytes a call allocates at its peak beyond what was allocated
#   before it. The provided boundary starts `tracemalloc` around your method (and stops it
#   after, if it started it), so it is tracing while your code runs; read its documentation to find how to ask
#   for the bytes allocated now and at the peak, and how to start a new peak, and think about
#   why a peak reached before the call must not count.
# - `fit_exponent(sizes, costs)`: the slope of the least-squares line through
#   (log size, log cost), from its formula: slope = cov(x, y) / var(x) with x = log size and
#   y = log cost. (`np.polyfit` would do it for you; write it so that you see what it does.)
# - `compare_generation`: a fixed random (B, prompt_length + new_tokens, E) sequence from
#   `np.random.default_rng(self.seed)`; then prefill a new `KVCache` with the prompt and decode
#   one position per call through it, timing each call; then, for the same positions, recompute
#   a causal forward over everything so far and keep its last position (time the whole step,
#   making its causal mask included, since a server pays for that too). Size the cache for the
#   layer. Return what you measured: `prefill_ms`, the lists `cached_ms` and `recompute_ms`
#   (one time per new token), and `cached_out` and `recompute_out`, lists of the (B, 1, E) output
#   arrays of each step, so that the two ways can be compared. The provided boundary holds BLAS
#   at one thread around this method: you need not. Inside it, your layer and
#   `create_causal_mask` are called as from outside: checked, with `Tensor`s back (read `.data`). The caller gets a report made from them by
#   the provided boundary: your lists come back as `cached_token_ms` and `recompute_token_ms`,
#   beside their medians `cached_ms_per_token` and `recompute_ms_per_token`, the ratio of the
#   total times `speedup`, and `max_abs_difference` between the two ways' outputs. The test and
#   the cells below read those names.

# %% nbgrader={"grade": false, "grade_id": "attention-profiler", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
class AttentionProfiler(ProfilerSweeps):
    """Measured costs of attention: wall time (time.perf_counter) and peak memory (tracemalloc).

    The sweeps over sequence lengths (`measure_attention_scaling`, `analyze_quadratic_scaling`)
    are provided in `ProfilerSweeps`; they hold BLAS at one thread, and a causal sweep uses your
    causal mask, handed in here.
    """

    causal_mask = staticmethod(create_causal_mask)

    def __init__(self, repeats: int = 5, warmup: int = 1, seed: int = 0):
        self.repeats, self.warmup, self.seed = repeats, warmup, seed

    def measure_time(self, function) -> dict:
        """`function()` timed `repeats` times after `warmup` untimed calls.

        Returns:
            median_ms, spread_ms (75th minus 25th percentile) and runs_ms, the times of every repeat.
        """
        ### BEGIN SOLUTION
        for _ in range(self.warmup):
            function()
        runs_ms = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            function()
            runs_ms.append((time.perf_counter() - start) * 1e3)
        q25, median, q75 = np.percentile(runs_ms, [25, 50, 75])
        return {"median_ms": float(median), "spread_ms": float(q75 - q25), "runs_ms": runs_ms}
        ### END SOLUTION

    @staticmethod
    def fit_exponent(sizes, costs) -> float:
        """The slope p of the least-squares line through (log size, log cost): cost ~ size^p."""
        ### BEGIN SOLUTION
        x, y = np.log(sizes), np.log(costs)
        x_centred = x - x.mean()
        return float((x_centred * (y - y.mean())).sum() / (x_centred ** 2).sum())
        ### END SOLUTION

    @staticmethod
    def peak_memory(function) -> int:
        """Peak bytes allocated while `function()` runs, above the bytes allocated when it starts."""
        ### BEGIN SOLUTION
        baseline, _ = tracemalloc.get_traced_memory()        # (current, peak) in bytes
        tracemalloc.reset_peak()                             # an earlier, larger peak must not count
        function()
        _, peak = tracemalloc.get_traced_memory()
        return max(0, peak - baseline)
        ### END SOLUTION

    def compare_generation(self, attention_layer, prompt_length: int, new_tokens: int, *,
                           batch_size: int = 1) -> dict:
        """Generate `new_tokens` positions one at a time, with a KV cache and by recomputing everything.

        Each step feeds the next position of a fixed random sequence, so both ways must give the
        same outputs (put a layer with dropout in `eval()` mode first, or the two ways drop
        different weights). BLAS is held at one thread while it runs.
        Returns:
            prefill_ms, cached_ms and recompute_ms (per new token), cached_out and recompute_out.
        """
        ### BEGIN SOLUTION
        total = prompt_length + new_tokens
        x = np.random.default_rng(self.seed).standard_normal((batch_size, total, attention_layer.embed_dim),
                                                             dtype=np.float32)           # (B, total, E)
        cache = KVCache(batch_size, total, attention_layer.num_kv_heads, attention_layer.head_dim)
        start = time.perf_counter()
        attention_layer(x[:, :prompt_length], kv_cache=cache)
        prefill_ms = (time.perf_counter() - start) * 1e3
        cached_ms, cached_out = [], []
        for t in range(prompt_length, total):
            start = time.perf_counter()
            cached_out.append(attention_layer(x[:, t:t + 1], kv_cache=cache).data)
            cached_ms.append((time.perf_counter() - start) * 1e3)
        recompute_ms, recompute_out = [], []
        for t in range(prompt_length, total):
            start = time.perf_counter()
            full = attention_layer(x[:, :t + 1], mask=create_causal_mask(t + 1)).data
            recompute_out.append(full[:, -1:])
            recompute_ms.append((time.perf_counter() - start) * 1e3)
        return {"prefill_ms": prefill_ms, "cached_ms": cached_ms, "recompute_ms": recompute_ms,
                "cached_out": cached_out, "recompute_out": recompute_out}
        ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-attention-profiler", "locked": true, "points": 5, "schema_version": 3, "solution": false}
def test_unit_attention_profiler():
    """The worked fit, warm-up and repeats, median and spread, a known allocation, and generation."""
    slope = AttentionProfiler.fit_exponent([100, 200, 400], [3.0, 12.0, 48.0])
    assert abs(slope - 2.0) < 1e-9, f"worked example: times 3, 12, 48 ms at T = 100, 200, 400 have slope 2, got {slope}"
    assert abs(AttentionProfiler.fit_exponent([10, 100], [5.0, 50.0]) - 1.0) < 1e-9, "cost 0.5 T has slope 1"

    calls, sleeps = [], iter([0.0, 0.0, 0.004, 0.001, 0.002, 0.003, 0.020])
    def workload():
        calls.append(1)
        pause = next(sleeps)
        if pause:
            time.sleep(pause)
    timing = AttentionProfiler(repeats=5, warmup=2).measure_time(workload)
    assert len(calls) == 7, f"warmup=2 and repeats=5 make 7 calls, got {len(calls)}"
    assert len(timing["runs_ms"]) == 5, f"5 repeats make 5 timed runs, got {len(timing['runs_ms'])}"
    assert 2.9 <= timing["median_ms"] < 10, f"runs of about 4, 1, 2, 3, 20 ms have median about 3, got {timing['median_ms']:.2f}"
    assert 0.9 <= timing["spread_ms"] < 8, f"their 25th-75th percentile spread is about 2 ms, got {timing['spread_ms']:.2f}"

    one_mib = AttentionProfiler.peak_memory(lambda: np.ones(2**18, dtype=np.float32))
    assert 2**20 <= one_mib < 2**20 + 2**16, f"a call that allocates 1 MiB peaks at 1 MiB, got {one_mib} bytes"
    tracemalloc.start()
    try:
        held = np.ones(2**19, dtype=np.float32)                      # 2 MiB allocated before the call
        np.ones(2**21, dtype=np.float32)                             # an 8 MiB peak that ended before it
        one_mib = AttentionProfiler.peak_memory(lambda: np.ones(2**18, dtype=np.float32))
    finally:
        tracemalloc.stop()
    assert 2**20 <= one_mib < 2**20 + 2**16, \
        f"after an 8 MiB peak and with 2 MiB held, a 1 MiB call still peaks 1 MiB above its start, got {one_mib} bytes"
    del held
    generation = AttentionProfiler().compare_generation(MultiHeadAttention(32, 4, seed=0), prompt_length=8, new_tokens=6)
    assert len(generation["cached_token_ms"]) == len(generation["recompute_token_ms"]) == 6, "one time per new token"
    assert generation["max_abs_difference"] < 1e-4, \
        f"cached and recomputed outputs must agree, differ by {generation['max_abs_difference']}"
    print("profiler: the worked fit, warm-up, repeats, median and spread all correct")


test_unit_attention_profiler()

# %% [markdown]
# ### Measured: time and memory against sequence length
#
# The sweep below runs one `ScaledDotProductAttention` forward (batch 1, 4 heads of 64) at
# T = 128 to 1024 with three kernels: your math path, the provided fast path, and your blocked
# attention. Every number is measured on your machine as the notebook runs, so yours will differ
# from a classmate's. Look at the spread column: when it is a large part of the median, that
# size was disturbed by something else running, and the table tells you so.
#
# **Predict first.** Write down three guesses before you run it: how many times longer the math
# path takes at T = 1024 than at T = 512, how many times more memory it needs there, and how
# the blocked path's memory grows from T = 512 to 1024.

# %%
profiler = AttentionProfiler(repeats=3, warmup=1)
scaling_lengths = [128, 256, 512, 1024]
kernels = {"math": ("math", ScaledDotProductAttention()),
           "fast": ("fast", ScaledDotProductAttention()),
           "blocked": ("math", ScaledDotProductAttention(block_size=128))}
scaling = {}
for name, (backend, layer) in kernels.items():
    with attention_backend(backend):
        scaling[name] = profiler.measure_attention_scaling(layer, scaling_lengths, num_heads=4, head_dim=64)
fits = {name: AttentionProfiler.analyze_quadratic_scaling(rows) for name, rows in scaling.items()}

print(f"BLAS threads held at {scaling['math'][0]['blas_threads']}; time per forward, median of 3 samples ± spread")
print(f"{'T':>5} | " + " | ".join(f"{name + ' ms':>17}" for name in kernels))
for i, seq_len in enumerate(scaling_lengths):
    print(f"{seq_len:>5} | " + " | ".join(
        f"{scaling[n][i]['time_ms']:>8.2f} ± {scaling[n][i]['time_spread_ms']:<6.2f}" for n in kernels))
print(f"\npeak memory of one forward, MiB\n{'T':>5} | " + " | ".join(f"{name:>8}" for name in kernels)
      + " | weights (estimate)")
for i, seq_len in enumerate(scaling_lengths):
    print(f"{seq_len:>5} | " + " | ".join(f"{scaling[n][i]['peak_memory_mb']:>8.1f}" for n in kernels)
          + f" | {scaling['math'][i]['weights_mb_estimate']:>8.1f}")
print()
for name, fit in fits.items():
    print(f"{name:>8}: time ~ T^{fit['time_exponent']:.2f}, peak memory ~ T^{fit['memory_exponent']:.2f}")
plot_scaling(scaling, fits)

# %% [markdown]
# Read your table against your predictions, and against what the algorithms predict:
#
# - **The math path** computes and stores every one of the T² scores, so both its time and its
#   memory should grow about four times per doubling of T: fitted exponents near 2. Memory is
#   counted by `tracemalloc`, not timed, so your memory exponent barely moves from run to run:
#   expect it between 1.9 and 2.1. Time is noisier. Two effects move its slope in opposite
#   directions: the fixed cost of each call pulls it below 2, and the smallest sizes fitting in
#   the CPU cache while the larger ones do not pushes it above 2. Compare the step from 128 to
#   256 with the step from 512 to 1024 in your table to see which one your machine shows. On a
#   busy laptop, other programs add their own share to some sizes and not others, so a fitted
#   time exponent anywhere from about 1.6 to 2.8 is a measurement, not a mistake; the spread
#   column tells you which sizes were disturbed. The math path's peak is several times the
#   weights' size: the formula holds the scores, the exponentials and the weights at once.
# - **The fast path** computes every score too, so its time grows as T² in the end. Compare
#   your two fitted time exponents: a fixed cost per call (handing tiles to threads) weighs most
#   at the smallest T and pulls the fast path's slope down, while the T² work pulls it back up to
#   2; which effect shows at these sizes depends on your machine's cores and on what else runs on
#   them, so your fast exponent may come out below the math path's, level with it or above it:
#   read which one yours did. Its memory is smaller: it never holds more than a tile of rows per thread, and each tile spans
#   all S keys, so its peak grows more slowly than T².
# - **Blocked attention** holds a few block-sized tiles and the output, so its peak memory
#   should grow at most linearly in T (a fitted exponent of 1 or less at these sizes), not as
#   T², while its time still grows as T².
#
# Removing the T² *time* needs a different model, such as sliding-window or linear attention,
# not a better kernel.
#
# **Try it.** Change `scaling_lengths` to `[64, 128, 256]` and rerun. Do the fitted time
# exponents move up or down on your machine, and which of the two effects above explains it?

# %% [markdown]
# ### Measured: generating with and without the cache
#
# **Predict first.** The prompt has 32 tokens and 96 more are generated. Without the cache, the
# last step recomputes all 128 positions; with it, one. Guess how many times longer all 96 steps
# take without the cache, then run the cell.

# %%
generation_layer = MultiHeadAttention(embed_dim=256, num_heads=8, seed=0).eval()
generation = profiler.compare_generation(generation_layer, prompt_length=32, new_tokens=96)
print(f"prefill of {generation['prompt_length']} tokens: {generation['prefill_ms']:.2f} ms")
print(f"per generated token, median: cached {generation['cached_ms_per_token']:.3f} ms, "
      f"recomputed {generation['recompute_ms_per_token']:.3f} ms: "
      f"{generation['recompute_ms_per_token'] / generation['cached_ms_per_token']:.1f}x")
spike_counts = {way: int(generation_spikes(generation[f"{way}_token_ms"]).sum()) for way in ("cached", "recompute")}
print(f"total time of all steps, recomputed / cached: {generation['speedup']:.1f}x; spikes counted in it: "
      f"{spike_counts['cached']} cached, {spike_counts['recompute']} recomputed "
      f"(outputs agree to {generation['max_abs_difference']:.1e})")
plot_generation(generation)

# %% [markdown]
# Without the cache, each new token recomputes the projections of every earlier token and a
# T × T attention, so the time per token should climb as the text grows. With the cache a token
# costs one projection and one row of attention over the cached keys, so its time should grow
# only slowly. Check both against your plot. A **spike** is a step more than 3 times slower than
# the median of the 9 steps around it (the plot marks each with an ×): the machine was doing
# something else. The medians per token, and the plot's headline ratio, leave spikes out; the
# ratio of total times counts them, so under load it can come out well below the medians' ratio.

# %% [markdown]
# ## Part 10: Serving many requests: a paged KV cache
#
# Your `KVCache` reserves `max_seq_length` positions for every batch row from the start, as a
# static cache does. A server cannot know how long an answer will be, so it must reserve the
# longest, and most of that memory never holds a token. Kwon et al. measured it in
# "Efficient Memory Management for Large Language Model Serving with PagedAttention" (SOSP 2023,
# the vLLM paper): systems that reserve a maximum-length region per request kept real token
# states in only about a fifth to two fifths of their KV-cache memory.
#
# Their fix borrows the operating system's virtual memory:
#
# - The cache is a **pool of fixed-size blocks**. A block holds the keys and values of
#   `block_size` tokens, for every kv head: the pool is one array per side,
#   (num_blocks, Hkv, block_size, hd).
# - Each sequence owns a **block table**, a list of block ids: its token *i* lives in block
#   `table[i // block_size]`, at slot `i % block_size`.
# - A **free list** holds the ids of the unused blocks. A sequence takes a block from it only
#   when its last block is full, and gives its blocks back when it finishes. A sequence then
#   wastes only the empty end of its last block, less than one block.
#
# Paging also makes sharing cheap. Asking for n samples of one prompt (parallel sampling, or
# beam search) starts n sequences with the same prefix. A **fork** gives the child a copy of
# the parent's block table, not of its blocks, and each block keeps a **reference count**: the
# number of block tables that hold it. Full blocks are never written again, so they can be
# shared for good. The last block, if partly filled, will be written by several sequences. The
# first of them to write gets a private copy of it (**copy-on-write**), and the shared block's
# count goes down by one. The last holder left writes in place. Freeing a sequence lowers the
# count of each of its blocks, and only a block whose count reaches 0 returns to the free list.
# With paging and sharing together, vLLM served 2-4 times as many requests per second as the
# systems before it, at the same latency.
#
# **Worked by hand.** A pool of 8 blocks of 4 tokens, one kv head of width 1, so that a token's
# key is one number (write A's tokens a0, a1, …). The free list hands out its first id, and freed
# blocks go to its end.
#
# ```
# sequence A: appends of 5, 1 and 1 tokens        A  length 7   table [0, 1]
#     block 0  [a0 a1 a2 a3]  refs 1               free [2, 3, 4, 5, 6, 7]
#     block 1  [a4 a5 a6 __]  refs 1
#
# B = fork(A): B's table is a copy of A's          A  length 7   table [0, 1]
#     block 0  refs 2,  block 1  refs 2            B  length 7   table [0, 1]
#
# B appends b7: block 1 is shared and partly filled, so B copies it to block 2, then writes
#     block 0  [a0 a1 a2 a3]  refs 2               A  length 7   table [0, 1]
#     block 1  [a4 a5 a6 __]  refs 1               B  length 8   table [0, 2]
#     block 2  [a4 a5 a6 b7]  refs 1               free [3, 4, 5, 6, 7]
#
# A appends a7: block 1 is A's alone now (refs 1), so A writes in place: A's table stays [0, 1]
# free(A): block 0 refs 2 -> 1 (B still holds it), block 1 refs 1 -> 0 -> free [3, 4, 5, 6, 7, 1]
#
# C appends 4 tokens, then 20: it takes block 3, then 4, 5, 6, 7 and 1, in the free list's order
#     C  length 24  table [3, 4, 5, 6, 7, 1]       C's tokens 20-23 live in block 1, after block 7
# ```
#
# The 7 tokens the fork shares take 2 blocks, not 4. Without paging, A and B would each hold a
# region of `max_seq_length`. And a table is in block-id order only until blocks are freed and
# handed out again, or copied on write: C's table reads block 1 last.
#
# **Your task**: five methods of `PagedKVCache`: `append_tokens`, `get_sequence`, `fork` and
# `free` here, and `append` in the next section. The provided base class, `PagedKVCacheBase`,
# makes everything the cache holds: `block_size`, the pool `key_blocks` and `value_blocks`
# (num_blocks, Hkv, block_size, hd), the list `free_blocks` (all ids, in order, at the start),
# the array `ref_counts` (num_blocks,), the dicts `block_tables` and `lengths` keyed by sequence
# id, the set `finished` of freed ids and the list `batch` that `set_batch` names. It checks every
# call before your code runs (an unknown or already freed sequence, too few free blocks), refuses
# anything that does not fit before a single number is written, creates sequences
# (`add_sequence()` returns a new id with an empty table), records each freed id in `finished`,
# and reports memory.
#
# - `append_tokens` writes the (Hkv, T, hd) new keys and values after the sequence's last token.
#   First, if T > 0 and the last block is partly filled and shared (its count is above 1), copy it
#   to a new block and put the copy in the table (appending nothing writes nothing, so copies nothing). Then take blocks from the front of the free list
#   (`self.free_blocks.pop(0)`) until the table has the ⌈(length + T) / block_size⌉ blocks the
#   new length needs. Last, write each new token at its position's block and slot: T tokens
#   may span several blocks. (Indexing `self.key_blocks[blocks, :, slots]` with two arrays of
#   T numbers picks T (Hkv, hd) slices at once.) T may be 0, and a sequence may be empty: give
#   index arrays an integer dtype, since `np.array([])` is float and cannot index.
# - `get_sequence` returns the sequence's keys and values in order, (Hkv, length, hd), read
#   through its block table, in the table's order (C's table above ends with block 1).
#   Indexing with the table, `self.key_blocks[table]`, gives (blocks, Hkv, block_size, hd);
#   move the block axis next to the slots and join them.
# - `fork` gives a new sequence the parent's table and length, and counts it as one more holder
#   of each block.
# - `free` gives up a sequence's blocks, returns to the end of the free list each block that no
#   other table holds, and removes the sequence's table and length.

# %% [markdown]
# ### Decoding through the paged cache
#
# A paged cache plugs into `MultiHeadAttention` through the same `kv_cache=` argument as your
# `KVCache`. The layer calls `kv_cache.append(k, v)` with (B, Hkv, T, hd) keys and values and
# expects back every cached key and value and the mask of which ones each query may see. The one
# new question is which sequence a batch row belongs to: a server's batch changes at every
# step, as requests finish and others start. So the cache is told, before each call:
# `cache.set_batch([7, 2])` makes row 0 sequence 7 and row 1 sequence 2, and returns the cache,
# so that a step reads `layer(x, kv_cache=cache.set_batch(sequence_ids))`.
#
# The rest is Part 6 again, per sequence: append each row's new tokens to its sequence, read each
# sequence's keys and values back into a (B, Hkv, L, hd) array padded with zeros to the longest
# sequence, and build the (B, 1, T, L) mask. Query i of row b sits at position
# `length_b − T + i`, and sees the keys at or before it. **Worked by hand**, the example of
# Part 6: sequences holding 3 and 1 tokens, 2 appended to each, give lengths 5 and 3, L = 5, and
# the same mask as there.
#
# **Your task** for decoding: the `append` method of the class below. Row b of the batch is
# sequence `self.batch[b]`, the list of ids that `set_batch` was given. L is the longest
# sequence after appending. Decoding through it must give exactly the outputs of decoding
# through your `KVCache`: the test after the cache's own compares the two, with 4, 2 and 1 kv
# heads, and with forked samples.

# %% nbgrader={"grade": false, "grade_id": "paged-kv-cache", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
class PagedKVCache(PagedKVCacheBase):
    """Keys and values in a pool of fixed-size blocks, one block table per sequence (vLLM's PagedAttention).

    PagedKVCache(num_blocks, block_size, num_heads, head_dim): the pool (key_blocks, value_blocks),
    free_blocks, ref_counts, block_tables and lengths are made by the provided `PagedKVCacheBase`,
    which also creates sequences (`add_sequence`), names the batch rows (`set_batch`) and reports memory.
    """

    def append_tokens(self, sequence_id: int, new_keys, new_values):
        """Append (Hkv, new_len, hd) keys and values to a sequence, taking blocks as it needs them.

        Returns:
            (keys, values): the sequence's whole cache, (Hkv, length, hd) arrays.
        """
        ### BEGIN SOLUTION
        s, keys, values = sequence_id, new_keys, new_values
        table, length, new_len = self.block_tables[s], self.lengths[s], keys.shape[1]
        if new_len and length % self.block_size and self.ref_counts[table[-1]] > 1:   # a shared, partly filled block
            copy = self.free_blocks.pop(0)                                 # copy on write
            self.key_blocks[copy] = self.key_blocks[table[-1]]
            self.value_blocks[copy] = self.value_blocks[table[-1]]
            self.ref_counts[table[-1]] -= 1
            self.ref_counts[copy] = 1
            table[-1] = copy
        while len(table) < -(-(length + new_len) // self.block_size):    # ceil: the blocks the new length needs
            table.append(self.free_blocks.pop(0))
            self.ref_counts[table[-1]] = 1
        positions = length + np.arange(new_len)                            # (T,) the new tokens' positions
        blocks = np.array(table, dtype=np.int64)[positions // self.block_size]   # (T,) their blocks
        slots = positions % self.block_size                                # (T,) their slots in those blocks
        self.key_blocks[blocks, :, slots] = keys.transpose(1, 0, 2)         # (T, Hkv, hd)
        self.value_blocks[blocks, :, slots] = values.transpose(1, 0, 2)
        self.lengths[s] = length + new_len
        return self.get_sequence(s)
        ### END SOLUTION

    def get_sequence(self, sequence_id: int):
        """The sequence's (keys, values), (Hkv, length, hd) arrays each, read through its block table."""
        ### BEGIN SOLUTION
        table, length = self.block_tables[sequence_id], self.lengths[sequence_id]
        slots = len(table) * self.block_size
        keys = self.key_blocks[table].transpose(1, 0, 2, 3)          # (Hkv, blocks, block_size, hd)
        keys = keys.reshape(self.num_heads, slots, self.head_dim)[:, :length]       # (Hkv, length, hd)
        values = self.value_blocks[table].transpose(1, 0, 2, 3)
        return keys, values.reshape(self.num_heads, slots, self.head_dim)[:, :length]   # (Hkv, length, hd) each
        ### END SOLUTION

    def fork(self, sequence_id: int) -> int:
        """A new sequence sharing every block of `sequence_id` (copy-on-write); returns its id."""
        ### BEGIN SOLUTION
        child = self.add_sequence()                                  # a new, empty sequence id
        self.block_tables[child] = list(self.block_tables[sequence_id])   # a copy of the table, not of the blocks
        self.lengths[child] = self.lengths[sequence_id]
        for block in self.block_tables[sequence_id]:
            self.ref_counts[block] += 1
        return child                                                 # the new sequence's id
        ### END SOLUTION

    def free(self, sequence_id: int) -> None:
        """Finish a sequence: its blocks that no other sequence holds return to the free list."""
        ### BEGIN SOLUTION
        for block in self.block_tables.pop(sequence_id):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        del self.lengths[sequence_id]
        ### END SOLUTION

    def append(self, new_keys, new_values):
        """Append (B, Hkv, T, hd) keys and values to the sequences named by `set_batch`; return what each query may see.

        Returns:
            keys, values: (B, Hkv, L, hd) arrays, each sequence's cache padded with zeros to the longest L;
            visible: (B, 1, T, L) boolean array, True where query i of row b may attend to key j.
        """
        ### BEGIN SOLUTION
        B, Hkv, T, hd = new_keys.shape
        rows = [self.append_tokens(sequence_id, new_keys[b], new_values[b])        # (Hkv, length, hd) each
                for b, sequence_id in enumerate(self.batch)]
        lengths = np.array([row_keys.shape[1] for row_keys, _ in rows], dtype=np.int64)   # (B,) after appending
        longest = int(lengths.max()) if B else T
        keys = np.zeros((B, Hkv, longest, hd), dtype=np.float32)                # (B, Hkv, L, hd)
        values = np.zeros((B, Hkv, longest, hd), dtype=np.float32)
        for b, (row_keys, row_values) in enumerate(rows):
            keys[b, :, :row_keys.shape[1]], values[b, :, :row_values.shape[1]] = row_keys, row_values
        query_positions = lengths[:, None] - T + np.arange(T)[None, :]          # (B, T)
        key_positions = np.arange(longest)                                      # (L,)
        visible = key_positions[None, None, :] <= query_positions[:, :, None]   # (B, T, L)
        return keys, values, visible[:, None]                                   # ..., (B, 1, T, L)
        ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-paged-kv-cache", "locked": true, "points": 8, "schema_version": 3, "solution": false}
def _paged_state(cache):
    """Everything a PagedKVCache holds, copied, to compare before and after a call."""
    return (cache.key_blocks.copy(), cache.value_blocks.copy(), list(cache.free_blocks), cache.ref_counts.copy(),
            {s: list(table) for s, table in cache.block_tables.items()}, dict(cache.lengths), set(cache.finished))


def _assert_same_state(before, after, case):
    for name, kept, now in zip(("key_blocks", "value_blocks", "free_blocks", "ref_counts", "block_tables", "lengths",
                                "finished"), before, after):
        if isinstance(kept, np.ndarray):
            np.testing.assert_array_equal(now, kept, err_msg=f"{case} changed {name}")
        else:
            assert now == kept, f"{case} changed {name}: {kept} became {now}"


def test_unit_paged_kv_cache():
    """The worked example: appends of 5, 1 and 1, a fork, copy-on-write, a free, refusals that change nothing,
    and a table out of id order."""
    def tokens(*numbers):                                            # (1, T, 1): one number per token
        return np.array(numbers, dtype=np.float32).reshape(1, -1, 1)

    def keys_of(sequence):
        return cache.get_sequence(sequence)[0].data[0, :, 0].tolist()

    cache = PagedKVCache(num_blocks=8, block_size=4, num_heads=1, head_dim=1)
    a = cache.add_sequence()
    for chunk in ([0, 1, 2, 3, 4], [5], [6]):
        keys, values = cache.append_tokens(a, tokens(*chunk), -tokens(*chunk))
    assert keys.data[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 6], f"A's keys after appends of 5, 1, 1: {keys.data[0, :, 0]}"
    assert values.data[0, :, 0].tolist() == [0, -1, -2, -3, -4, -5, -6], f"A's values: {values.data[0, :, 0]}"
    assert (cache.block_tables[a], cache.lengths[a]) == ([0, 1], 7), \
        f"A: expected table [0, 1] and length 7, got {cache.block_tables[a]} and {cache.lengths[a]}"
    assert cache.free_blocks == [2, 3, 4, 5, 6, 7], f"free list: expected [2, 3, 4, 5, 6, 7], got {cache.free_blocks}"

    b = cache.fork(a)
    assert cache.block_tables[b] == [0, 1] and cache.lengths[b] == 7, f"B = fork(A): got table {cache.block_tables[b]}"
    assert cache.ref_counts[:2].tolist() == [2, 2], f"after the fork, blocks 0 and 1 have 2 holders: {cache.ref_counts}"
    assert cache.free_blocks == [2, 3, 4, 5, 6, 7], "a fork takes no block"

    cache.append_tokens(b, tokens(70), tokens(70))
    assert cache.block_tables[b] == [0, 2], f"B writes to shared block 1: it must copy it to block 2, got {cache.block_tables[b]}"
    assert cache.ref_counts[:3].tolist() == [2, 1, 1], f"reference counts of blocks 0-2: {cache.ref_counts[:3]}"
    assert keys_of(b) == [0, 1, 2, 3, 4, 5, 6, 70] and keys_of(a) == [0, 1, 2, 3, 4, 5, 6], "B's write must not reach A"
    cache.append_tokens(a, tokens(7), tokens(7))
    assert cache.block_tables[a] == [0, 1], f"A now holds block 1 alone and writes in place: {cache.block_tables[a]}"
    assert keys_of(a) == [0, 1, 2, 3, 4, 5, 6, 7] and keys_of(b) == [0, 1, 2, 3, 4, 5, 6, 70]

    cache.free(a)
    assert cache.ref_counts[:3].tolist() == [1, 0, 1], f"after free(A): counts of blocks 0-2 {cache.ref_counts[:3]}"
    assert cache.free_blocks == [3, 4, 5, 6, 7, 1], f"free(A) returns block 1 only: {cache.free_blocks}"
    assert a not in cache.block_tables and a not in cache.lengths, "free(A) removes A's table and length"
    assert keys_of(b) == [0, 1, 2, 3, 4, 5, 6, 70], "B keeps the block it shared with A"

    c = cache.add_sequence()
    cache.append_tokens(c, tokens(1, 2, 3, 4), tokens(1, 2, 3, 4))        # C takes block 3; 5 blocks stay free
    before = _paged_state(cache)
    for case, call in {"appending 21 tokens to B (6 new blocks, 5 free)": lambda: cache.append_tokens(b, np.zeros((1, 21, 1)), np.zeros((1, 21, 1))),
                       "appending 25 tokens to B (33 > 32 tokens)": lambda: cache.append_tokens(b, np.zeros((1, 25, 1)), np.zeros((1, 25, 1))),
                       "freeing A twice": lambda: cache.free(a)}.items():
        try:
            call()
            raise AssertionError(f"{case} must raise ValueError")
        except ValueError:
            pass
        _assert_same_state(before, _paged_state(cache), case)

    cache.append_tokens(c, tokens(*range(5, 25)), tokens(*range(5, 25)))  # 20 more: blocks 4, 5, 6, 7, then 1
    assert cache.block_tables[c] == [3, 4, 5, 6, 7, 1], f"C takes the free blocks in order: {cache.block_tables[c]}"
    assert keys_of(c) == list(range(1, 25)), \
        f"C's table [3, 4, 5, 6, 7, 1] is out of id order; read it in table order: got {keys_of(c)}"
    empty = PagedKVCache(num_blocks=2, block_size=4, num_heads=1, head_dim=1)
    nothing = empty.add_sequence()
    empty.append_tokens(nothing, np.zeros((1, 0, 1)), np.zeros((1, 0, 1)))     # T = 0 on an empty sequence
    assert empty.get_sequence(nothing)[0].data.shape == (1, 0, 1), "an empty sequence reads back as (Hkv, 0, hd)"
    print("paged KV cache: block tables, reference counts, copy-on-write and the free list match the worked example")


test_unit_paged_kv_cache()

# %% [markdown]
# The worked example's cache after B's copy-on-write, drawn: each sequence's block table on the
# left, and the pool on the right, with its filled slots, its reference counts and its free
# blocks. Block 0 is shared, so it is drawn hatched.

# %%
worked_cache = PagedKVCache(num_blocks=8, block_size=4, num_heads=1, head_dim=1)
sequence_a = worked_cache.add_sequence()
for chunk in (5, 1, 1):
    worked_cache.append_tokens(sequence_a, np.zeros((1, chunk, 1)), np.zeros((1, chunk, 1)))
sequence_b = worked_cache.fork(sequence_a)
worked_cache.append_tokens(sequence_b, np.ones((1, 1, 1)), np.ones((1, 1, 1)))
print(worked_cache)
draw_block_tables(worked_cache, title="After appends of 5, 1 and 1 tokens to sequence 0, a fork, and one token "
                                      "appended to the fork")

# %% nbgrader={"grade": true, "grade_id": "test-paged-decoding", "locked": true, "points": 5, "schema_version": 3, "solution": false}
def test_unit_paged_decoding():
    """The worked mask; then decoding through the paged cache equals decoding through KVCache, with forks."""
    cache = PagedKVCache(num_blocks=6, block_size=2, num_heads=1, head_dim=2)
    first, second = cache.add_sequence(), cache.add_sequence()
    cache.append_tokens(first, np.ones((1, 3, 2)), np.ones((1, 3, 2)))        # sequences hold 3 and 1 tokens
    cache.append_tokens(second, np.ones((1, 1, 2)), np.ones((1, 1, 2)))
    keys, _, visible = cache.set_batch([first, second]).append(np.zeros((2, 1, 2, 2)), np.zeros((2, 1, 2, 2)))
    assert keys.shape == (2, 1, 5, 2), f"keys: expected (2, 1, 5, 2), padded to the longest sequence, got {keys.shape}"
    np.testing.assert_array_equal(visible[:, 0], [[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                                                  [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]],
                                  err_msg="the worked example: sequences holding 3 and 1 tokens, 2 appended")

    rng = np.random.default_rng(10)
    with attention_backend("math"):
        for num_kv_heads in (4, 2, 1):
            layer = MultiHeadAttention(embed_dim=16, num_heads=4, num_kv_heads=num_kv_heads, seed=1)
            x = rng.normal(size=(2, 9, 16)).astype(np.float32)
            contiguous = KVCache(max_batch_size=2, max_seq_length=9, num_heads=num_kv_heads, head_dim=4)
            paged = PagedKVCache(num_blocks=10, block_size=2, num_heads=num_kv_heads, head_dim=4)
            paged.set_batch([paged.add_sequence(), paged.add_sequence()])
            for chunk in (slice(0, 5), slice(5, 6), slice(6, 7), slice(7, 9)):     # prefill 5, decode 1, 1, then 2
                np.testing.assert_allclose(layer(x[:, chunk], kv_cache=paged).data,
                                           layer(x[:, chunk], kv_cache=contiguous).data, rtol=1e-5, atol=1e-6,
                                           err_msg=f"paged against KVCache, {num_kv_heads} kv heads, tokens {chunk}")

            prompt, samples = x[:1, :5], rng.normal(size=(3, 4, 16)).astype(np.float32)
            paged = PagedKVCache(num_blocks=12, block_size=2, num_heads=num_kv_heads, head_dim=4)
            parent = paged.add_sequence()
            layer(prompt, kv_cache=paged.set_batch([parent]))                 # the prompt, cached once
            batch = [parent, paged.fork(parent), paged.fork(parent)]         # three samples of it
            contiguous = KVCache(max_batch_size=3, max_seq_length=9, num_heads=num_kv_heads, head_dim=4)
            layer(np.repeat(prompt, 3, axis=0), kv_cache=contiguous)          # the prompt, cached three times
            for t in range(4):
                np.testing.assert_allclose(layer(samples[:, t:t + 1], kv_cache=paged.set_batch(batch)).data,
                                           layer(samples[:, t:t + 1], kv_cache=contiguous).data, rtol=1e-5, atol=1e-6,
                                           err_msg=f"three forked samples, {num_kv_heads} kv heads, step {t}")
            assert paged.get_memory_usage()["blocks_used"] == 11, \
                f"2 shared prompt blocks + 3 samples x 3 blocks of their own = 11, got {paged.get_memory_usage()['blocks_used']}"
    print("paged decoding: the worked mask, and the same outputs as KVCache for 4, 2 and 1 kv heads, with and without forks")


test_unit_paged_decoding()

# %% [markdown]
# **Try it.** Rerun the forked samples with `block_size=1` and with `block_size=8` and print
# `paged.get_memory_usage()`. How many blocks does the shared prompt take, how many copies does
# copy-on-write make, and how much of the last blocks is empty? Then free the parent while its
# samples go on decoding: which blocks come back, and why does no sample notice?

# %% [markdown]
# ### Measured: what paging buys a server
#
# A server's cache has a fixed budget of token slots. Requests arrive over time, each with a
# prompt and a number of tokens to generate, and the server runs them step by step. Simulate
# that, and measure what each way of managing the cache does with the same budget. Only the
# bookkeeping matters here (which request holds how many slots at each step), not the attention
# itself, so the simulation runs thousands of steps in a fraction of a second.
#
# The rules are the same for both ways of managing the cache:
#
# 1. Time runs in steps. Running requests are ordered by admission: the one admitted longest
#    ago is the oldest, the one admitted last (a readmitted request included) the newest. At each
#    step, every running request generates one token, oldest first, so its length grows by 1:
#    - Before a request grows, add up the slots it would then hold and the slots every other
#      running request holds now (the older ones have already grown this step, the newer ones
#      not yet).
#    - If that is over the budget, the **newest** running request is **preempted**: it gives
#      back all its slots and returns to the front of the queue, keeping the tokens it generated
#      before this step (so requests preempted in one step wait oldest first, ahead of every
#      other). Repeat until there is room.
#    - The request that needs room may itself be the newest: then it is the one preempted, and
#      it generates nothing this step.
#
#    (vLLM preempts the same way, and recomputes a preempted request's cache when it is
#    readmitted.)
# 2. Then waiting requests are admitted in order of arrival, while the first of them has arrived
#    and its slots fit. Its prompt, and any tokens it generated before a preemption, are
#    prefilled, and the prefill generates its next token: it holds `prompt + generated + 1`
#    tokens. A request never overtakes an earlier one. (Every request fits on its own: the
#    provided checks refuse a request longer than `max_seq_length` and a budget smaller than one
#    request of `max_seq_length`, before your code runs.)
# 3. The step's memory is recorded: the real tokens of the running requests, the slots they hold,
#    and how many of them run. A step at which nothing runs, while the server waits for the next
#    arrival, is recorded too, with zeros: a request is never admitted before its arrival step,
#    however much room there is.
# 4. A request that has generated all its output tokens finishes, and its slots are free at the
#    end of the step.
#
# The two schemes differ in one thing only: the slots a request of `length` tokens holds.
# **Reserved regions**: `max_seq_length`, however short the request. **Paged**: whole blocks,
# ⌈length / block_size⌉ × block_size.
#
# **Worked by hand.** A budget of 12 slots, `max_seq_length` 8, blocks of 2, and two requests that
# both arrive at step 0: r0 with a prompt of 3 and 2 tokens to generate, r1 with a prompt of 2
# and 2 to generate.
#
# | step | reserved: running (tokens / slots) | paged: running (tokens / slots) |
# |---|---|---|
# | 0 | r0 4 / 8 (r1 waits: 8 + 8 > 12) | r0 4 / 4, r1 3 / 4 |
# | 1 | r0 5 / 8, finishes | r0 5 / 6, r1 4 / 4, both finish |
# | 2 | r1 3 / 8 | |
# | 3 | r1 4 / 8, finishes | |
#
# Reserved: tokens [4, 5, 3, 4], slots [8, 8, 8, 8], one request at a time, finish steps [1, 3],
# and 16 of 32 slot-steps hold real tokens: 50%. Paged: tokens [7, 9], slots [8, 10], two at a
# time, finish steps [1, 1], and 16 of 18: 89%.
#
# **Your task**: `simulate_serving`, the four rules. A helper inside it for the slots a request
# holds keeps one loop for both schemes. Return the dict its docstring names: `tokens`,
# `allocated` and `running` as integer NumPy arrays with one number per step (the cells below do
# arithmetic on them), `finish_step` (an integer NumPy array: the step at which each request
# generated its last token, one per request) and `preemptions`, an int.

# %% nbgrader={"grade": false, "grade_id": "serving-simulation", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def simulate_serving(requests, budget_tokens: int, max_seq_length: int, block_size: int | None = None) -> dict:
    """Serve requests one token per step under a budget of cache slots, and record each step's memory.

    Args:
        requests: (N, 3) integers (arrival step, prompt length, output length), in order of arrival.
        budget_tokens: the cache's size, in token slots.
        max_seq_length: the longest a request can grow, prompt plus output.
        block_size: None reserves a region of max_seq_length slots per request; an integer pages the
            cache in blocks of that many slots.
    Returns:
        dict: tokens, allocated, running (one number per step: real tokens, slots held, requests running),
        finish_step (one per request) and preemptions (how many times a request was preempted).
    """
    ### BEGIN SOLUTION
    arrival, prompt, output = requests.T                             # (N,) each
    tokens, allocated, running_count = [], [], []
    finish_step = np.full(len(requests), -1, dtype=np.int64)
    preemptions = 0
    def slots(length):                                               # the cache slots a request of `length` holds
        return max_seq_length if block_size is None else -(-length // block_size) * block_size

    waiting, running = list(range(len(requests))), []                # request indices, in order
    length, generated = {}, np.zeros(len(requests), dtype=np.int64)
    held, step = 0, 0
    while waiting or running:
        i = 0
        while i < len(running):                                      # 1. every running request generates a token
            r = running[i]
            growth = slots(length[r] + 1) - slots(length[r])
            while held + growth > budget_tokens:                     # no room: preempt the newest
                newest = running.pop()
                held -= slots(length.pop(newest))
                waiting.insert(0, newest)
                preemptions += 1
                if newest == r:
                    break
            if r in length:
                length[r] += 1
                generated[r] += 1
                held += growth
                i += 1
        while waiting and arrival[waiting[0]] <= step:               # 2. admit in order of arrival
            r = waiting[0]
            if held + slots(prompt[r] + generated[r] + 1) > budget_tokens:
                break
            running.append(waiting.pop(0))
            length[r] = prompt[r] + generated[r] + 1                 # prefill, and its next token
            generated[r] += 1
            held += slots(length[r])
        tokens.append(sum(length.values()))                          # 3. this step's memory
        allocated.append(held)
        running_count.append(len(running))
        for r in [r for r in running if generated[r] == output[r]]:  # 4. finished requests free their slots
            running.remove(r)
            held -= slots(length.pop(r))
            finish_step[r] = step
        step += 1
    return {"tokens": np.array(tokens, dtype=np.int64), "allocated": np.array(allocated, dtype=np.int64),
            "running": np.array(running_count, dtype=np.int64), "finish_step": finish_step,
            "preemptions": preemptions}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-serving-simulation", "locked": true, "points": 5, "schema_version": 3, "solution": false}
def test_unit_serving_simulation():
    """The worked example both ways, a paged run that must preempt, and a request that arrives to an idle server."""
    def check(case, result, expected):
        for key, value in expected.items():
            if isinstance(value, list):
                assert isinstance(result[key], np.ndarray) and result[key].dtype.kind == "i", \
                    f"{case}: {key} must be an integer NumPy array, got {type(result[key]).__name__}"
            actual = result[key].tolist() if isinstance(result[key], np.ndarray) else result[key]
            assert actual == value, f"{case}: {key} expected {value}, got {actual}"

    worked = np.array([[0, 3, 2], [0, 2, 2]])
    check("worked example, reserved regions", simulate_serving(worked, 12, 8),
          {"tokens": [4, 5, 3, 4], "allocated": [8, 8, 8, 8], "running": [1, 1, 1, 1], "finish_step": [1, 3],
           "preemptions": 0})
    check("worked example, paged in blocks of 2", simulate_serving(worked, 12, 8, block_size=2),
          {"tokens": [7, 9], "allocated": [8, 10], "running": [2, 2], "finish_step": [1, 1], "preemptions": 0})
    # 4 blocks of 2. Step 1: r0 grows to 5 tokens and needs a third block, so r1 (the newest) is preempted;
    # step 3: r2 needs a block that r1 holds, and r2 is the newest, so it preempts itself.
    check("budget 8 in blocks of 2, requests (0, 3, 2), (0, 2, 3), (1, 1, 2)",
          simulate_serving(np.array([[0, 3, 2], [0, 2, 3], [1, 1, 2]]), 8, 8, block_size=2),
          {"tokens": [7, 5, 6, 5, 3], "allocated": [8, 6, 6, 6, 4], "running": [2, 1, 2, 1, 1],
           "finish_step": [1, 3, 4], "preemptions": 2})
    # r1 arrives at step 4, after r0 has finished: steps 2 and 3 run nothing, though there is room.
    check("requests (0, 3, 2) and (4, 2, 2), paged in blocks of 2",
          simulate_serving(np.array([[0, 3, 2], [4, 2, 2]]), 12, 8, block_size=2),
          {"tokens": [4, 5, 0, 0, 3, 4], "allocated": [4, 6, 0, 0, 4, 4], "running": [1, 1, 0, 0, 1, 1],
           "finish_step": [1, 5], "preemptions": 0})
    print("serving simulation: the worked example with reserved regions and with pages, preemption, and a late "
          "arrival, as worked by hand")


test_unit_serving_simulation()

# %% [markdown]
# The workload: 400 requests. The gaps between arrivals are geometric with a mean of 2 steps;
# prompts are uniform from 8 to 256 tokens; outputs are geometric with a mean of 128 tokens,
# capped so that no request passes `max_seq_length` = 1,024. The budget holds 16 requests of
# the maximum length, 16,384 slots, and the paged cache cuts the same budget into blocks of 16
# tokens. Before you run it, write down a guess: what share of the reserved regions will hold
# real tokens, and how many requests will the paged cache run at once?

# %%
def serving_workload(num_requests, seed, max_seq_length=1024, mean_gap=2, prompt_lengths=(8, 256), mean_output=128):
    """(num_requests, 3) requests (arrival step, prompt length, output length) from the stated distributions."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.geometric(1 / mean_gap, size=num_requests)) - 1                # mean gap 2 steps
    prompts = rng.integers(prompt_lengths[0], prompt_lengths[1] + 1, size=num_requests)     # uniform 8..256
    outputs = np.minimum(rng.geometric(1 / mean_output, size=num_requests), max_seq_length - prompts)  # mean 128
    return np.stack([arrivals, prompts, outputs], axis=1)


serving_budget, serving_max_length, serving_block = 16 * 1024, 1024, 16
serving_requests = serving_workload(400, seed=0, max_seq_length=serving_max_length)
schemes = {"reserved regions of 1,024": None, "paged, blocks of 16": serving_block}
start = time.perf_counter()
serving = {name: simulate_serving(serving_requests, serving_budget, serving_max_length, block)
           for name, block in schemes.items()}
print(f"{len(serving_requests)} requests, a budget of {serving_budget:,} slots; both simulations took "
      f"{time.perf_counter() - start:.2f} s")
print(f"{'scheme':>26} | {'real tokens':>11} | {'reserved, unused':>16} | {'last blocks':>11} | "
      f"{'of the budget':>13} | {'at once':>7} | {'steps':>5} | {'mean wait':>9} | preemptions")
for name, history in serving.items():
    held, real = history["allocated"].sum(), history["tokens"].sum()   # slot-steps held, and holding real tokens
    waste = (held - real) / held
    unused, last_block = (waste, 0.0) if schemes[name] is None else (0.0, waste)
    waits = history["finish_step"] - serving_requests[:, 0] + 1 - serving_requests[:, 2]   # steps not generating
    print(f"{name:>26} | {real / held:>11.1%} | {unused:>16.1%} | {last_block:>11.1%} | "
          f"{real / (serving_budget * len(history['tokens'])):>13.1%} | {history['running'].max():>7} | "
          f"{len(history['tokens']):>5} | {waits.mean():>9.1f} | {history['preemptions']}")
plot_serving_memory(serving, serving_budget)

# %% [markdown]
# Read your table. The first three columns split the memory that running requests hold, added
# over the steps: real tokens, slots a region reserved that were never written, and the empty
# end of the last blocks. "Of the budget" counts real tokens against the whole budget,
# including memory that no request holds, as at the start and the end of the run.
#
# - **Reserved regions** hold a real token in about a quarter of their slots: every seed from 0
#   to 999 of this workload gave between 20% and 30%, inside the range the vLLM paper measured.
#   The rest was reserved for tokens that never came. The budget fits 16 regions, so no more
#   than 16 requests ever run, and a queue builds up: on average a request waits hundreds of
#   steps before its last token.
# - **Paged**, more than 95% of the held slots hold real tokens, in every one of those seeds: a
#   request wastes less than one block of 16, against hundreds of reserved slots. The same
#   budget runs between 3.5 and 6 times as many requests at once in those seeds, the queue
#   drains, and all requests are served in a third to 55% of the steps the reserved regions need
#   (those seeds again). When the pool runs dry, a few requests are preempted and their caches
#   recomputed later: paging trades that recomputation for memory.
#
# The plot shows why: the reserved regions hold the whole budget from the first steps on, but
# fill only the bottom of it with tokens. The paged cache's held memory sits just above its
# tokens.
#
# ### Shared prefixes: n samples of one prompt
#
# Parallel sampling asks for several answers to one prompt. Run it through your paged cache with
# and without sharing: 4 samples of a 200-token prompt, 32 new tokens each, blocks of 16. Without
# sharing, each sample holds ⌈232 / 16⌉ = 15 blocks, 60 in all. With forks, the 12 full blocks
# of the prompt are held once; the 13th, partly filled, is copied by 3 of the 4 samples on
# their first write, and each sample adds 2 blocks of its own: 12 + 4 × 3 = 24. Both ways must
# give the same outputs.

# %%
sharing_layer = MultiHeadAttention(embed_dim=32, num_heads=4, num_kv_heads=2, seed=0).eval()
rng = np.random.default_rng(11)
shared_prompt = rng.standard_normal((1, 200, 32), dtype=np.float32)
sample_tokens = rng.standard_normal((4, 32, 32), dtype=np.float32)        # 4 samples, 32 new tokens each
shared = PagedKVCache(num_blocks=64, block_size=16, num_heads=2, head_dim=8)
parent = shared.add_sequence()
sharing_layer(shared_prompt, kv_cache=shared.set_batch([parent]))         # the prompt, prefilled once
samples = [parent] + [shared.fork(parent) for _ in range(3)]
separate = PagedKVCache(num_blocks=64, block_size=16, num_heads=2, head_dim=8)
apart = separate.set_batch([separate.add_sequence() for _ in range(4)]).batch
sharing_layer(np.repeat(shared_prompt, 4, axis=0), kv_cache=separate)     # the prompt, prefilled 4 times
largest_difference = 0.0
for t in range(32):
    with_forks = sharing_layer(sample_tokens[:, t:t + 1], kv_cache=shared.set_batch(samples)).data
    without = sharing_layer(sample_tokens[:, t:t + 1], kv_cache=separate.set_batch(apart)).data
    largest_difference = max(largest_difference, float(np.abs(with_forks - without).max()))
used_shared, used_apart = (cache.get_memory_usage()["blocks_used"] for cache in (shared, separate))
print(f"4 samples of a 200-token prompt, 32 new tokens each: {used_apart} blocks without sharing, {used_shared} "
      f"with forks; sharing saves {1 - used_shared / used_apart:.0%} of the cache "
      f"(outputs agree to {largest_difference:.1e})")
shared.free(parent)
print(f"after the first sample finishes: {shared.get_memory_usage()['blocks_used']} blocks in use, "
      f"{len(shared.free_blocks)} free")

# %% [markdown]
# The more samples share a prompt, and the longer the prompt is against the answers, the more
# sharing saves: n samples of a P-token prompt that generate k tokens each hold
# ⌊P / b⌋ + n · (⌈(P + k) / b⌉ − ⌊P / b⌋) blocks of b tokens instead of n · ⌈(P + k) / b⌉.
# Freeing one sample returns only the blocks it held alone: the prompt stays, for the others.
#
# ### The memory arithmetic of real models
#
# What does a cache cost on real hardware? Every layer keeps a key and a value per kv head per
# token, so one token costs 2 × layers × Hkv × hd × (bytes per number). The accelerator's
# memory holds the weights first; what is left holds the cache, shared by every sequence in the
# batch. So the number of tokens that fit, over all sequences, is
# ⌊(memory − weights) / bytes per token⌋: one sequence may be as long as that, B sequences a
# B-th of it, and at a context of L tokens ⌊tokens / L⌋ sequences fit.
#
# **Worked by hand.** A toy model of 100,000 parameters with 2 layers and 4 kv heads of width 8,
# in fp16 (2 bytes a number), on 1 MiB = 1,048,576 bytes. A token costs 2 × 2 × 4 × 8 × 2 = 256
# bytes; the weights take 200,000 bytes; 848,576 bytes are left, ⌊848,576 / 256⌋ = 3,314 tokens.
# Four sequences may each reach 828 tokens, and at a context of 1,000 tokens 3 sequences fit.
#
# **Your task**: `kv_cache_capacity`, those four lines.

# %% nbgrader={"grade": false, "grade_id": "serving-memory", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def kv_cache_capacity(memory_bytes: int, num_parameters: int, num_layers: int, num_kv_heads: int, head_dim: int,
                      bytes_per_number: int = 2, batch_size: int = 1, context_length: int | None = None) -> dict:
    """How much KV cache fits on an accelerator after the model's weights.

    Args:
        memory_bytes: the accelerator's memory; num_parameters: the model's weights, stored like the cache.
        num_layers, num_kv_heads, head_dim: the model's shape; bytes_per_number: 2 for fp16, 4 for fp32.
        batch_size: the sequences sharing the cache; context_length: the length each sequence may reach.
    Returns:
        dict: bytes_per_token, weight_bytes, cache_bytes (left for the cache), max_tokens (over all sequences),
        longest_context (for batch_size sequences), largest_batch (of context_length; None without it).
    """
    ### BEGIN SOLUTION
    bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * bytes_per_number   # a key and a value, every layer
    weight_bytes = num_parameters * bytes_per_number
    cache_bytes = max(0, memory_bytes - weight_bytes)
    max_tokens = cache_bytes // bytes_per_token
    longest_context = max_tokens // batch_size
    largest_batch = None if context_length is None else max_tokens // context_length
    return {"bytes_per_token": bytes_per_token, "weight_bytes": weight_bytes, "cache_bytes": cache_bytes,
            "max_tokens": max_tokens, "longest_context": longest_context, "largest_batch": largest_batch}
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-serving-memory", "locked": true, "points": 3, "schema_version": 3, "solution": false}
def test_unit_serving_memory():
    """The worked toy model, a token of a 32-layer model with 32 kv heads of 128, and weights that leave no room."""
    toy = kv_cache_capacity(2**20, 100_000, num_layers=2, num_kv_heads=4, head_dim=8, batch_size=4, context_length=1000)
    assert toy == {"bytes_per_token": 256, "weight_bytes": 200_000, "cache_bytes": 848_576, "max_tokens": 3314,
                   "longest_context": 828, "largest_batch": 3}, f"the worked toy model: got {toy}"
    token = kv_cache_capacity(2**40, 0, num_layers=32, num_kv_heads=32, head_dim=128)["bytes_per_token"]
    assert token == 512 * 1024, f"32 layers x 32 kv heads x 128 x K and V x 2 bytes = 512 KiB per token, got {token}"
    full = kv_cache_capacity(10**9, 600_000_000, num_layers=2, num_kv_heads=1, head_dim=4, context_length=8)
    assert (full["cache_bytes"], full["max_tokens"], full["largest_batch"]) == (0, 0, 0), \
        f"1.2 GB of fp16 weights on 1 GB leave no cache: got {full}"
    print("KV-cache capacity: the worked toy model, 512 KiB per token, and a card the weights fill")


test_unit_serving_memory()

# %% [markdown]
# Now two real models, from their published configurations (the `config.json` on each model's
# card, and Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models", 2023):
#
# | | layers | hidden | query heads | kv heads | head width | MLP width | vocabulary | context |
# |---|---|---|---|---|---|---|---|---|
# | Llama-2-7B | 32 | 4,096 | 32 | 32 (full multi-head) | 128 | 11,008 | 32,000 | 4,096 |
# | Llama-3-8B | 32 | 4,096 | 32 | 8 (grouped) | 128 | 14,336 | 128,256 | 8,192 |
#
# The cell below counts their parameters from these fields, then asks your `kv_cache_capacity`
# what fits in fp16 on a 24 GiB card and on an 80 GiB card. The last two columns compare
# requests of a 4,096-token maximum: each holding a whole region, as your `KVCache` does, and
# paged, each holding what the requests of your simulation held, scaled to that maximum. That
# last column is an estimate: it assumes requests shaped like your workload.

# %%
def llama_parameters(vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads):
    """Weights of a Llama-style decoder: embeddings and output head, attention, SwiGLU MLP, RMSNorm scales."""
    head_dim = hidden_size // num_heads
    attention = 2 * hidden_size * hidden_size + 2 * hidden_size * num_kv_heads * head_dim   # w_q, w_o; w_k, w_v
    mlp = 3 * hidden_size * intermediate_size                                              # gate, up and down
    return 2 * vocab_size * hidden_size + num_layers * (attention + mlp + 2 * hidden_size) + hidden_size


GIB = 2**30
real_models = {"Llama-2-7B-like": dict(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008, num_layers=32,
                                       num_heads=32, num_kv_heads=32),
               "Llama-3-8B-like": dict(vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32,
                                       num_heads=32, num_kv_heads=8)}
cards = {"24 GiB": 24 * GIB, "80 GiB": 80 * GIB}
context = 4096
paged_run = serving["paged, blocks of 16"]
held_share = paged_run["allocated"].sum() / (paged_run["running"].sum() * serving_max_length)  # measured, per request
paged_slots = math.ceil(held_share * context)
print(f"paged, a request of your workload held {held_share:.1%} of the maximum length on average: "
      f"{paged_slots:,} slots at a {context:,}-token maximum (estimate)")
print(f"{'model':>16} | {'parameters':>13} | {'card':>6} | {'KiB/token':>9} | {'cache GiB':>9} | {'tokens':>9} | "
      f"{'batch, reserved':>15} | {'batch, paged':>12}")
for model, config in real_models.items():
    parameters = llama_parameters(**config)
    for card, memory in cards.items():
        fit = kv_cache_capacity(memory, parameters, config["num_layers"], config["num_kv_heads"],
                                config["hidden_size"] // config["num_heads"], context_length=context)
        print(f"{model:>16} | {parameters:>13,} | {card:>6} | {fit['bytes_per_token'] / 1024:>9.0f} | "
              f"{fit['cache_bytes'] / GIB:>9.2f} | {fit['max_tokens']:>9,} | {fit['largest_batch']:>15} | "
              f"{fit['max_tokens'] // paged_slots:>12}")

# %% [markdown]
# The counts come out at 6.74 and 8.03 billion parameters, the "7B" and "8B" of the names. Read
# the table along two lines:
#
# - **Grouped kv heads** change the bytes per token: 8 kv heads instead of 32 make each token
#   4 times cheaper (512 KiB against 128 KiB). Llama 3's larger vocabulary and MLP make its
#   weights 1.3 billion parameters heavier, which leaves less of the card for the cache, and it
#   still fits about 3 times as many tokens on a 24 GiB card and about 4 times as many on an
#   80 GiB one.
# - **Paging** changes what each request holds: its own tokens, rounded up to a block, instead of
#   the maximum length. With your workload's shape that multiplies the batch by 3 to 5 again (a
#   request of it held about a quarter of the maximum in every seed from 0 to 999), on top of what
#   the grouped heads bought. On a 24 GiB card, a Llama-2-7B-like model
#   with reserved regions serves only 5 requests of up to 4,096 tokens at once.
#
# The two gains multiply, because one divides the bytes per token and the other the tokens per
# request. Real servers also keep a cache per layer in one pool (vLLM's block tables are shared
# by all layers), and quantise it to 8 bits, which halves it once more.
#
# **Try it.** Change the workload's `mean_output` to 512 and rerun the simulation: which scheme's
# share of real tokens moves, and why does the other barely change? Then give the paged cache
# blocks of 1 and of 256: what does each cost, in last-block waste and in the number of blocks
# a table must hold? Last, find the largest `context_length` at which a Llama-2-7B-like model on
# a 24 GiB card still serves 16 requests at once with reserved regions.

# %% [markdown]
# ## Part 11: Training attention: the backward pass, and the memory FlashAttention saves
#
# Every part so far ran attention forward, as a model does when it answers. Training runs it
# backward too: the loss's gradient flows from each layer's output back to its queries, keys and
# values, and from them to the projections' weights. A backward pass needs what its forward
# computed, so a training step keeps, for every layer, the arrays its backward will read until
# the backward reaches it. For attention, the textbook choice keeps the weights P, (…, T, S): at
# T = S = 4096 with 8 heads that is 512 MiB for one layer of one sequence, kept through the
# whole forward of every later layer.
#
# FlashAttention-2 (Dao, 2023, its Algorithm 2) keeps instead the output O and one number per
# query row, the log of the row's softmax denominator (its **logsumexp**), and recomputes the
# weights block by block during the backward. The memory grows as T instead of T · S, for one
# more Q Kᵀ per block: five block products instead of four.
#
# ### The backward of attention, derived
#
# Write the forward as three steps, for one batch row and head: S = scale · Q Kᵀ, P = softmax(S)
# row by row (masked), O = P V. Given dO = ∂loss/∂O, the shape of O, each step passes the
# gradient back:
#
# - **O = P V.** A product's gradient multiplies by the other factor, transposed:
#   dV = Pᵀ dO, (S, d_v), and dP = dO Vᵀ, (T, S). Key j's value collects the output gradient of
#   every query that read it, weighted by how much it read.
# - **P = softmax(S).** For one row p = softmax(s), ∂p_j/∂s_k = p_j (δ_jk − p_k), so
#   ds_k = Σ_j dp_j p_j (δ_jk − p_k) = p_k (dp_k − Σ_j p_j dp_j). For all rows at once:
#   $$dS = P \odot \big(dP - \mathrm{rowsum}(dP \odot P)\big).$$
#   The subtracted term is one number per row. Without it, the gradient would ignore that the
#   weights must sum to 1: raising one score lowers every other weight of its row.
# - **S = scale · Q Kᵀ.** dQ = scale · dS K, (T, d_k), and dK = scale · dSᵀ Q, (S, d_k).
#
# A masked entry has P = 0, so its dS is 0: a key a query never saw gets no gradient from that
# query, and a fully masked row (all of its P zero) gives dQ = 0 for that query, exactly. With
# leading axes, NumPy's `@` broadcasts them as in the forward. When a key or value was shared
# along a broadcast axis (one (S, d) key for every head), each head's gradient flows back into
# the same numbers, so they add up: the provided boundary sums a gradient over the axes along
# which its input was broadcast, and hands each caller a gradient of its input's shape.
#
# **Worked by hand**, on Part 3's example: q = [1, 0], keys [1, 0] and [0, 1], values [10] and
# [20], scale 1/√2, weights P = [0.670, 0.330], output 13.30. Take dO = [1], the gradient of
# the loss "the output itself":
#
# | step | key 0 | key 1 |
# |---|---|---|
# | dV = Pᵀ dO | 0.670 | 0.330 |
# | dP = dO Vᵀ | 10 | 20 |
# | rowsum(dP ⊙ P) | 13.30 | (one number for the row) |
# | dS = P ⊙ (dP − 13.30) | 0.670 · (−3.30) = −2.212 | 0.330 · 6.70 = 2.212 |
#
# dQ = (1/√2) · (−2.212 · [1, 0] + 2.212 · [0, 1]) = **[−1.564, 1.564]**: to raise the
# output, turn the query toward key 1, whose value is 20. dK = (1/√2) · dSᵀ q gives key 0
# [−1.564, 0] and key 1 [1.564, 0]. A row of dS always sums to 0: adding one constant to every
# score of a row changes no weight. Forget the rowsum term and dS = P ⊙ dP = [6.698, 6.605],
# dQ = [4.736, 4.670]: a gradient that says "raise both scores", which changes nothing.
#
# **Your task**: `attention_backward`, from the saved weights, in the five lines of the
# derivation. `scale` arrives as in `math_attention`, already 1/√d_k unless the caller chose
# another. The mask is taken so that the call reads like the forward's; P is already 0 wherever
# it hid a key.

# %% nbgrader={"grade": false, "grade_id": "attention-backward", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def attention_backward(d_output, query, key, value, weights, mask=None, scale=None):
    """The gradients of attention's output with respect to its query, key and value, from the saved weights.

    Args:
        d_output: (..., T, d_v) float32 array, the loss's gradient with respect to the output.
        query, key, value, mask, scale: the forward's, as for `math_attention`.
        weights: (..., T, S) float32 array, the forward's weights P.
    Returns:
        (d_query (..., T, d_k), d_key (..., S, d_k), d_value (..., S, d_v)) float32 arrays; callers get
        each gradient in its input's shape.
    """
    ### BEGIN SOLUTION
    d_value = np.swapaxes(weights, -1, -2) @ d_output                    # (..., S, d_v): P^T dO
    d_weights = d_output @ np.swapaxes(value, -1, -2)                    # (..., T, S): dP = dO V^T
    row_dot = (d_weights * weights).sum(axis=-1, keepdims=True)          # (..., T, 1): rowsum(dP * P)
    d_scores = weights * (d_weights - row_dot)                           # (..., T, S): 0 wherever P is 0
    d_query = (d_scores @ key) * np.float32(scale)                       # (..., T, d_k)
    d_key = (np.swapaxes(d_scores, -1, -2) @ query) * np.float32(scale)  # (..., S, d_k)
    return d_query, d_key, d_value
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-attention-backward", "locked": true, "points": 10, "schema_version": 3, "solution": false}
def test_unit_attention_backward():
    """The worked example, masked and fully masked entries, and central differences of your math_attention."""
    q, k, v = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0], [20.0]])
    _, weights = math_attention(q, k, v)
    d_query, d_key, d_value = attention_backward(np.array([[1.0]]), q, k, v, weights)
    np.testing.assert_allclose(d_value.data, [[0.670], [0.330]], atol=1e-3, err_msg="worked example: dV = P^T dO")
    np.testing.assert_allclose(d_query.data, [[-1.564, 1.564]], atol=1e-3,
                               err_msg="worked example: dQ (subtract rowsum(dP * P) = 13.30, then scale by 1/sqrt(2))")
    np.testing.assert_allclose(d_key.data, [[-1.564, 0.0], [1.564, 0.0]], atol=1e-3, err_msg="worked example: dK")

    rng = np.random.default_rng(11)
    q, k, v = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 2))
    keep = rng.random((2, 4, 5)) < 0.6
    keep[:, 1] = False                                      # query 1 sees nothing
    keep[:, :, 4] = False                                   # key 4 is seen by no query
    d_output = rng.normal(size=(2, 4, 2))
    _, weights = math_attention(q, k, v, keep, scale=0.8)
    d_query, d_key, d_value = attention_backward(d_output, q, k, v, weights, keep, scale=0.8)
    assert (d_query.data[:, 1] == 0).all(), "a fully masked query row must get exactly zero gradient"
    assert (d_key.data[:, 4] == 0).all() and (d_value.data[:, 4] == 0).all(), "a key no query saw gets zero gradient"
    check = gradient_check(lambda query, key, value: math_attention(query, key, value, keep, scale=0.8),
                           {"query": q, "key": k, "value": v}, d_output,
                           {"query": d_query, "key": d_key, "value": d_value})
    assert check["passed"], f"central differences of your math_attention disagree: relative errors {check['errors']}"
    print("attention backward: the worked example, masked entries and central differences all agree")


test_unit_attention_backward()

# %% [markdown]
# ### Checking a gradient without knowing it
#
# The last check above needed no formula: `gradient_check` (provided, in
# `_attention_training_dev.py`) nudges each input entry by ±h, runs the forward twice, and
# divides the change of Σ dO ⊙ output by 2h. That costs two forwards per entry, far too slow to
# train with, and exact enough (here to about 1e-3 of the largest gradient, since your forward
# rounds in float32) to catch any real bug. Below, it checks your `attention_backward` and then
# a planted one that forgets the rowsum term. The errors it prints are relative to the largest
# entry of each gradient.

# %%
def forgets_the_rowsum(d_output, query, key, value, weights, scale):
    """A planted bug: dS = P * dP, without subtracting rowsum(dP * P)."""
    d_scores = weights * (d_output @ np.swapaxes(value, -1, -2))
    return d_scores @ key * scale, np.swapaxes(d_scores, -1, -2) @ query * scale, np.swapaxes(weights, -1, -2) @ d_output


rng = np.random.default_rng(12)
check_q, check_k, check_v, check_d = (rng.normal(size=shape) for shape in ((3, 4), (5, 4), (5, 2), (3, 2)))
check_weights = math_attention(check_q, check_k, check_v)[1].data
planted = forgets_the_rowsum(check_d, check_q, check_k, check_v, check_weights, 0.5)
for name, gradients in (("your attention_backward", attention_backward(check_d, check_q, check_k, check_v,
                                                                       check_weights)),
                        ("the planted bug", planted)):
    report = gradient_check(lambda query, key, value: math_attention(query, key, value),
                            {"query": check_q, "key": check_k, "value": check_v}, check_d,
                            dict(zip(("query", "key", "value"), gradients)))
    errors = ", ".join(f"{input_name} {error:.1e}" for input_name, error in report["errors"].items())
    print(f"{name:>24}: {'passes' if report['passed'] else 'FAILS '} (relative errors: {errors})")

# %% [markdown]
# ### Grouped heads, backward
#
# With grouped kv heads (Part 5), `repeat_kv_heads` hands each kv head to the G query heads of
# its group. In the backward, every copy's gradient flows into the one head it was copied from,
# and the copies add up: kv head g's gradient is the **sum** of the gradients of query heads
# gG … gG + G − 1. Worked by hand with H = 4 and Hkv = 2: query-head gradients [1, 2, 3, 4]
# become kv-head gradients [1 + 2, 3 + 4] = **[3, 7]**. (An average, [1.5, 3.5], would say
# each copy counted half; each was used in full.)
#
# **Your task**: `repeat_kv_heads_backward(d_x, num_kv_heads)`, from (B, H, S, hd) to
# (B, Hkv, S, hd). A reshape that splits the head axis into (Hkv, G), in the order Part 5
# grouped them, and a sum over the group.

# %% nbgrader={"grade": false, "grade_id": "repeat-kv-heads-backward", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def repeat_kv_heads_backward(d_x, num_kv_heads: int):
    """(B, H, S, hd) -> (B, Hkv, S, hd): the gradient of `repeat_kv_heads`, each group summed onto its kv head."""
    ### BEGIN SOLUTION
    B, H, S, hd = d_x.shape
    groups = d_x.reshape(B, num_kv_heads, H // num_kv_heads, S, hd)   # (B, Hkv, G, S, hd)
    return groups.sum(axis=2)                                          # (B, Hkv, S, hd)
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-repeat-kv-heads-backward", "locked": true, "points": 4, "schema_version": 3, "solution": false}
def test_unit_repeat_kv_heads_backward():
    """The worked example, and the property that defines a gradient: <repeat(x), g> = <x, backward(g)>."""
    d_x = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(repeat_kv_heads_backward(d_x, 2).data[0, :, 0, 0], [3.0, 7.0],
                                  err_msg="query-head gradients [1, 2, 3, 4] onto 2 kv heads: [1 + 2, 3 + 4]")
    rng = np.random.default_rng(13)
    x, g = rng.normal(size=(2, 2, 5, 3)), rng.normal(size=(2, 6, 5, 3))
    forward = (repeat_kv_heads(x, 6).data * g).sum()
    backward = (x * repeat_kv_heads_backward(g, 2).data).sum()
    assert abs(forward - backward) < 1e-4 * abs(forward) + 1e-4, \
        f"<repeat_kv_heads(x), g> = {forward:.5f} must equal <x, repeat_kv_heads_backward(g)> = {backward:.5f}"
    print("repeat_kv_heads_backward: each group summed onto its kv head")


test_unit_repeat_kv_heads_backward()

# %% [markdown]
# ### Keep one number per row, recompute the rest
#
# The backward above reads P, (…, T, S). FlashAttention-2 keeps the **logsumexp** of each row
# instead, L_i = log Σ_j e^{s_ij}, from which every weight comes back exactly:
# P_ij = e^{s_ij − L_i}. Your blocked loop of Part 8 already holds it at the end of each query
# block: L = m + log ℓ. Worked by hand on Part 8's example, scores [1, 3]: m = 3, ℓ = 1.135, so
# L = 3 + log 1.135 = **3.127**, and e^{1 − 3.127} = 0.119, e^{3 − 3.127} = 0.881, the weights.
# On Part 3's example, L = log(e^{0.707} + e^0) = **1.108**. A row that saw no key has m = −∞
# and ℓ = 0: its L is −∞.
#
# The backward needs one more row quantity, rowsum(dP ⊙ P), which seemed to need all of P. It
# does not: Σ_j dP_ij P_ij = Σ_j (dO_i · v_j) P_ij = dO_i · Σ_j P_ij v_j = dO_i · O_i. So
# **D = rowsum(dO ⊙ O)**, one number per row from two (T, d_v) arrays. In the worked example,
# D = 1 · 13.30, the 13.30 of the table above.
#
# ```
#   per query block i (rows i0..i1), D_i = rowsum(dO_i * O_i) and L_i read once
#   per key block j up to the causal stop:
#     S_ij = scale Q_i K_jᵀ, masked              (rows, cols)   recomputed
#     P_ij = exp(S_ij − L_i)                     (rows, cols)   recomputed, never kept
#     dV_j += P_ijᵀ dO_i          dP_ij = dO_i V_jᵀ
#     dS_ij = P_ij ⊙ (dP_ij − D_i)
#     dQ_i += scale dS_ij K_j     dK_j += scale dS_ijᵀ Q_i
#   held at once: dQ, dK, dV (the size of Q, K, V) and one block's (rows, cols) arrays
# ```
#
# **Your tasks**, two:
#
# 1. If you have not yet, finish the `return_logsumexp=True` case of your `blocked_attention`
#    in Part 8 (its task asked for it; the tests of this part grade it): return
#    `(output, logsumexp)`, a (…, T) float32 array holding
#    m + log ℓ of each row after its last key block, and −∞ for a row that saw no key (take
#    care that log 0 is never computed: use ℓ = 1 there, as for the division). Rerun Part 8's
#    cells, then this part's.
# 2. `blocked_attention_backward`: the loop above. Walk the query and key blocks as your forward
#    does, with the same causal stop, so that no key block a causal mask hides is ever read.
#    Rows whose L is −∞ have nothing to recompute: use 0 in its place (their scores are all −∞,
#    so their weights come out 0, never `nan`). Make dQ, dK and dV the broadcast shape of the
#    forward, (…, T, d), (…, S, d) and (…, S, d_v), as `attention_backward` does (the boundary
#    sums them back to each input's shape), and never make an array of T × S.

# %% nbgrader={"grade": false, "grade_id": "blocked-attention-backward", "locked": false, "schema_version": 3, "solution": true}
#| export
@checked
def blocked_attention_backward(d_output, query, key, value, output, logsumexp, mask=None, scale=None,
                               block_size: int = 128):
    """Attention's gradients, recomputing the weights block by block from the logsumexp (FlashAttention-2).

    Args:
        d_output: (..., T, d_v) float32 array, the loss's gradient with respect to the output.
        query, key, value, mask, scale: the forward's, as for `blocked_attention`.
        output, logsumexp: (..., T, d_v) and (..., T), what `blocked_attention(..., return_logsumexp=True)`
            returned; -inf marks a row that sees no key.
        block_size: queries and keys per block.
    Returns:
        (d_query, d_key, d_value) float32 arrays, equal to `attention_backward`'s.
    """
    ### BEGIN SOLUTION
    lead = np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    T, S = query.shape[-2], key.shape[-2]
    diagonal = getattr(mask, "offset", None)                            # a causal mask's offset, or None
    keep = None if mask is None else np.broadcast_to(mask, lead + (T, S))
    d_query = np.zeros(lead + query.shape[-2:], dtype=np.float32)      # (..., T, d_k)
    d_key = np.zeros(lead + key.shape[-2:], dtype=np.float32)          # (..., S, d_k)
    d_value = np.zeros(lead + value.shape[-2:], dtype=np.float32)      # (..., S, d_v)
    row_dot = (d_output * output).sum(axis=-1, keepdims=True)          # D = rowsum(dO * O): (..., T, 1)
    row_lse = np.where(np.isneginf(logsumexp), 0.0, logsumexp)[..., None]   # (..., T, 1): no key seen -> 0
    for i0 in range(0, T, block_size):
        i1 = min(i0 + block_size, T)
        key_stop = S if diagonal is None else min(S, max(0, i1 + diagonal))   # the forward's causal stop
        q_scaled = query[..., i0:i1, :] * np.float32(scale)            # (..., rows, d_k), scaled once
        d_out = d_output[..., i0:i1, :]                                # (..., rows, d_v)
        for j0 in range(0, key_stop, block_size):
            j1 = min(j0 + block_size, key_stop)
            scores = q_scaled @ np.swapaxes(key[..., j0:j1, :], -1, -2)     # (..., rows, cols)
            if mask is not None:                                            # hidden keys: P = 0
                block_keep = keep[..., i0:i1, j0:j1]                        # (..., rows, cols)
                scores = np.where(block_keep, scores, -np.inf)
            weights = np.exp(scores - row_lse[..., i0:i1, :])               # P, recomputed: (..., rows, cols)
            d_value[..., j0:j1, :] += np.swapaxes(weights, -1, -2) @ d_out
            d_weights = d_out @ np.swapaxes(value[..., j0:j1, :], -1, -2)   # dP: (..., rows, cols)
            d_scores = weights * (d_weights - row_dot[..., i0:i1, :])       # dS: (..., rows, cols)
            d_query[..., i0:i1, :] += d_scores @ key[..., j0:j1, :]         # scaled once, below
            d_key[..., j0:j1, :] += np.swapaxes(d_scores, -1, -2) @ q_scaled  # q_scaled carries the scale
    return d_query * np.float32(scale), d_key, d_value
    ### END SOLUTION

# %% nbgrader={"grade": true, "grade_id": "test-blocked-attention-backward", "locked": true, "points": 10, "schema_version": 3, "solution": false}
def test_unit_blocked_attention_backward():
    """The worked logsumexps, the worked example in blocks of one key, and attention_backward's gradients."""
    output, logsumexp = blocked_attention(np.array([[1.0]]), np.array([[1.0], [3.0]]), np.array([[10.0], [20.0]]),
                                          scale=1.0, block_size=1, return_logsumexp=True)
    np.testing.assert_allclose(logsumexp.data, [3.127], atol=1e-3, err_msg="scores [1, 3]: L = 3 + log 1.135")
    q, k, v = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0], [20.0]])
    output, logsumexp = blocked_attention(q, k, v, block_size=1, return_logsumexp=True)
    np.testing.assert_allclose(logsumexp.data, [1.108], atol=1e-3, err_msg="Part 3's example: L = log(e^0.707 + 1)")
    d_query, d_key, d_value = blocked_attention_backward(np.array([[1.0]]), q, k, v, output, logsumexp, block_size=1)
    np.testing.assert_allclose(d_query.data, [[-1.564, 1.564]], atol=1e-3, err_msg="worked example in blocks of one key: dQ")
    np.testing.assert_allclose(d_key.data, [[-1.564, 0.0], [1.564, 0.0]], atol=1e-3, err_msg="worked example: dK")
    np.testing.assert_allclose(d_value.data, [[0.670], [0.330]], atol=1e-3, err_msg="worked example: dV")

    rng = np.random.default_rng(14)
    q, k, v = rng.normal(size=(2, 3, 9, 4)), rng.normal(size=(1, 3, 13, 4)), rng.normal(size=(13, 2))
    d_output = rng.normal(size=(2, 3, 9, 2))
    random_keep = rng.random((2, 1, 9, 13)) < 0.5
    random_keep[..., 0, :] = False                                    # a fully masked row
    for name, mask in (("no mask", None), ("offset causal (9, 13)", create_causal_mask(9, 13)),
                       ("random mask over heads, a fully masked row", random_keep)):
        _, weights = math_attention(q, k, v, mask, scale=0.6)
        expected = attention_backward(d_output, q, k, v, weights, mask, scale=0.6)
        for block_size in (1, 4, 16):
            output, logsumexp = blocked_attention(q, k, v, mask, scale=0.6, block_size=block_size, return_logsumexp=True)
            if name.startswith("random"):
                assert np.isneginf(logsumexp.data[..., 0]).all(), "a row that sees no key has logsumexp -inf"
            actual = blocked_attention_backward(d_output, q, k, v, output, logsumexp, mask, scale=0.6,
                                                block_size=block_size)
            for gradient, got, want in zip(("d_query", "d_key", "d_value"), actual, expected):
                assert got.shape == want.shape, f"{name}, block_size={block_size}: {gradient} shape {got.shape}"
                np.testing.assert_allclose(got.data, want.data, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{name}, block_size={block_size}: {gradient}")
    print("blocked backward: the worked logsumexps and gradients, and attention_backward's for every mask")


test_unit_blocked_attention_backward()

# %% [markdown]
# ### Training with your gradients
#
# The provided `train_reversal` trains a one-layer attention model to reverse six tokens: the
# target at position i is the token at position 5 − i. Each token enters as its one-hot code
# joined to its position's, one head of width 16 attends, and a projection turns its output into
# scores over the 8 tokens. Plain gradient descent updates the four weight matrices from the
# loss's gradient; the projections' and the loss's gradients are provided, and the attention's
# are yours. It runs twice, from the same start: with `math_attention` and `attention_backward`
# from the saved weights, and with your blocked pair, recomputing them. To reverse, query i must
# find key 5 − i, which only the positions tell it. Look for that in the trained weights.
#
# **Predict first.** The two runs start from the same weights and see the same batches. Will
# their losses after 300 steps be identical, close, or far apart, and why?

# %%
yours = sys.modules[__name__]           # this notebook's functions: the demo runs what you just wrote
training_runs = {"saved weights": train_reversal(yours, steps=300, learning_rate=1.0, seed=0),
                 "recomputed (blocked)": train_reversal(yours, steps=300, learning_rate=1.0, seed=0, recompute=True)}
for name, run in training_runs.items():
    print(f"{name:>22}: loss {run['losses'][0]:.3f} -> {run['losses'][-1]:.4f} "
          f"({run['losses'][0] / run['losses'][-1]:.0f}x lower) in {run['seconds']:.2f} s; "
          f"last batch {run['accuracy']:.0%} reversed correctly")
gap = max(abs(a - b) for a, b in zip(*(run["losses"] for run in training_runs.values())))
print(f"largest difference between the two runs' losses: {gap:.1e}")
plot_training(training_runs, title="A one-layer attention model learning to reverse 6 tokens")

# %% [markdown]
# Both curves fall from about log 8 ≈ 2.08, guessing among 8 tokens, by a factor of 100 or
# more, and lie on top of each other: the two backward passes compute the same gradients, up to
# float32 rounding. The weights on the right put almost all of each query's weight on the key at
# the mirrored position: the anti-diagonal.
#
# ### Measured: what each backward pass keeps and costs
#
# **Predict first.** Below, your `AttentionProfiler` measures both backward passes at T = 256,
# 512 and 1024 (4 heads of 64), with what each keeps from its forward counted in its memory.
# Write down three guesses: the fitted memory exponent of the backward from saved weights, and
# of the recomputing one; and how many times the blocked forward's time the recomputing
# backward takes (count the block products of each, and remember the element-wise work).

# %%
backward_scaling = measure_backward_scaling(yours, AttentionProfiler(repeats=3, warmup=1), [256, 512, 1024],
                                            num_heads=4, head_dim=64, block_size=128)
backward_fits = {name: AttentionProfiler.analyze_quadratic_scaling(rows) for name, rows in backward_scaling.items()}
print(f"{'T':>5} | " + " | ".join(f"{name + ' ms':>24} | {'MiB':>6}" for name in backward_scaling))
for i, seq_len in enumerate([256, 512, 1024]):
    print(f"{seq_len:>5} | " + " | ".join(f"{rows[i]['time_ms']:>15.2f} ± {rows[i]['time_spread_ms']:<6.2f} | "
                                          f"{rows[i]['peak_memory_mb']:>6.1f}" for rows in backward_scaling.values()))
for name, fit in backward_fits.items():
    print(f"{name:>16}: time ~ T^{fit['time_exponent']:.2f}, memory ~ T^{fit['memory_exponent']:.2f}")
last = {name: rows[-1] for name, rows in backward_scaling.items()}
print(f"at T = 1024: recomputed / saved-weights memory {last['recomputed']['peak_memory_mb'] / last['saved weights']['peak_memory_mb']:.3f}; "
      f"recomputing backward / blocked forward time {last['recomputed']['time_ms'] / last['blocked forward']['time_ms']:.2f}")
plot_scaling(backward_scaling, backward_fits, call="call")

# %% [markdown]
# Read your table against your guesses:
#
# - **Memory.** The backward from saved weights keeps P and makes dP and dS, each (H, T, T), so
#   its memory exponent should come out close to 2 (arrays that do not grow pull a fit over
#   three sizes a little below it). The recomputing backward holds dQ, dK and dV,
#   the size of Q, K and V, which grow as T, and one block's arrays, which do not grow at all:
#   its exponent is at most 1, and below it where the fixed block arrays are still a large share
#   (at T = 256 they are). At T = 1024 its memory is a small fraction of the other's. At T = 2048 with 8 heads, the saved
#   weights alone are 128 MiB.
# - **Time.** Per block, the forward makes two products (Q Kᵀ and P V) and the recomputing
#   backward five (Q Kᵀ again, Pᵀ dO, dO Vᵀ, dS K and dSᵀ Q), with fewer element-wise steps, since
#   it knows the final L and needs no running maximum or rescaling. Expect the backward to take
#   somewhere around 1.5 to 3 times the blocked forward on a quiet machine (runs behind this text
#   measured 1.4 to 3.2 with other work running); on a busy laptop, check the spread column
#   before you trust a ratio. All three passes do work that grows as T², like every exact
#   attention, but a fit over three sizes on a busy machine can land well off 2: trust it only
#   where the spreads are small.
#
# **Try it.** Pass `causal=True` to `measure_backward_scaling`: how much of each pass does the
# causal stop save, and does the backward save as much as the forward? Then train the reversal
# model with `learning_rate=0.1`: how many steps does it take to fall 10x?

# %% [markdown]
# ## Putting it together: embeddings, positions and causal attention
#
# The first layers of a language model: token ids become vectors (`Embedding`), positions are
# added (`PositionalEncoding`), and a causal multi-head attention lets each token read the tokens
# before it. Causality is a promise worth testing directly: changing a *later* token must not
# change any *earlier* output.
#
# The cell below is the module's basic usage example. Its two inputs, `embeddings` and
# `seq_length`, are defined first.

# %%
from tinytorch.core.embeddings import Embedding, PositionalEncoding

vocab_size, embed_dim, num_heads, seq_length = 50, 32, 4, 10
token_embedding = Embedding(vocab_size, embed_dim, seed=0)
positions = PositionalEncoding(embed_dim, max_seq_length=64)
token_ids = np.random.default_rng(8).integers(0, vocab_size, size=(2, seq_length))
embeddings = positions(token_embedding(token_ids))                     # (B, T, E)

mha = MultiHeadAttention(embed_dim=embed_dim, num_heads=num_heads, seed=0)
mask = create_causal_mask(seq_length)
output, weights = mha(embeddings, embeddings, embeddings, mask=mask, return_attention_weights=True)
print(f"embeddings {embeddings.shape} -> causal multi-head attention -> {output.shape}")
print("head 0's weights for token 3 over tokens 0..5:", np.round(weights.data[0, 0, 3, :6], 3))
print("token 3's first four output features:", np.round(output.data[0, 3, :4], 3))

# %% nbgrader={"grade": false, "grade_id": "test-integration", "locked": true, "schema_version": 3, "solution": false}
def test_unit_integration():
    """Changing token 6 leaves outputs 0..5 unchanged under the causal mask, and changes them without it."""
    changed_ids = token_ids.copy()
    changed_ids[:, 6] = (changed_ids[:, 6] + 1) % vocab_size
    changed = positions(token_embedding(changed_ids))
    with_mask = mha(changed, mask=mask).data
    np.testing.assert_allclose(with_mask[:, :6], output.data[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_mask[:, 6:], output.data[:, 6:])
    without_mask = mha(changed).data
    assert not np.allclose(without_mask[:, :6], mha(embeddings).data[:, :6])
    print("integration: causal attention over embeddings never reads the future")


test_unit_integration()

# %% [markdown]
# ### What the heads look at
#
# Each heat map shows one head's weights for a short sentence: row i is query token i, column j
# is key token j, and darker means more weight. With the causal mask everything above the
# diagonal is exactly zero, and the first rows, which see only a token or two, put most of their
# weight there whatever the head. The weights are random, so the patterns are arbitrary; compare
# the heads in the second plot, without a mask, to see that each one already scores the sentence
# differently, which is the point of having several.

# %%
words = "the cat sat on the mat because it was warm".split()
vocabulary = {word: index for index, word in enumerate(dict.fromkeys(words))}
sentence_ids = np.array([[vocabulary[word] for word in words]])
sentence = positions(token_embedding(sentence_ids))
_, causal_weights = mha(sentence, mask=create_causal_mask(len(words)), return_attention_weights=True)
_, open_weights = mha(sentence, return_attention_weights=True)
plot_head_weights(causal_weights.data[0], words, title="causal mask")

# %%
plot_head_weights(open_weights.data[0], words, title="no mask")

# %% [markdown]
# ## Reflection: attention as a systems problem
#
# Answer in a few sentences each, using numbers from your own measurements above where you can.
# These answers are graded by hand.
#
# **Question 1 (memory).** A model attends over T = 32,768 tokens with 32 heads in float32, batch 1.
# How much memory do the attention weights of *one* layer take if they are formed in full? What
# would you change so that the model fits on a GPU with 24 GB, and what does each change cost?

# %% [markdown] nbgrader={"grade": true, "grade_id": "reflection-memory", "locked": false, "points": 4, "schema_version": 3, "solution": true}
# ### BEGIN SOLUTION
# One layer's weights are 32 heads × 32,768² entries × 4 bytes = 128 GiB, more than five such GPUs,
# and the math path holds several arrays of that size at once. Blocked attention (FlashAttention)
# never forms them: it keeps a block of scores per head plus the output, so memory becomes
# O(T · d) and the exact same result comes out at the cost of more, smaller kernel steps and some
# recomputation in the backward pass. Half precision halves every remaining buffer at some loss of
# precision. Sliding-window or sparse attention cut the T² work itself but change the model: a
# token no longer sees the whole context.
# ### END SOLUTION

# %% [markdown]
# **Question 2 (the cache).** Using your generation measurements, explain why the time per token
# without a cache keeps rising while the time with a cache stays nearly flat. The cache trades
# memory for time: for a 32-layer model with 32 heads of 128 in float16, how many bytes does each
# cached token cost, and what does grouped-query attention with 8 key/value heads change?

# %% [markdown] nbgrader={"grade": true, "grade_id": "reflection-kv-cache", "locked": false, "points": 3, "schema_version": 3, "solution": true}
# ### BEGIN SOLUTION
# Without the cache, step t re-projects all t tokens and computes a t × t attention, so its cost
# grows with t (and generating N tokens costs O(N²) projections); with the cache, step t projects
# one token and computes one row of t scores, and at these sizes the fixed per-call overhead
# dominates that row, so the curve is almost flat. Each cached token costs 2 (K and V) × 32 layers
# × 32 heads × 128 × 2 bytes = 512 KiB per sequence; a 4,096-token context is 2 GiB per sequence,
# which is what limits batch size in serving. With 8 key/value heads the cache shrinks 4× to
# 128 KiB per token while the queries keep 32 heads, at a small cost in model quality.
# ### END SOLUTION

# %% [markdown]
# **Question 3 (fast and readable paths).** This module keeps a readable `math_attention` and a
# tuned `fast_attention` side by side. Name two techniques the fast path uses, say which
# bottleneck each removes (use your measured times), and explain why the readable one is the
# default and what is graded, while the fast one is switched on by choice.

# %% [markdown] nbgrader={"grade": true, "grade_id": "reflection-fast-path", "locked": false, "points": 3, "schema_version": 3, "solution": true}
# ### BEGIN SOLUTION
# Tiling keeps a block of scores in the CPU cache while it is exponentiated and normalised in
# place, which removes the memory traffic of streaming several full (T, S) arrays through main
# memory; the thread pool runs the tiles on every core, which removes the single-core limit of
# NumPy's element-wise functions; skipping causal blocks removes work that would be thrown away,
# close to half of it. The readable path is the specification: it is what students write and
# what the fast path is tested against, so grading it measures the student's understanding, and
# a bug in an optimisation shows up as a disagreement between the two instead of a silently
# wrong answer. Making the readable path the default keeps what runs and what is understood the
# same code; a user who needs the speed switches the fast one on knowingly.
# ### END SOLUTION

# %% [markdown]
# ## Summary
#
# You built attention from its formula up, and measured what it costs:
#
# - `create_causal_mask`, `create_padding_mask` and `masked_softmax`: one mask convention, and a
#   softmax that neither overflows nor produces `nan` for rows with nothing to attend to.
# - `math_attention` and `attention_with_dropout`: softmax(Q Kᵀ / √d_k) V, and its dropout, which
#   the provided `ScaledDotProductAttention` layer runs in training mode only, with temperature
#   and a choice of kernels. Without positions attention is blind to word order, which is why
#   module 12's positional encodings come first.
# - `split_heads`, `merge_heads`, `repeat_kv_heads`, `MultiHeadAttention`: many heads in the
#   price of one, and grouped key/value heads that shrink the cache.
# - `KVCache` and cached decoding: one projection per generated token instead of t, each query
#   placed at its own position, at a memory cost you can now compute.
# - `blocked_attention`, and the idea of `fast_attention`: the same numbers computed with less
#   memory traffic, on every core, or without ever forming the T × S matrix.
# - `AttentionProfiler`: warm-ups, medians, spreads and fixed threads, so that every figure
#   above was measured and can be trusted.
# - `PagedKVCache`, `simulate_serving` and `kv_cache_capacity`: a cache paged in blocks, with
#   block tables, a free list, and forks that share a prompt through reference counts and
#   copy-on-write; a measured serving workload in which paging keeps almost every held slot
#   busy and runs several times as many requests as reserved regions; and the arithmetic of
#   how many tokens a real model's cache fits on a real card.
# - `attention_backward`, `repeat_kv_heads_backward`, the logsumexp and `blocked_attention_backward`:
#   the gradients of masked, grouped-head attention, checked by central differences and used to train
#   a small model, and FlashAttention-2's backward, which keeps one number per row instead of the
#   T × S weights and recomputes them block by block.
#
# Module 14 stacks these layers with feed-forward networks, normalisation and residual
# connections into a transformer.

# %% [markdown]
# ## Appendix: names this package re-exports
#
# The kernel switch and the fast kernel are provided in `_attention_backend_dev.py`, the causal
# mask's class in `_attention_checks_dev.py`; `tinytorch.core.attention` makes them public beside
# your code.

# %%
#| export
from tinytorch.core._attention_backend import ATTENTION_BACKENDS, attention_backend, fast_attention, set_attention_backend
from tinytorch.core._attention_checks import CausalMask

_all_ = ["ATTENTION_BACKENDS", "CausalMask", "get_attention_backend", "set_attention_backend", "attention_backend",
         "fast_attention"]

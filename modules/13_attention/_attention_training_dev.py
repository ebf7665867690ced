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
# # Module 13, provided: training attention
#
# > The tools around the lesson's backward pass (Part 11). Provided complete.
#
# The student writes the gradients of attention in `attention_dev.py`. This notebook holds what
# checks, uses and measures them, and computes none of them itself:
#
# 1. **A gradient check**: central differences in float64, for any function of the module.
# 2. **A training demonstration**: a one-layer attention model learns to reverse a few tokens
#    by plain gradient descent. Its projections' and loss's gradients are here; the attention's
#    are the student's.
# 3. **The backward passes' costs**: the student's `AttentionProfiler` times and traces both
#    backward passes over sequence lengths.
#
# `tinytorch/core/_attention_training.py` is generated from this file.

# %%
#| default_exp core._attention_training

# %%
#| export
import time

import numpy as np

from tinytorch.core._attention_backend import single_threaded_blas
from tinytorch.core._attention_checks import check_int

# %% [markdown]
# ## 1. A gradient check by central differences
#
# For a function f and a fixed array of output gradients dO, the loss L = Σ dO ⊙ f(x) has the
# gradient with respect to x that a backward pass computes from dO. Central differences estimate
# it one entry at a time: (L(x + h e_i) − L(x − h e_i)) / 2h, wrong by O(h²). The differences
# are taken in float64; a function that computes in float32 (as the module's do) rounds its
# output to about 1e-7 of its size, which the division by 2h magnifies, so with h = 1e-2 the
# estimate agrees with a correct gradient to about 1e-3 of the gradient's largest entry. A real
# bug (a missing term, a transpose, a factor) is off by far more.

# %%
#| export
def _as_float64(value) -> np.ndarray:
    return np.array(getattr(value, "data", value), dtype=np.float64)


def numerical_gradients(function, inputs: dict, d_output, names, step: float = 1e-2) -> dict:
    """Central-difference gradients of sum(d_output * function(**inputs)) with respect to the inputs `names`.

    Args:
        function: called with the inputs by name; a tuple result counts by its first item.
        inputs: name -> array (or Tensor); the ones in `names` are perturbed one entry at a time, in float64.
        d_output: the output gradient dO, the shape of function's output.
        names: the inputs to differentiate.
        step: the perturbation h.
    Returns:
        name -> float64 array of the input's shape.
    """
    if not callable(function):
        raise TypeError(f"function must be callable, got {type(function).__name__}")
    if not (isinstance(step, (int, float)) and step > 0):
        raise ValueError(f"step must be a positive number, got {step!r}")
    arrays = {name: (_as_float64(value) if name in names else value) for name, value in inputs.items()}
    missing = [name for name in names if name not in arrays]
    if missing:
        raise ValueError(f"names {missing} are not among the inputs {sorted(inputs)}")
    d_output = _as_float64(d_output)

    def loss() -> float:
        result = function(**arrays)
        output = _as_float64(result[0] if isinstance(result, tuple) else result)
        if output.shape != d_output.shape:
            raise ValueError(f"d_output has shape {d_output.shape} but the function's output has {output.shape}")
        return float(np.sum(d_output * output))

    gradients = {}
    for name in names:
        array, gradient = arrays[name], np.zeros(arrays[name].shape)
        for index in np.ndindex(*array.shape):
            kept = array[index]
            array[index] = kept + step
            up = loss()
            array[index] = kept - step
            down = loss()
            array[index] = kept
            gradient[index] = (up - down) / (2 * step)
        gradients[name] = gradient
    return gradients


def gradient_check(function, inputs: dict, d_output, gradients: dict, step: float = 1e-2,
                   tolerance: float = 1e-2) -> dict:
    """Compare analytic gradients with central differences of `function`.

    Args:
        function, inputs, d_output, step: as for `numerical_gradients`.
        gradients: name -> the analytic gradient of that input (array or Tensor), the inputs to check.
        tolerance: the largest relative error that passes.
    Returns:
        errors (name -> max |analytic - numerical| / max |numerical|), worst, passed (worst <= tolerance)
        and numerical (the estimates).
    """
    numerical = numerical_gradients(function, inputs, d_output, list(gradients), step)
    errors = {}
    for name, analytic in gradients.items():
        analytic = _as_float64(analytic)
        if analytic.shape != numerical[name].shape:
            raise ValueError(f"the gradient of {name} has shape {analytic.shape}, but {name} has {numerical[name].shape}")
        size = max(float(np.abs(numerical[name]).max(initial=0.0)), 1e-12)
        errors[name] = float(np.abs(analytic - numerical[name]).max(initial=0.0)) / size
    worst = max(errors.values(), default=0.0)
    return {"errors": errors, "worst": worst, "passed": worst <= tolerance, "numerical": numerical}

# %% [markdown]
# ## 2. A one-layer attention model that learns to reverse tokens
#
# Each example is `seq_len` random tokens from `vocab_size`; the target at position i is the
# token at position seq_len − 1 − i. A token enters as its one-hot code joined to its position's
# one-hot code, x (B, T, V + T). One head of width `head_dim` attends: Q = x W_q, K = x W_k,
# V = x W_v, then logits = attention(Q, K, V) W_o and a cross-entropy loss. To reverse, query i
# must find key T − 1 − i, which only the positions can tell it, and read that key's token from
# its value: a pattern the learned weights show as an anti-diagonal.
#
# The gradients of the loss, of W_o and of the three projections are here (for y = x W,
# dW = xᵀ dy summed over the batch); the attention's, from dO to dQ, dK and dV, are the
# student's, either backward pass.

# %%
#| export
def reversal_batch(rng, batch_size: int, seq_len: int = 6, vocab_size: int = 8):
    """Random tokens, their features and their reversal: x (B, T, V + T) float32, tokens and targets (B, T)."""
    tokens = rng.integers(0, vocab_size, size=(batch_size, seq_len))
    token_codes = np.eye(vocab_size, dtype=np.float32)[tokens]                   # (B, T, V)
    position_codes = np.broadcast_to(np.eye(seq_len, dtype=np.float32), (batch_size, seq_len, seq_len))
    return np.concatenate([token_codes, position_codes], axis=-1), tokens, tokens[:, ::-1]


def cross_entropy(logits, targets):
    """Mean cross-entropy of (B, T, V) logits against (B, T) targets, and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(probabilities, targets[..., None], axis=-1)[..., 0]   # (B, T)
    d_logits = probabilities.copy()
    np.put_along_axis(d_logits, targets[..., None], picked[..., None] - 1.0, axis=-1)
    return float(-np.log(picked).mean()), (d_logits / targets.size).astype(np.float32)


def projection_gradient(x, d_y):
    """dW of y = x W for (B, T, F) x and (B, T, D) d_y: xᵀ d_y summed over the batch, (F, D)."""
    return np.einsum("btf,btd->fd", x, d_y)


def train_reversal(student, steps: int = 300, learning_rate: float = 1.0, batch_size: int = 64, seq_len: int = 6,
                   vocab_size: int = 8, head_dim: int = 16, seed: int = 0, recompute: bool = False) -> dict:
    """Train the one-layer reversal model by plain gradient descent with the student's attention gradients.

    Args:
        student: what holds the student's functions by name (`math_attention`, `attention_backward`,
            `blocked_attention`, `blocked_attention_backward`): the notebook's own namespace, so that
            the demo runs the code just written, or the exported `tinytorch.core.attention`.
        steps, learning_rate, batch_size: the descent; a fresh random batch every step.
        seq_len, vocab_size, head_dim: the task and the head.
        seed: the initial weights and the batches.
        recompute: False runs `math_attention` and `attention_backward` from the saved weights;
            True runs `blocked_attention(..., return_logsumexp=True)` and `blocked_attention_backward`.
    Returns:
        losses (one per step), seconds (the whole run), accuracy (of the last batch), and
        example_tokens (T,) with example_weights (T, T), the trained model's weights on one new example.
    """
    math_attention, attention_backward = student.math_attention, student.attention_backward
    blocked_attention, blocked_attention_backward = student.blocked_attention, student.blocked_attention_backward
    steps, batch_size = check_int(steps, "steps", 1), check_int(batch_size, "batch_size", 1)
    rng = np.random.default_rng(seed)
    width = vocab_size + seq_len
    params = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in
              (("w_q", (width, head_dim)), ("w_k", (width, head_dim)), ("w_v", (width, head_dim)),
               ("w_o", (head_dim, vocab_size)))}
    block = max(1, seq_len // 2)                                      # blocks of half the sequence
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        x, _, targets = reversal_batch(rng, batch_size, seq_len, vocab_size)
        q, k, v = x @ params["w_q"], x @ params["w_k"], x @ params["w_v"]          # (B, T, hd) each
        if recompute:
            output, logsumexp = (r.data for r in blocked_attention(q, k, v, block_size=block, return_logsumexp=True))
        else:
            output, weights = (r.data for r in math_attention(q, k, v))
        loss, d_logits = cross_entropy(output @ params["w_o"], targets)
        losses.append(loss)
        d_output = d_logits @ params["w_o"].T                                        # (B, T, hd)
        if recompute:
            d_q, d_k, d_v = blocked_attention_backward(d_output, q, k, v, output, logsumexp, block_size=block)
        else:
            d_q, d_k, d_v = attention_backward(d_output, q, k, v, weights)
        gradients = {"w_q": projection_gradient(x, d_q.data), "w_k": projection_gradient(x, d_k.data),
                     "w_v": projection_gradient(x, d_v.data), "w_o": np.einsum("btd,btv->dv", output, d_logits)}
        for name, gradient in gradients.items():
            params[name] -= np.float32(learning_rate) * gradient.astype(np.float32)
    seconds = time.perf_counter() - start
    accuracy = float(((output @ params["w_o"]).argmax(axis=-1) == targets).mean())
    x, tokens, _ = reversal_batch(np.random.default_rng(seed + 1), 1, seq_len, vocab_size)
    _, example_weights = math_attention(x @ params["w_q"], x @ params["w_k"], x @ params["w_v"])
    return {"losses": losses, "seconds": seconds, "accuracy": accuracy, "example_tokens": tokens[0],
            "example_weights": example_weights.data[0]}

# %% [markdown]
# ## 3. What each backward pass costs
#
# `measure_backward_scaling` runs the student's profiler over sequence lengths, with BLAS held at
# one thread, on random (1, H, T, head_dim) inputs: the blocked forward with its logsumexp, the
# backward from the saved weights, and the recomputing backward. A backward's memory is the peak
# of its call plus what the forward kept for it beyond Q, K, V and O: the (H, T, T) weights, or the
# (H, T) logsumexp.

# %%
#| export
def measure_backward_scaling(student, profiler, seq_lengths, *, num_heads: int = 4, head_dim: int = 64,
                             block_size: int = 128, causal: bool = False) -> dict:
    """Time and memory of the blocked forward and of both backward passes at each sequence length.

    Args:
        student: what holds the student's functions by name, as for `train_reversal`, and
            `create_causal_mask`.
        profiler: an `AttentionProfiler` (its measure_time, peak_memory and seed are used).
        seq_lengths: the lengths T = S to measure.
        num_heads, head_dim, block_size, causal: the inputs, the blocks, and create_causal_mask(T) or none.
    Returns:
        {"blocked forward": rows, "saved weights": rows, "recomputed": rows}; each row holds seq_len,
        time_ms, time_spread_ms, peak_memory_mb (the call's peak plus what it keeps) and kept_mb.
    """
    math_attention, attention_backward = student.math_attention, student.attention_backward
    blocked_attention, blocked_attention_backward = student.blocked_attention, student.blocked_attention_backward
    create_causal_mask = student.create_causal_mask
    num_heads, head_dim = check_int(num_heads, "num_heads", 1), check_int(head_dim, "head_dim", 1)
    results = {"blocked forward": [], "saved weights": [], "recomputed": []}
    with single_threaded_blas():
        for seq_len in seq_lengths:
            seq_len = check_int(seq_len, "seq_len", 1)
            rng = np.random.default_rng(profiler.seed)
            q, k, v, d_output = (rng.standard_normal((1, num_heads, seq_len, head_dim), dtype=np.float32)
                                 for _ in range(4))
            mask = create_causal_mask(seq_len) if causal else None
            output, logsumexp = (r.data for r in blocked_attention(q, k, v, mask, block_size=block_size,
                                                                    return_logsumexp=True))
            weights = math_attention(q, k, v, mask)[1].data
            calls = {
                "blocked forward": (lambda: blocked_attention(q, k, v, mask, block_size=block_size,
                                                              return_logsumexp=True), 0),
                "saved weights": (lambda: attention_backward(d_output, q, k, v, weights, mask), weights.nbytes),
                "recomputed": (lambda: blocked_attention_backward(d_output, q, k, v, output, logsumexp, mask,
                                                                  block_size=block_size), logsumexp.nbytes),
            }
            for name, (call, kept) in calls.items():
                timing = profiler.measure_time(call)
                results[name].append({"seq_len": seq_len, "time_ms": timing["median_ms"],
                                      "time_spread_ms": timing["spread_ms"],
                                      "peak_memory_mb": (profiler.peak_memory(call) + kept) / 2**20,
                                      "kept_mb": kept / 2**20})
            del weights
    return results

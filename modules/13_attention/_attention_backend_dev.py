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
# # Module 13, provided: the backend switch
#
# > Which attention core the layers run: the student's, or the tuned kernel. Provided complete.
#
# 1. **The switch**: `"math"` (the student's code, the default) or `"fast"` (the tuned kernel),
#    with the kernel's `Techniques` when a caller passes them.
# 2. **The tuned kernel's entry points**: `tuned_attention`, which the layer calls, and
#    `fast_attention`, the public one. The kernel itself is in `_attention_kernel_dev.py`.
# 3. **Blocked attention on every core**: the parallel driver of the lesson's blocked loop,
#    which the layer hands the student's `blocked_attention`.
#
# `tinytorch/core/_attention_backend.py` is generated from this file.

# %%
#| default_exp core._attention_backend

# %%
#| export
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from tinytorch.core import _attention_checks as checks, _attention_kernel as kernel
from tinytorch.core.tensor import Tensor

# %% [markdown]
# ## 1. The switch
#
# `ScaledDotProductAttention` runs one of two attention cores, chosen in its `forward` and
# nowhere else: `"math"`, the student's `math_attention` (the formula exactly as written) or
# blocked loop, or `"fast"`, the tuned kernel. Everything around the core, the multi-head layer
# and the caches, is the student's code under either. **The default is
# `"math"`**, fixed here and nowhere else, so every layer, demo, figure and later module runs the
# student's code; importing the package never changes it. The tuned kernel is switched on by
# choice: `set_attention_backend("fast")` for the whole process, or
# `with attention_backend("fast"):` inside a block, for the current thread only.

# %%
#| export
ATTENTION_BACKENDS = ("math", "fast")
DEFAULT_BACKEND = "math"
_chosen_backend = (DEFAULT_BACKEND, None)        # (name, the kernel's Techniques, or None for all of them)
_backend_in_block: ContextVar = ContextVar("tinytorch_attention_backend", default=None)


def _check_backend(name: str, techniques) -> tuple:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if techniques is not None and not isinstance(techniques, kernel.Techniques):
        raise TypeError(f"techniques must be a Techniques or None, got {type(techniques).__name__}")
    return name, techniques


def get_attention_backend() -> str:
    """The kernel that attention layers use here: "math" or "fast"."""
    return (_backend_in_block.get() or _chosen_backend)[0]


def _backend_techniques():
    """The Techniques the "fast" kernel uses here, or None for all of them."""
    return (_backend_in_block.get() or _chosen_backend)[1]


def set_attention_backend(name: str, techniques=None) -> None:
    """Choose the kernel of every attention layer: "math" (the student's, the default) or "fast" (tuned).

    techniques: the tuned kernel's Techniques; None uses all of them.
    """
    global _chosen_backend
    _chosen_backend = _check_backend(name, techniques)


@contextmanager
def attention_backend(name: str, techniques=None):
    """Use the named kernel (and, for "fast", these Techniques) inside a `with` block; other threads keep theirs."""
    token = _backend_in_block.set(_check_backend(name, techniques))
    try:
        yield
    finally:
        _backend_in_block.reset(token)


# %% [markdown]
# ## 2. The tuned kernel's entry points
#
# The kernel, its techniques and its worker pool live in `_attention_kernel_dev.py`, which takes
# everything it needs as arguments. `tuned_attention` is what `ScaledDotProductAttention` calls
# on checked arrays, with the techniques the switch holds; `fast_attention` is the public one,
# which checks its inputs and hands back Tensors.
#
# **Threads.** The kernel's `WorkerPool` runs tiles on the calling thread plus one pool thread
# per further core, and holds BLAS at one thread while they run (see the kernel's section 2).
# `single_threaded_blas` is that hold, for the profiler's sweeps too.

# %%
#| export
def single_threaded_blas():
    """BLAS on one thread while any caller, in any thread, is inside: the first in limits, the last out restores."""
    return kernel.POOL.blas_on_one_thread()


def tuned_attention(q, k, v, keep, scale: float, need_weights: bool):
    """The tuned kernel on checked arrays, with the backend's techniques; returns (output, weights or None) arrays.

    keep is the boolean mask (or None). A causal mask made by `create_causal_mask` that covers
    the scores carries its offset, which lets the kernel skip the future instead of reading it.
    """
    offset = checks.causal_offset(keep, q.shape[-2], k.shape[-2])
    return kernel.attention(q, k, v, None if offset is not None else keep, scale, offset, need_weights,
                            techniques=_backend_techniques(), after_threaded_blas=checks.after_threaded_blas())


def fast_attention(query, key, value, mask=None, scale=None, need_weights: bool = True):
    """`math_attention`'s result from the tiled, threaded kernel.

    Args:
        query, key, value, mask, scale: as for `math_attention`; a CausalMask's future is skipped.
        need_weights: also form and return the (..., T, S) weights.
    Returns:
        (output (..., T, d_v), weights (..., T, S) or None) as float32 Tensors.
    """
    q, k, v, _, scale = checks.check_attention_inputs(query, key, value, None, scale)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    output, weights = tuned_attention(q, k, v, checks.keep_mask(mask, lead + (q.shape[-2], k.shape[-2])), scale,
                                      need_weights)
    return Tensor(output), None if weights is None else Tensor(weights)

# %% [markdown]
# ## 3. Blocked attention on every core
#
# Query blocks are independent: block i needs only its own rows of Q and of the mask, and all of
# K and V. So the layer (`ScaledDotProductAttention(block_size=...)`) hands one query block at a
# time to each core, each running the student's `blocked_attention`. A causal mask travels with
# its rows: rows r0..r1 of a mask with offset o form a causal mask with offset o + r0.

# %%
#| export
def parallel_blocked_attention(blocked_attention, q, k, v, keep, scale: float, block_size: int) -> np.ndarray:
    """`blocked_attention` on checked arrays, one block of query rows per task; returns the output.

    keep is the checked boolean mask (or None); a causal one that covers the scores carries its
    offset, and each block's rows carry theirs. The blocks skip the NaN/inf scan of the arrays
    the caller has checked.
    """
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    offset = checks.causal_offset(keep, T, S)

    def rows_mask(r0, r1):
        if keep is None or keep.ndim < 2 or keep.shape[-2] == 1:
            return keep                                                  # the same for every row
        rows = keep[..., r0:r1, :]
        if offset is not None:                                           # rows r0..r1: a causal mask, offset + r0
            rows = rows.view(checks.CausalKeep)
            rows.offset = offset + r0
        return rows

    def rows(r0, r1):
        with checks.inputs_checked():                  # a context variable: each pool thread enters its own
            return blocked_attention(q[..., r0:r1, :], k, v, rows_mask(r0, r1), scale, block_size)

    if T <= block_size or kernel.cores() == 1:
        return rows(0, T)
    output = np.empty(lead + (T, dv), dtype=np.float32)

    def run(r0, r1):
        output[..., r0:r1, :] = rows(r0, r1)

    blocks = [(r0, min(r0 + block_size, T)) for r0 in range(0, T, block_size)]
    kernel.POOL.map(run, blocks[::-1])                                   # largest causal blocks first
    return output

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
# # Module 13, provided: the runtime beneath the attention lesson
#
# > Input checks, the choice of kernel, the thread policy and the tuned kernels. Provided complete.
#
# `attention_dev.py` is the lesson: students write every idea of attention there. This notebook
# holds what a real library needs around those ideas but what is not the lesson, so that the
# lesson reads cleanly:
#
# 1. **Input checks**: every public function converts its inputs to float32 arrays and rejects
#    bad ones with a message that names the argument, what was expected and what was given.
# 2. **Masks**: `CausalMask`, the causal mask that remembers its offset, and the conversion of any
#    user mask to one boolean "may attend" array.
# 3. **The kernel switch**: which implementation the attention layers run: the student's
#    `"math"` path by default, the tuned `"fast"` kernel when switched on.
# 4. **The tuned kernel's entry points**: `fast_attention` and the adapters the layers call; the
#    kernel itself, its techniques and its worker pool are in `_attention_kernel_dev.py`.
# 5. **Blocked attention on every core**: the parallel driver of the lesson's blocked attention.
# 6. **The layers' input checks** and the provided part of the caches (`KVCacheBase`,
#    `PagedKVCacheBase`); 7. the profiler's sweeps; 8. the serving measurements' checks.
# 9. **The public boundary**: `@checked`, which runs each entry point's checks once, before the
#    student's code, and the table of those checks.
#
# `tinytorch/core/_attention_runtime.py` is generated from this file; `tinytorch.core.attention`
# re-exports the public names.

# %%
#| default_exp core._attention_runtime

# %%
#| export
import math
import time
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from tinytorch.core import _attention_kernel as kernel
from tinytorch.core.tensor import Tensor

# %% [markdown]
# ## 1. Input checks
#
# Each public function of module 13 accepts a `Tensor`, a NumPy array or nested lists, and
# works on float32 arrays. Non-finite numbers follow one rule everywhere: an array argument
# holding NaN or inf raises a `ValueError` that names it. The only exception is the score input
# of `masked_softmax`, where −inf is the documented way to say "masked out".
#
# Every entry point checks what its caller gave it once (section 9). Inside
# `with inputs_checked():`, the block a checked call runs the student's code in, the module's own
# functions take their arrays as given: nothing derived from checked inputs is scanned for NaN and
# inf again, which would otherwise read a whole KV cache at every decoding step.

# %%
#| export
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
_inputs_checked: ContextVar = ContextVar("tinytorch_attention_inputs_checked", default=False)


@contextmanager
def inputs_checked():
    """Inside a checked call: the module's functions take their arrays as given, checked once already."""
    token = _inputs_checked.set(True)
    try:
        yield
    finally:
        _inputs_checked.reset(token)



def array_norm(array: np.ndarray) -> float:
    """The Euclidean norm of all of a float array; NaN or inf if it holds them."""
    with np.errstate(over="ignore", invalid="ignore"):
        if array.dtype == np.float32 and array.flags.c_contiguous:
            return math.sqrt(np.dot(array.reshape(-1), array.reshape(-1)))
        return math.sqrt(np.einsum("...ij,...ij->...", array, array).sum())


def all_finite(array: np.ndarray) -> bool:
    """No NaN or inf in a float array, found without allocating.

    A C-contiguous float32 array gets one BLAS pass first: x . x is finite unless x holds NaN or
    inf, or finite values so large that the sum overflows. Min and max, which propagate NaN,
    decide every other case.
    """
    if array.size == 0 or array.dtype.kind != "f":
        return True
    if array.dtype == np.float32 and array.flags.c_contiguous and math.isfinite(array_norm(array)):
        return True                                                # an overflowing norm only means: look closer
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))   # np.isfinite: longdouble stays longdouble


def numeric_array(x, name: str) -> np.ndarray:
    """`x` (a Tensor, an array or nested lists) as a NumPy array of booleans or numbers; TypeError otherwise."""
    data = x.data if isinstance(x, Tensor) else x
    if data is None:
        raise TypeError(f"{name} must be a Tensor or an array of numbers, got None")
    try:
        array = np.asarray(data)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a Tensor or an array of numbers, got {type(x).__name__}") from error
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array


def as_float32(x, name: str, finite: bool = True) -> np.ndarray:
    """`x` (a Tensor, an array or nested lists of numbers) as a float32 array.

    Raises TypeError for anything that is not numbers, and ValueError for values beyond float32's
    range or, when `finite`, for NaN and inf.
    """
    array = numeric_array(x, name)
    if array.dtype != np.float32:
        with np.errstate(over="raise", invalid="ignore"):
            try:
                array = array.astype(np.float32)
            except FloatingPointError:
                raise ValueError(f"{name} holds values beyond float32's range (+-{FLOAT32_MAX:.3g})") from None
    if finite and not _inputs_checked.get() and not all_finite(array):
        raise ValueError(f"{name} holds NaN or inf; attention needs finite numbers")
    return array


def is_number(value) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_int(value, name: str, minimum: int) -> int:
    """`value` as an int, at least `minimum`; TypeError for non-integers, ValueError below it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_probability(value, name: str) -> float:
    """`value` as a float in [0, 1)."""
    if not (is_number(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


class Layer:
    """A layer in the PyTorch style: `layer(...)` is `layer.forward(...)`, and `train()`/`eval()`
    switch `training` on it and on every layer it holds as an attribute."""

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def train(self, mode: bool = True):
        """Training mode (dropout active) when `mode`, evaluation mode otherwise. Returns self."""
        self.training = bool(mode)
        for value in vars(self).values():
            if isinstance(value, Layer):
                value.train(mode)
        return self

    def eval(self):
        """Evaluation mode (dropout off). Returns self."""
        return self.train(False)


def check_scale(scale) -> float:
    """A score scale: a positive number whose value float32 can hold."""
    if not (is_number(scale) and FLOAT32_TINY <= scale <= FLOAT32_MAX):
        raise ValueError(f"scale must be a positive number within float32's range, got {scale!r}")
    return float(scale)

# %% [markdown]
# ## 2. Masks
#
# One convention holds everywhere: nonzero or `True` means "may attend". `as_keep_mask` turns any
# mask a user passes into that boolean array, after checking it broadcasts to the scores.
#
# A `CausalMask` is the mask `create_causal_mask` returns: a read-only `Tensor` that remembers its
# diagonal offset. The tuned kernels read the offset and skip the keys that lie wholly in the
# future instead of computing their scores and throwing them away.

# %%
#| export
def broadcasts_to(shape: tuple, target: tuple) -> bool:
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def as_keep_mask(mask, scores_shape: tuple, name: str = "mask") -> np.ndarray | None:
    """A boolean 'may attend' array that broadcasts to `scores_shape`, or None for no mask."""
    if mask is None:
        return None
    array = numeric_array(mask, name)
    if not broadcasts_to(array.shape, scores_shape):
        raise ValueError(f"{name} of shape {array.shape} does not broadcast to scores {tuple(scores_shape)}")
    if not all_finite(array):
        raise ValueError(f"{name} holds NaN or inf; use 1/True for 'may attend' and 0/False for 'masked out'")
    return array if array.dtype == np.bool_ else array != 0


class CausalMask(Tensor):
    """A read-only causal mask that remembers its diagonal offset: entry [i, j] is 1 where j <= i + offset.

    `create_causal_mask` builds it. The tuned kernel and the blocked loop's skip trust the offset;
    the math path reads the data.
    """

    def __init__(self, data, offset: int):
        super().__init__(np.array(data, dtype=np.float32))
        if self.data.ndim != 2:
            raise ValueError(f"a causal mask has shape (seq_len, key_len), got shape {self.data.shape}")
        self.data.flags.writeable = False  # kernels trust the offset, so the data may not change
        self.offset = int(offset)


def causal_offset(mask, seq_q: int, seq_k: int) -> int | None:
    """The offset of a CausalMask that covers the (seq_q, seq_k) scores exactly; None for any other mask.

    A causal mask that only broadcasts to the scores (a (1, 1) mask is all ones) is an ordinary
    mask: its offset says nothing about which keys the scores may skip.
    """
    if isinstance(mask, (CausalMask, CausalKeep)) and mask.offset is not None and mask.shape == (seq_q, seq_k):
        return mask.offset
    return None


def check_attention_inputs(query, key, value, mask=None, scale=None):
    """Checked float32 (query, key, value), boolean mask (or None) and the score scale.

    query (..., T, d_k), key (..., S, d_k), value (..., S, d_v), leading axes broadcasting;
    the scale defaults to 1/sqrt(d_k).
    """
    q, k, v = (as_float32(x, name, finite=False) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    for name, array, axes in (("query", q, "(..., seq_q, d_k)"), ("key", k, "(..., seq_k, d_k)"),
                              ("value", v, "(..., seq_k, d_v)")):
        if array.ndim < 2:
            raise ValueError(f"{name} must have shape {axes} with at least 2 axes, got shape {array.shape}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key has d_k={k.shape[-1]} but query has d_k={q.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("query has d_k=0; attention needs d_k >= 1")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"value has seq_k={v.shape[-2]} but key has seq_k={k.shape[-2]}")
    try:
        lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"the leading axes of query {q.shape[:-2]}, key {k.shape[:-2]} and "
                         f"value {v.shape[:-2]} do not broadcast together") from None
    if not _inputs_checked.get():
        for name, array in (("query", q), ("key", k), ("value", v)):
            if not all_finite(array):
                raise ValueError(f"{name} holds NaN or inf; attention needs finite numbers")
    keep = as_keep_mask(mask, lead + (q.shape[-2], k.shape[-2]))
    scale = check_scale(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return q, k, v, keep, scale


def mask_over_heads(mask, batch: int, num_heads: int, seq_q: int, seq_k: int):
    """A multi-head layer's mask, (T, S), (B, T, S) or 4-D, as one that broadcasts to (B, H, T, S).

    A CausalMask that covers (T, S) stays as it is, so that the kernels can skip its future;
    every other mask becomes a boolean array.
    """
    if mask is None or causal_offset(mask, seq_q, seq_k) is not None:
        return mask
    data = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
    if data.ndim == 3:
        if data.shape[0] not in (1, batch):
            raise ValueError(f"a 3-D mask is read as (batch, seq_q, seq_k) and needs batch {batch} or 1, "
                             f"got mask of shape {data.shape}")
        data = data[:, None]                                         # (B, 1, T, S)
    elif data.ndim not in (2, 4):
        raise ValueError(f"mask must have shape (seq_q, seq_k), (batch, seq_q, seq_k) or "
                         f"(batch, heads, seq_q, seq_k), got shape {data.shape}")
    return as_keep_mask(data, (batch, num_heads, seq_q, seq_k))

# %% [markdown]
# ## 3. The kernel switch
#
# The attention layers can run one of two kernels: `"math"`, the student's `math_attention`
# (the formula exactly as written), or `"fast"`, the tuned kernel below. **The default is
# `"math"`**, fixed here and nowhere else, so every layer, demo, figure and later module runs the
# student's code; importing the package never changes it. The tuned kernel is switched on by
# choice: `set_attention_backend("fast")` for the whole process, or
# `with attention_backend("fast"):` inside a block, for the current thread only.

# %%
#| export
ATTENTION_BACKENDS = ("math", "fast")
DEFAULT_BACKEND = "math"
_chosen_backend = (DEFAULT_BACKEND, None)        # (name, the kernel's Techniques or None for the machine's choice)
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


def backend_techniques():
    """The Techniques the "fast" kernel uses here, or None for the ones chosen for this machine."""
    return (_backend_in_block.get() or _chosen_backend)[1]


def set_attention_backend(name: str, techniques=None) -> None:
    """Choose the kernel of every attention layer: "math" (the student's, the default) or "fast" (tuned).

    techniques: the tuned kernel's Techniques; None uses the ones chosen for this machine.
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


provided_kernels_refused = kernel.provided_kernels_refused   # graded tests run inside it

# %% [markdown]
# ## 4. The tuned kernel's entry points
#
# The kernel, its techniques and its worker pool live in `_attention_kernel_dev.py`, which takes
# everything it needs as arguments. These are the entry points the layers call: they turn a
# `CausalMask` into its offset and arrays into Tensors.
#
# **Threads.** The kernel's `WorkerPool` runs tiles on the calling thread plus one pool thread
# per further core, and holds BLAS at one thread while they run (see the kernel's section 2).
# `single_threaded_blas` is that hold, for the profiler's sweeps too.

# %%
#| export
cores = kernel.cores


def single_threaded_blas():
    """BLAS on one thread while any caller, in any thread, is inside: the first in limits, the last out restores."""
    return kernel.POOL.blas_on_one_thread()


def tuned_attention(q, k, v, keep, scale: float, need_weights: bool):
    """The tuned kernel on checked arrays, with the backend's techniques; returns (output, weights or None) arrays.

    keep is the boolean mask (or None). A causal mask made by `create_causal_mask` that covers
    the scores carries its offset, which lets the kernel skip the future instead of reading it.
    """
    offset = causal_offset(keep, q.shape[-2], k.shape[-2])
    return kernel.attention(q, k, v, None if offset is not None else keep, scale, offset, need_weights,
                            techniques=backend_techniques())


def fast_attention(query, key, value, mask=None, scale=None, need_weights: bool = True):
    """`math_attention`'s result from the tiled, threaded kernel.

    Args:
        query, key, value, mask, scale: as for `math_attention`; a CausalMask's future is skipped.
        need_weights: also form and return the (..., T, S) weights.
    Returns:
        (output (..., T, d_v), weights (..., T, S) or None) as float32 Tensors.
    """
    q, k, v, _, scale = check_attention_inputs(query, key, value, None, scale)
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    output, weights = tuned_attention(q, k, v, keep_mask(mask, lead + (q.shape[-2], k.shape[-2])), scale,
                                      need_weights)
    return Tensor(output), None if weights is None else Tensor(weights)

# %% [markdown]
# ## 5. Blocked attention on every core
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
    offset = causal_offset(keep, T, S)

    def rows_mask(r0, r1):
        if keep is None or keep.ndim < 2 or keep.shape[-2] == 1:
            return keep                                                  # the same for every row
        rows = keep[..., r0:r1, :]
        if offset is not None:                                           # rows r0..r1: a causal mask, offset + r0
            rows = rows.view(CausalKeep)
            rows.offset = offset + r0
        return rows

    def rows(r0, r1):
        with inputs_checked():                  # a context variable: each pool thread enters its own
            return blocked_attention(q[..., r0:r1, :], k, v, rows_mask(r0, r1), scale, block_size)

    if T <= block_size or cores() == 1:
        return rows(0, T)
    output = np.empty(lead + (T, dv), dtype=np.float32)

    def run(r0, r1):
        output[..., r0:r1, :] = rows(r0, r1)

    blocks = [(r0, min(r0 + block_size, T)) for r0 in range(0, T, block_size)]
    kernel.POOL.map(run, blocks[::-1])                                   # largest causal blocks first
    return output

# %% [markdown]
# ## 6. The layers' input checks
#
# `KVCacheBase` is the part of `KVCache` that is not the lesson: the preallocated arrays, which
# row an index names, whether new positions fit, reading a row back, emptying rows, and a
# readable `repr`. `PagedKVCacheBase` is the same for `PagedKVCache`: which sequences exist,
# whether the free blocks cover an append (counting the copies that copy-on-write will make),
# sequence bookkeeping and the memory report. `check_multihead_inputs` checks a
# `MultiHeadAttention` call, including, with either cache, that the new keys fit before anything
# is written, so that a refused call leaves the cache exactly as it was.

# %%
#| export
class KVCacheBase:
    """The provided part of a KV cache: its preallocated arrays, one length per row, the checks of rows
    and room, reading a row back (`get_sequence`) and emptying rows (`reset`)."""

    def __init__(self, max_batch_size: int, max_seq_length: int, num_heads: int, head_dim: int):
        self.max_batch_size = check_int(max_batch_size, "max_batch_size", 1)
        self.max_seq_length = check_int(max_seq_length, "max_seq_length", 1)
        self.num_heads = check_int(num_heads, "num_heads", 1)
        self.head_dim = check_int(head_dim, "head_dim", 1)
        shape = (self.max_batch_size, self.num_heads, self.max_seq_length, self.head_dim)
        self.cached_keys = np.zeros(shape, dtype=np.float32)    # (B, Hkv, S_max, hd)
        self.cached_values = np.zeros(shape, dtype=np.float32)  # (B, Hkv, S_max, hd)
        self.cache_lengths = np.zeros(self.max_batch_size, dtype=np.int64)

    @property
    def is_active(self) -> bool:
        """True while any row holds a position."""
        return bool(self.cache_lengths.any())

    def get_sequence(self, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The cached (keys, values) of one row, (Hkv, length, hd) each, as views (no copies)."""
        b = self._check_row(batch_idx)
        end = int(self.cache_lengths[b])
        return Tensor(self.cached_keys[b, :, :end]), Tensor(self.cached_values[b, :, :end])

    def reset(self, batch_idx: int | None = None) -> None:
        """Empty one row, or every row when `batch_idx` is None: length 0, keys and values zeroed."""
        rows = slice(None) if batch_idx is None else self._check_row(batch_idx)
        self.cached_keys[rows] = 0.0
        self.cached_values[rows] = 0.0
        self.cache_lengths[rows] = 0

    def check_append(self, batch: int, num_heads: int, new_len: int, head_dim: int) -> int:
        """Raise unless (batch, num_heads, new_len, head_dim) keys fit rows 0..batch-1; returns the
        longest row's length after appending them."""
        if (num_heads, head_dim) != (self.num_heads, self.head_dim):
            raise ValueError(f"kv_cache has num_heads={self.num_heads}, head_dim={self.head_dim} but the keys have "
                             f"num_heads={num_heads}, head_dim={head_dim}")
        if batch > self.max_batch_size:
            raise ValueError(f"batch of {batch} rows does not fit kv_cache.max_batch_size={self.max_batch_size}")
        for b in range(batch):
            self._check_room(b, new_len)
        return int(self.cache_lengths[:batch].max()) + new_len if batch else new_len

    def _check_row(self, batch_idx) -> int:
        if isinstance(batch_idx, (bool, np.bool_)) or not isinstance(batch_idx, (int, np.integer)):
            raise TypeError(f"batch_idx must be an integer, got {type(batch_idx).__name__} {batch_idx!r}")
        if not 0 <= batch_idx < self.max_batch_size:
            raise IndexError(f"batch_idx {batch_idx} is out of range for max_batch_size={self.max_batch_size}")
        return int(batch_idx)

    def _check_room(self, b: int, new_len: int) -> None:
        held = int(self.cache_lengths[b])
        if held + new_len > self.max_seq_length:
            raise ValueError(f"cache row {b} holds {held} of max_seq_length={self.max_seq_length} positions; "
                             f"appending {new_len} would need {held + new_len}")

    def __repr__(self):
        return (f"KVCache(max_batch_size={self.max_batch_size}, max_seq_length={self.max_seq_length}, "
                f"num_heads={self.num_heads}, head_dim={self.head_dim}, lengths={self.cache_lengths.tolist()})")



class PagedKVCacheBase:
    """The provided part of a paged KV cache: its pool and bookkeeping, sequence and room checks,
    creating sequences, naming the batch rows, and the memory report.

    The cache holds key_blocks and value_blocks (num_blocks, num_heads, block_size, head_dim),
    free_blocks (a list of block ids), ref_counts (num_blocks,), block_tables and lengths (dicts
    keyed by sequence id), finished (the ids already freed), batch (the sequences of the batch
    rows) and next_sequence_id.
    """

    def __init__(self, num_blocks: int, block_size: int, num_heads: int, head_dim: int):
        self.num_blocks = check_int(num_blocks, "num_blocks", 1)
        self.block_size = check_int(block_size, "block_size", 1)
        self.num_heads = check_int(num_heads, "num_heads", 1)
        self.head_dim = check_int(head_dim, "head_dim", 1)
        shape = (self.num_blocks, self.num_heads, self.block_size, self.head_dim)
        self.key_blocks = np.zeros(shape, dtype=np.float32)        # (N, Hkv, block_size, hd)
        self.value_blocks = np.zeros(shape, dtype=np.float32)      # (N, Hkv, block_size, hd)
        self.free_blocks = list(range(self.num_blocks))            # taken from the front, returned to the end
        self.ref_counts = np.zeros(self.num_blocks, dtype=np.int64)  # how many block tables hold each block
        self.block_tables: dict[int, list[int]] = {}               # sequence id -> its block ids, in order
        self.lengths: dict[int, int] = {}                          # sequence id -> the tokens it holds
        self.finished: set[int] = set()                            # sequences already freed
        self.batch: list[int] = []                                 # the sequences of batch rows 0..B-1
        self.next_sequence_id = 0


    @property
    def max_tokens(self) -> int:
        """The most tokens the whole pool can hold: num_blocks * block_size."""
        return self.num_blocks * self.block_size

    def add_sequence(self) -> int:
        """A new, empty sequence (no blocks yet); returns its id."""
        sequence_id = self.next_sequence_id
        self.next_sequence_id += 1
        self.block_tables[sequence_id] = []
        self.lengths[sequence_id] = 0
        return sequence_id

    def set_batch(self, sequence_ids):
        """Name the sequences of batch rows 0..B-1 for the next `append` (a MultiHeadAttention call). Returns self."""
        if isinstance(sequence_ids, (int, np.integer)) or not hasattr(sequence_ids, "__iter__"):
            raise TypeError(f"sequence_ids must be a list of sequence ids, got {type(sequence_ids).__name__} "
                            f"{sequence_ids!r}")
        ids = [self._check_sequence(sequence_id) for sequence_id in sequence_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"sequence_ids must name each sequence once, got {ids}")
        self.batch = ids
        return self

    def _check_sequence(self, sequence_id) -> int:
        if isinstance(sequence_id, (bool, np.bool_)) or not isinstance(sequence_id, (int, np.integer)):
            raise TypeError(f"sequence_id must be an integer, got {type(sequence_id).__name__} {sequence_id!r}")
        sequence_id = int(sequence_id)
        if sequence_id in self.finished:
            raise ValueError(f"sequence {sequence_id} was already freed; live sequences: {sorted(self.lengths)}")
        if sequence_id not in self.lengths:
            raise ValueError(f"sequence {sequence_id} is not in the cache; live sequences: {sorted(self.lengths)}")
        return sequence_id

    def _check_new_tokens(self, new_keys, new_values):
        """(num_heads, new_len, head_dim) keys and values as float32 arrays."""
        keys, values = as_float32(new_keys, "new_keys"), as_float32(new_values, "new_values")
        if keys.ndim != 3 or keys.shape[0] != self.num_heads or keys.shape[2] != self.head_dim:
            raise ValueError(f"new_keys has shape {keys.shape}, expected (num_heads={self.num_heads}, "
                             f"new_len, head_dim={self.head_dim})")
        if values.shape != keys.shape:
            raise ValueError(f"new_values has shape {values.shape} but new_keys has shape {keys.shape}")
        return keys, values

    def _check_room(self, sequence_ids, new_len: int) -> None:
        """Raise unless appending `new_len` tokens to each of `sequence_ids` fits the pool now and ever.

        The blocks needed are the new blocks (ceil of the lengths after, less ceil of before) and,
        for a shared, partly filled last block, the copies that copy-on-write makes: one per
        appending holder, except that the last holder left writes in place.
        """
        new_blocks, appenders = 0, {}
        for sequence_id in sequence_ids:
            held = self.lengths[sequence_id]
            if held + new_len > self.max_tokens:
                raise ValueError(f"sequence {sequence_id} holds {held} tokens; appending {new_len} would need "
                                 f"{held + new_len}, more than the pool can ever hold: num_blocks={self.num_blocks}"
                                 f" x block_size={self.block_size} = {self.max_tokens} tokens")
            new_blocks += -(-(held + new_len) // self.block_size) - -(-held // self.block_size)
            if new_len and held % self.block_size and self.block_tables[sequence_id]:
                last = self.block_tables[sequence_id][-1]
                appenders[last] = appenders.get(last, 0) + 1
        copies = sum(min(count, int(self.ref_counts[block]) - 1) for block, count in appenders.items())
        if new_blocks + copies > len(self.free_blocks):
            who = f"sequence {sequence_ids[0]}" if len(sequence_ids) == 1 else f"sequences {list(sequence_ids)}"
            raise ValueError(f"out of blocks: appending {new_len} tokens to {who} needs {new_blocks} new blocks and "
                             f"{copies} copies of shared blocks, but only {len(self.free_blocks)} of "
                             f"num_blocks={self.num_blocks} are free")

    def check_append(self, batch: int, num_heads: int, new_len: int, head_dim: int) -> int:
        """Raise unless (batch, num_heads, new_len, head_dim) keys fit the sequences named by `set_batch`;
        returns the longest of those sequences' lengths after appending them."""
        if (num_heads, head_dim) != (self.num_heads, self.head_dim):
            raise ValueError(f"kv_cache has num_heads={self.num_heads}, head_dim={self.head_dim} but the keys have "
                             f"num_heads={num_heads}, head_dim={head_dim}")
        if batch != len(self.batch):
            raise ValueError(f"a batch of {batch} rows needs {batch} sequences, but set_batch named "
                             f"{len(self.batch)}: {self.batch}; call cache.set_batch(sequence_ids) first")
        for sequence_id in self.batch:
            self._check_sequence(sequence_id)
        self._check_room(self.batch, new_len)
        return max((self.lengths[sequence_id] for sequence_id in self.batch), default=0) + new_len

    def get_memory_usage(self) -> dict:
        """The pool's memory (MB means MiB) and how much of the memory in use holds real tokens.

        A block in use holds as many tokens as the longest of the sequences that use it fills;
        shared blocks count once.
        """
        filled = {}
        for sequence_id, table in self.block_tables.items():
            for index, block in enumerate(table):
                tokens = min(self.block_size, self.lengths[sequence_id] - index * self.block_size)
                filled[block] = max(filled.get(block, 0), tokens)
        bytes_per_block = self.key_blocks[0].nbytes + self.value_blocks[0].nbytes if self.num_blocks else 0
        used = self.num_blocks - len(self.free_blocks)
        tokens_stored = sum(filled.values())
        return {
            "total_mb": (self.key_blocks.nbytes + self.value_blocks.nbytes) / 2**20,
            "bytes_per_block": bytes_per_block,
            "bytes_per_token": bytes_per_block // self.block_size,
            "blocks_used": used,
            "blocks_free": len(self.free_blocks),
            "used_mb": used * bytes_per_block / 2**20,
            "tokens_stored": tokens_stored,
            "tokens_in_sequences": int(sum(self.lengths.values())),
            "last_block_waste": used * self.block_size - tokens_stored,
            "utilization": tokens_stored / (used * self.block_size) if used else 0.0,
        }

    def __repr__(self):
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, free={len(self.free_blocks)}, block_tables={self.block_tables})")


def check_multihead_inputs(layer, query, key, value, mask, kv_cache, return_attention_weights: bool):
    """A MultiHeadAttention's checked (x_q, x_k, x_v) float32 arrays, and its mask as one that broadcasts
    over the heads; with a kv_cache, also that the new keys fit, before anything is appended."""
    if return_attention_weights and layer.attention.block_size is not None:
        raise ValueError(f"return_attention_weights=True needs the full weight matrix, which "
                         f"block_size={layer.attention.block_size} never forms")
    x_q = as_float32(query, "query")
    x_k = x_q if key is None else as_float32(key, "key")
    x_v = x_k if value is None else as_float32(value, "value")
    for name, x in (("query", x_q), ("key", x_k), ("value", x_v)):
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape (batch, seq, embed_dim={layer.embed_dim}), got shape {x.shape}")
        if x.shape[-1] != layer.embed_dim:
            raise ValueError(f"{name} has embed_dim={x.shape[-1]} but the layer expects {layer.embed_dim}")
    if not x_q.shape[0] == x_k.shape[0] == x_v.shape[0]:
        raise ValueError(f"batch sizes differ: query {x_q.shape[0]}, key {x_k.shape[0]}, value {x_v.shape[0]}")
    if x_k.shape[1] != x_v.shape[1]:
        raise ValueError(f"value has seq_k={x_v.shape[1]} but key has seq_k={x_k.shape[1]}")
    batch, seq_q, seq_k = x_q.shape[0], x_q.shape[1], x_k.shape[1]
    if kv_cache is None:
        return x_q, x_k, x_v, mask_over_heads(mask, batch, layer.num_heads, seq_q, seq_k)
    if not isinstance(kv_cache, (KVCacheBase, PagedKVCacheBase)):
        raise TypeError(f"kv_cache must be a KVCache or a PagedKVCache, got {type(kv_cache).__name__}")
    seq_k = kv_cache.check_append(batch, layer.num_kv_heads, seq_k, layer.head_dim)   # keys after appending
    if seq_q != x_k.shape[1]:
        raise ValueError(f"with a kv_cache, query and key must hold the same new positions: "
                         f"query has {seq_q}, key has {x_k.shape[1]}")
    if mask is not None:                      # combined with the cache's boolean mask by the layer
        mask = as_keep_mask(mask_over_heads(mask, batch, layer.num_heads, seq_q, seq_k),
                            (batch, layer.num_heads, seq_q, seq_k))
    return x_q, x_k, x_v, mask

# %% [markdown]
# ## 7. The profiler's sweeps
#
# `AttentionProfiler` in the lesson measures one call (`measure_time`, `peak_memory`) and fits an
# exponent (`fit_exponent`). `ProfilerSweeps` runs those measurements over a range of sequence
# lengths on random inputs, with BLAS held at one thread for the whole sweep, so that no size
# switches thread counts halfway through.

# %%
#| export
class ProfilerSweeps:
    """Sweeps of a profiler with measure_time(fn), peak_memory(fn), fit_exponent(sizes, costs) and seed."""

    blas_threads = 1  # BLAS threads during a sweep: fixed, so that no size switches thread counts

    def time_call(self, function) -> float:
        """Median seconds of `function()`."""
        return self.measure_time(function)["median_ms"] / 1e3

    def _workload(self, attention_layer, seq_len, batch_size, num_heads, head_dim, causal):
        """A call of `attention_layer` on random inputs of length `seq_len`, and its number of heads."""
        from tinytorch.core.attention import create_causal_mask      # the student's, imported when a sweep runs

        rng = np.random.default_rng(self.seed)
        mask = create_causal_mask(seq_len) if causal else None
        if hasattr(attention_layer, "embed_dim"):                       # a MultiHeadAttention
            x = rng.standard_normal((batch_size, seq_len, attention_layer.embed_dim), dtype=np.float32)
            return (lambda: attention_layer(x, mask=mask)), attention_layer.num_heads
        if hasattr(attention_layer, "temperature"):                     # a ScaledDotProductAttention
            q, k, v = (rng.standard_normal((batch_size, num_heads, seq_len, head_dim), dtype=np.float32)
                       for _ in range(3))
            return (lambda: attention_layer(q, k, v, mask=mask)), num_heads
        raise TypeError(f"attention_layer must be a MultiHeadAttention or ScaledDotProductAttention, "
                        f"got {type(attention_layer).__name__}")

    min_sample_seconds = 0.05  # a sample shorter than a few scheduler time slices escapes the preemption longer ones suffer

    @classmethod
    def _calls_per_sample(cls, call) -> int:
        """How many calls of `call` make one timed sample last at least `min_sample_seconds`."""
        start = time.perf_counter()
        call()
        return max(1, math.ceil(cls.min_sample_seconds / max(time.perf_counter() - start, 1e-6)))

    def measure_attention_scaling(self, attention_layer, seq_lengths, *, batch_size: int = 1, num_heads: int = 8,
                                  head_dim: int = 64, causal: bool = False) -> list[dict]:
        """Time and peak memory of one forward at each sequence length, with BLAS held at one thread.

        Args:
            attention_layer: a MultiHeadAttention (inputs (B, T, E)) or a ScaledDotProductAttention
                (inputs (B, num_heads, T, head_dim)).
            seq_lengths: the lengths T to measure.
            batch_size, num_heads, head_dim: the inputs' sizes (keyword only); a MultiHeadAttention
                uses its own heads and width.
            causal: pass create_causal_mask(T).
        Returns:
            One dict per length: seq_len, time_ms (median per call; each timed sample repeats the
            call for at least `min_sample_seconds`, so that every length sees the same share of a
            busy machine), time_spread_ms, peak_memory_mb (all measured), weights_mb_estimate
            (B * H * T * T float32 numbers, computed) and blas_threads.
        """
        batch_size = check_int(batch_size, "batch_size", 1)
        results = []
        with single_threaded_blas():
            for seq_len in seq_lengths:
                seq_len = check_int(seq_len, "seq_len", 1)
                call, heads = self._workload(attention_layer, seq_len, batch_size, num_heads, head_dim, causal)
                calls = self._calls_per_sample(call)
                timing = self.measure_time(lambda: [call() for _ in range(calls)])
                results.append({
                    "seq_len": seq_len,
                    "time_ms": timing["median_ms"] / calls,
                    "time_spread_ms": timing["spread_ms"] / calls,
                    "peak_memory_mb": self.peak_memory(call) / 2**20,
                    "weights_mb_estimate": batch_size * heads * seq_len * seq_len * 4 / 2**20,
                    "blas_threads": self.blas_threads,
                })
        return results

    @classmethod
    def analyze_quadratic_scaling(cls, results: list[dict]) -> dict:
        """Fitted exponents p of time ~ T^p and memory ~ T^p over the rows of `measure_attention_scaling`."""
        if len(results) < 2:
            raise ValueError(f"fitting an exponent needs at least 2 sequence lengths, got {len(results)}")
        lengths = [row["seq_len"] for row in results]
        return {
            "time_exponent": cls.fit_exponent(lengths, [row["time_ms"] for row in results]),
            "memory_exponent": cls.fit_exponent(lengths, [max(row["peak_memory_mb"], 1e-9) for row in results]),
            "seq_lengths": lengths,
        }

# %% [markdown]
# ## 8. The serving measurements' input checks
#
# `simulate_serving` replays a workload of requests against a KV-cache budget, and
# `kv_cache_capacity` works out how much cache fits on an accelerator. Their arguments are checked
# here, so that the lesson's cells hold only the ideas.

# %%
#| export
def check_serving_inputs(requests, budget_tokens, max_seq_length, block_size):
    """Checked (requests (N, 3) int64, budget_tokens, max_seq_length, block_size or None) of a serving simulation.

    Each request is (arrival step, prompt length, output length): arrivals >= 0 and in order,
    prompts and outputs >= 1, prompt + output <= max_seq_length. The budget must hold one
    request of max_seq_length, as one region or as whole blocks.
    """
    max_seq_length = check_int(max_seq_length, "max_seq_length", 1)
    budget_tokens = check_int(budget_tokens, "budget_tokens", 1)
    if block_size is not None:
        block_size = check_int(block_size, "block_size", 1)
    array = numeric_array(requests, "requests")
    if array.size == 0:
        array = array.reshape(0, 3)
    if array.ndim != 2 or array.shape[1] != 3 or array.dtype.kind not in "iu":
        raise TypeError(f"requests must be an (N, 3) array of integers (arrival, prompt, output), "
                        f"got {array.dtype} of shape {array.shape}")
    array = array.astype(np.int64)
    arrivals, prompts, outputs = array.T
    if (arrivals < 0).any() or (np.diff(arrivals) < 0).any():
        raise ValueError(f"arrival steps must be >= 0 and in order, got {arrivals.tolist()[:10]}")
    if (prompts < 1).any() or (outputs < 1).any():
        raise ValueError(f"prompt and output lengths must be >= 1, got prompts {prompts.tolist()[:10]} and "
                         f"outputs {outputs.tolist()[:10]}")
    if (prompts + outputs > max_seq_length).any():
        longest = int((prompts + outputs).max())
        raise ValueError(f"a request of {longest} tokens (prompt + output) exceeds max_seq_length={max_seq_length}")
    room = budget_tokens if block_size is None else budget_tokens // block_size * block_size
    needed = max_seq_length if block_size is None else -(-max_seq_length // block_size) * block_size
    if room < needed:
        raise ValueError(f"budget_tokens={budget_tokens} cannot hold one request of max_seq_length={max_seq_length}"
                         + ("" if block_size is None else f" in blocks of {block_size}") + f": it needs {needed}")
    return array, budget_tokens, max_seq_length, block_size


def check_capacity_inputs(memory_bytes, num_parameters, num_layers, num_kv_heads, head_dim, bytes_per_number,
                          batch_size, context_length):
    """The checked integers of a KV-cache capacity computation (context_length may be None)."""
    checked = [check_int(value, name, minimum) for value, name, minimum in (
        (memory_bytes, "memory_bytes", 0), (num_parameters, "num_parameters", 0), (num_layers, "num_layers", 1),
        (num_kv_heads, "num_kv_heads", 1), (head_dim, "head_dim", 1), (bytes_per_number, "bytes_per_number", 1),
        (batch_size, "batch_size", 1))]
    context_length = None if context_length is None else check_int(context_length, "context_length", 1)
    return (*checked, context_length)

# ## 9. The public boundary: every entry point checks its inputs once
#
# A student's function works on plain float32 arrays and holds no checks. `@checked`, on a
# function or a class, makes its public entry points: a call from outside the module checks and
# converts the arguments once, with the checks registered below under the function's name, runs
# the student's code on the result, and gives back `Tensor`s. A call from inside another checked
# call (the multi-head layer calling `split_heads`, a cache's `append` calling `update`) goes
# straight to the student's code with its arrays, and gets arrays back: nothing is checked twice.
#
# A check receives the call's arguments by name, after defaults, and replaces them with their
# checked form.

# %%
#| export
import contextlib
import functools
import inspect
import tracemalloc
from dataclasses import dataclass


class CausalKeep(np.ndarray):
    """A boolean causal mask that knows its offset: what a `CausalMask` becomes at the boundary.

    Only the array made at the boundary carries the offset; a slice or a result computed from it
    is an ordinary boolean array (its `offset` is None), since it need not be causal any more.
    """

    offset = None

    def __array_finalize__(self, obj):
        self.offset = None


def keep_mask(mask, scores_shape: tuple, name: str = "mask"):
    """`as_keep_mask`, except that a CausalMask covering the scores' last two axes keeps its offset."""
    keep = as_keep_mask(mask, scores_shape, name)
    offset = causal_offset(mask, *scores_shape[-2:]) if len(scores_shape) >= 2 else None
    if offset is not None:
        keep = keep.view(CausalKeep)
        keep.offset = offset
    return keep


@dataclass(frozen=True)
class EntryPoint:
    check: object                      # (arguments: dict) -> None
    publish: object = None             # (result, arguments) -> what the caller gets; default: Tensors
    checks_nested: bool = True         # False: the code calls back into public functions, which check themselves
    around: object = None              # (arguments: dict) -> a context manager the student's code runs in


ENTRY_POINTS: dict[str, EntryPoint] = {}


def entry_point(name: str, publish=None, checks_nested: bool = True, around=None):
    """Register the check of the student function or method called `name` ("Class.method")."""
    def register(check):
        ENTRY_POINTS[name] = EntryPoint(check, publish, checks_nested, around)
        return check
    return register


def as_tensors(result, arguments=None):
    """Arrays as float32-preserving Tensors; tuples item by item; anything else as it is."""
    if isinstance(result, tuple):
        return tuple(as_tensors(item) for item in result)
    return Tensor(result) if isinstance(result, np.ndarray) else result


def checked(target):
    """Make a student's function, or the methods of a student's class, public entry points."""
    if isinstance(target, type):
        for name, entry in ENTRY_POINTS.items():
            owner, _, method = name.partition(".")
            if owner == target.__name__ and method in vars(target):
                raw = vars(target)[method]
                if isinstance(raw, staticmethod):
                    setattr(target, method, staticmethod(_entry(raw.__func__, entry)))
                else:
                    setattr(target, method, _entry(raw, entry))
        return target
    return _entry(target, ENTRY_POINTS[target.__qualname__])


def checked_method(function, name: str):
    """`function` as the public entry point registered under `name` ("Class.method" or a function's name)."""
    return _entry(function, ENTRY_POINTS[name])


def _entry(function, entry: EntryPoint):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def call(*args, **kwargs):
        __tracebackhide__ = True                       # IPython and pytest show the student's frame, not this one
        if _inputs_checked.get():
            return function(*args, **kwargs)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{function.__qualname__}(): {error}") from None
        bound.apply_defaults()
        entry.check(bound.arguments)
        with contextlib.ExitStack() as stack:
            if entry.around is not None:
                stack.enter_context(entry.around(bound.arguments))
            if entry.checks_nested:
                stack.enter_context(inputs_checked())
            result = function(*bound.args, **bound.kwargs)
        return (entry.publish or as_tensors)(result, bound.arguments)

    call.student_function = function
    return call


# ---------------------------------------------------------------- masks and the softmax
@entry_point("create_causal_mask", publish=lambda mask, a: CausalMask(mask, a["key_len"] - a["seq_len"]))
def _(a):
    a["seq_len"] = check_int(a["seq_len"], "seq_len", 0)
    a["key_len"] = a["seq_len"] if a["key_len"] is None else check_int(a["key_len"], "key_len", 0)


@entry_point("create_padding_mask")
def _(a):
    a["key_len"] = check_int(a["key_len"], "key_len", 0)
    lengths = a["lengths"]
    lengths = np.asarray(lengths.data if isinstance(lengths, Tensor) else lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be a 1-D array of integers, got {lengths.dtype} of shape {lengths.shape}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > a["key_len"]):
        raise ValueError(f"lengths must lie in 0..key_len={a['key_len']}, got {lengths.tolist()}")
    a["lengths"] = lengths


@entry_point("masked_softmax", publish=lambda weights, a: Tensor(np.asarray(weights, dtype=np.float32)))
def _(a):
    scores = as_float32(a["scores"], "scores", finite=False)
    if scores.ndim < 1:
        raise ValueError(f"scores must have at least 1 axis, got shape {scores.shape}")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError("scores hold NaN or +inf; a softmax needs finite scores (-inf means masked out)")
    a["scores"], a["mask"] = scores, as_keep_mask(a["mask"], scores.shape)


# ---------------------------------------------------------------- attention
def _check_attention(a):
    mask = a["mask"]
    a["query"], a["key"], a["value"], _, a["scale"] = check_attention_inputs(a["query"], a["key"], a["value"], None,
                                                                             a["scale"])
    lead = np.broadcast_shapes(a["query"].shape[:-2], a["key"].shape[:-2], a["value"].shape[:-2])
    a["mask"] = keep_mask(mask, lead + (a["query"].shape[-2], a["key"].shape[-2]))


entry_point("math_attention")(_check_attention)


@entry_point("blocked_attention")
def _(a):
    _check_attention(a)
    a["block_size"] = check_int(a["block_size"], "block_size", 1)


# ---------------------------------------------------------------- heads
@entry_point("split_heads")
def _(a):
    x, a["num_heads"] = as_float32(a["x"], "x"), check_int(a["num_heads"], "num_heads", 1)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, seq, features), got shape {x.shape}")
    if x.shape[-1] % a["num_heads"]:
        raise ValueError(f"features={x.shape[-1]} is not divisible by num_heads={a['num_heads']}")
    a["x"] = x


@entry_point("merge_heads")
def _(a):
    a["x"] = as_float32(a["x"], "x")
    if a["x"].ndim != 4:
        raise ValueError(f"x must have shape (batch, heads, seq, head_dim), got shape {a['x'].shape}")


@entry_point("repeat_kv_heads")
def _(a):
    x, a["num_heads"] = as_float32(a["x"], "x"), check_int(a["num_heads"], "num_heads", 1)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (batch, kv_heads, seq, head_dim), got shape {x.shape}")
    if x.shape[1] == 0 or a["num_heads"] % x.shape[1]:
        raise ValueError(f"num_heads={a['num_heads']} is not a multiple of the {x.shape[1]} key/value heads")
    a["x"] = x


# ---------------------------------------------------------------- the attention layer
def check_layer_options(dropout, temperature, block_size):
    """An attention layer's checked (dropout, temperature, block_size)."""
    dropout = check_probability(dropout, "dropout")
    if not (is_number(temperature) and temperature > 0 and FLOAT32_TINY <= 1.0 / temperature <= FLOAT32_MAX):
        raise ValueError(f"temperature must be a positive number within float32's range, got {temperature!r}")
    if block_size is not None:
        block_size = check_int(block_size, "block_size", 1)
        if dropout > 0:
            raise ValueError(f"dropout={dropout} needs the full weight matrix, which block_size={block_size} "
                             "never forms; use one or the other")
    return dropout, float(temperature), block_size


@entry_point("ScaledDotProductAttention.__init__")
def _(a):
    a["dropout"], a["temperature"], a["block_size"] = check_layer_options(a["dropout"], a["temperature"],
                                                                          a["block_size"])


@entry_point("ScaledDotProductAttention.forward")
def _(a):
    if a["return_attention_weights"] and a["self"].block_size is not None:
        raise ValueError(f"return_attention_weights=True needs the full weight matrix, which "
                         f"block_size={a['self'].block_size} never forms")
    mask = a["mask"]
    a["query"], a["key"], a["value"], _, _ = check_attention_inputs(a["query"], a["key"], a["value"])
    lead = np.broadcast_shapes(a["query"].shape[:-2], a["key"].shape[:-2], a["value"].shape[:-2])
    a["mask"] = keep_mask(mask, lead + (a["query"].shape[-2], a["key"].shape[-2]))


# ---------------------------------------------------------------- the multi-head layer
@entry_point("MultiHeadAttention.__init__")
def _(a):
    a["embed_dim"], a["num_heads"] = check_int(a["embed_dim"], "embed_dim", 1), check_int(a["num_heads"], "num_heads", 1)
    if a["embed_dim"] % a["num_heads"]:
        raise ValueError(f"embed_dim={a['embed_dim']} is not divisible by num_heads={a['num_heads']}")
    kv_heads = a["num_heads"] if a["num_kv_heads"] is None else check_int(a["num_kv_heads"], "num_kv_heads", 1)
    if a["num_heads"] % kv_heads:
        raise ValueError(f"num_heads={a['num_heads']} is not divisible by num_kv_heads={kv_heads}")
    a["num_kv_heads"] = kv_heads
    a["dropout"], _, a["block_size"] = check_layer_options(a["dropout"], 1.0, a["block_size"])


@entry_point("MultiHeadAttention.forward",
             publish=lambda result, a: as_tensors(tuple(np.asarray(r, dtype=np.float32) for r in result)
                                                  if isinstance(result, tuple) else np.asarray(result, np.float32)))
def _(a):
    layer, wants_weights = a["self"], a["return_attention_weights"]
    x_q, x_k, x_v, mask = check_multihead_inputs(layer, a["query"], a["key"], a["value"], a["mask"], a["kv_cache"],
                                                 wants_weights)
    if isinstance(mask, CausalMask):
        mask = keep_mask(mask, (x_q.shape[1], x_k.shape[1]))
    a["query"], a["key"], a["value"], a["mask"] = x_q, x_k, x_v, mask


def _layer_memory(counts_and_cache, a) -> dict:
    """The student's parameter counts and cache bytes per token, with the totals and the names module 14 reads."""
    layer, counts = a["self"], counts_and_cache["parameter_counts"]
    total = sum(counts.values())
    megabytes = total * np.dtype(np.float32).itemsize / 2**20
    return {
        "parameter_count": total, "parameter_counts": counts, "parameter_mb": megabytes,
        "parameters_per_head": total / layer.num_heads, "parameter_mb_per_head": megabytes / layer.num_heads,
        "kv_cache_bytes_per_token": counts_and_cache["kv_cache_bytes_per_token"],
        "kv_cache_saving": layer.num_heads / layer.num_kv_heads,
        "total_parameters": total, "total_parameter_memory_mb": megabytes,
        "memory_per_head_mb": megabytes / layer.num_heads, "num_heads": layer.num_heads, "head_dim": layer.head_dim,
    }


entry_point("MultiHeadAttention.get_memory_usage", publish=_layer_memory)(lambda a: None)


# ---------------------------------------------------------------- the KV cache
@entry_point("KVCache.update")
def _(a):
    cache = a["self"]
    a["batch_idx"] = b = cache._check_row(a["batch_idx"])
    keys, values = as_float32(a["new_keys"], "new_keys"), as_float32(a["new_values"], "new_values")
    if keys.ndim != 3 or keys.shape[0] != cache.num_heads or keys.shape[2] != cache.head_dim:
        raise ValueError(f"new_keys has shape {keys.shape}, expected (num_heads={cache.num_heads}, "
                         f"new_len, head_dim={cache.head_dim})")
    if values.shape != keys.shape:
        raise ValueError(f"new_values has shape {values.shape} but new_keys has shape {keys.shape}")
    cache._check_room(b, keys.shape[1])
    a["new_keys"], a["new_values"] = keys, values


def _check_cache_append(a):
    """Either cache's `append(new_keys, new_values)`: one (B, Hkv, T, hd) shape, and room for all of it."""
    keys, values = as_float32(a["new_keys"], "new_keys"), as_float32(a["new_values"], "new_values")
    if keys.ndim != 4 or values.shape != keys.shape:
        raise ValueError(f"new_keys and new_values must have one shape (batch, num_heads, new_len, head_dim), "
                         f"got {keys.shape} and {values.shape}")
    a["self"].check_append(*keys.shape)
    a["new_keys"], a["new_values"] = keys, values


entry_point("KVCache.append", publish=lambda result, a: result)(_check_cache_append)


def _cache_memory(figures, a) -> dict:
    """The student's bytes and fill, with the per-sequence figures and the names module 14 reads."""
    cache, megabytes = a["self"], figures["total_bytes"] / 2**20
    return {
        "total_mb": megabytes, "mb_per_sequence": megabytes / cache.max_batch_size,
        "bytes_per_token": figures["bytes_per_token"], "tokens_cached": int(cache.cache_lengths.sum()),
        "utilization": figures["utilization"], "total_cache_memory_mb": megabytes,
        "memory_per_sequence_mb": megabytes / cache.max_batch_size, "cache_utilization": figures["utilization"],
        "max_batch_size": cache.max_batch_size, "max_seq_length": cache.max_seq_length,
        "num_heads": cache.num_heads, "head_dim": cache.head_dim,
    }


entry_point("KVCache.get_memory_usage", publish=_cache_memory)(lambda a: None)


# ---------------------------------------------------------------- the profiler
@entry_point("AttentionProfiler.__init__")
def _(a):
    a["repeats"], a["warmup"] = check_int(a["repeats"], "repeats", 1), check_int(a["warmup"], "warmup", 0)
    a["seed"] = check_int(a["seed"], "seed", 0)


def _check_callable(a):
    if not callable(a["function"]):
        raise TypeError(f"function must be callable, got {type(a['function']).__name__}")


entry_point("AttentionProfiler.measure_time", publish=lambda result, a: result, checks_nested=False)(_check_callable)


@contextmanager
def _tracing(a):
    """tracemalloc on for the call, and off after it unless it was on before."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        yield
    finally:
        if not was_tracing:
            tracemalloc.stop()


entry_point("AttentionProfiler.peak_memory", publish=lambda result, a: int(result), checks_nested=False,
            around=_tracing)(_check_callable)


@entry_point("AttentionProfiler.fit_exponent", publish=lambda slope, a: float(slope))
def _(a):
    sizes, costs = np.asarray(a["sizes"], dtype=np.float64), np.asarray(a["costs"], dtype=np.float64)
    if sizes.shape != costs.shape or sizes.ndim != 1 or sizes.size < 2:
        raise ValueError(f"fitting an exponent needs two 1-D arrays of the same length >= 2, "
                         f"got shapes {sizes.shape} and {costs.shape}")
    if not (np.all(np.isfinite(sizes)) and np.all(np.isfinite(costs)) and np.all(sizes > 0) and np.all(costs > 0)):
        raise ValueError("sizes and costs must be positive finite numbers to take their logarithms")
    if np.all(sizes == sizes[0]):
        raise ValueError(f"fitting an exponent needs at least two different sizes, got {sizes.tolist()}")
    a["sizes"], a["costs"] = sizes, costs


def _as_array(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(x.data)


def _generation_report(loops, a) -> dict:
    """The student's measured loops, summarised: medians per token, the speed-up, and how closely the ways agree."""
    cached_ms, recompute_ms = loops["cached_ms"], loops["recompute_ms"]
    return {
        "prompt_length": a["prompt_length"], "new_tokens": a["new_tokens"], "prefill_ms": loops["prefill_ms"],
        "cached_token_ms": cached_ms, "recompute_token_ms": recompute_ms,
        "cached_ms_per_token": float(np.median(cached_ms)), "recompute_ms_per_token": float(np.median(recompute_ms)),
        "speedup": float(np.sum(recompute_ms) / np.sum(cached_ms)),
        "max_abs_difference": float(np.max(np.abs(np.concatenate([_as_array(o) for o in loops["cached_out"]], axis=1)
                                                  - np.concatenate([_as_array(o) for o in loops["recompute_out"]],
                                                                   axis=1)))),
        "blas_threads": a["self"].blas_threads,
    }


@entry_point("AttentionProfiler.compare_generation", publish=_generation_report, checks_nested=False,
             around=lambda a: single_threaded_blas())
def _(a):
    layer = a["attention_layer"]
    if "MultiHeadAttention" not in [cls.__name__ for cls in type(layer).__mro__]:
        raise TypeError(f"attention_layer must be a MultiHeadAttention, got {type(layer).__name__}")
    for name, minimum in (("prompt_length", 1), ("new_tokens", 1), ("batch_size", 1)):
        a[name] = check_int(a[name], name, minimum)



# ---------------------------------------------------------------- the paged cache and serving
@entry_point("PagedKVCache.append_tokens")
def _(a):
    cache = a["self"]
    a["sequence_id"] = cache._check_sequence(a["sequence_id"])
    a["new_keys"], a["new_values"] = cache._check_new_tokens(a["new_keys"], a["new_values"])
    cache._check_room([a["sequence_id"]], a["new_keys"].shape[1])


def _check_known_sequence(a):
    a["sequence_id"] = a["self"]._check_sequence(a["sequence_id"])


entry_point("PagedKVCache.get_sequence")(_check_known_sequence)
entry_point("PagedKVCache.fork")(_check_known_sequence)


def _finished(result, a):
    a["self"].finished.add(a["sequence_id"])        # a freed sequence is known, so that a second free is refused


entry_point("PagedKVCache.free", publish=_finished)(_check_known_sequence)


entry_point("PagedKVCache.append", publish=lambda result, a: result)(_check_cache_append)


@entry_point("simulate_serving", publish=lambda result, a: result)
def _(a):
    a["requests"], a["budget_tokens"], a["max_seq_length"], a["block_size"] = check_serving_inputs(
        a["requests"], a["budget_tokens"], a["max_seq_length"], a["block_size"])


@entry_point("kv_cache_capacity", publish=lambda result, a: result)
def _(a):
    names = ("memory_bytes", "num_parameters", "num_layers", "num_kv_heads", "head_dim", "bytes_per_number",
             "batch_size", "context_length")
    for name, value in zip(names, check_capacity_inputs(*(a[name] for name in names))):
        a[name] = value

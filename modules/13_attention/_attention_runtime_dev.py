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
# 4. **The thread policy**: how many threads the tuned kernels use, chosen in one place.
# 5. **The tuned kernels**: tiled, threaded attention (`fast_attention`) and the parallel driver
#    of blocked attention.
#
# `tinytorch/core/_attention_runtime.py` is generated from this file; `tinytorch.core.attention`
# re-exports the public names.

# %%
#| default_exp core._attention_runtime

# %%
#| export
import math
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from tinytorch.core.tensor import Tensor

# %% [markdown]
# ## 1. Input checks
#
# Each public function of module 13 accepts a `Tensor`, a NumPy array or nested lists, and
# works on float32 arrays. Non-finite numbers follow one rule everywhere: an array argument
# holding NaN or inf raises a `ValueError` that names it. The only exception is the score input
# of `masked_softmax`, where −inf is the documented way to say "masked out".
#
# A layer checks what its caller gave it once. Inside `with inputs_checked():` the functions it
# calls on arrays derived from those inputs skip the scan for NaN and inf, which would otherwise
# read a whole KV cache again at every decoding step; they still check shapes and types.
#
# The scan of an attention's query, key and value measures their norms on the way: an array
# holding NaN or inf has a NaN or inf norm. The tuned kernel's test for skipping the softmax's
# max-subtraction (section 5) needs exactly those norms, so `check_attention_inputs` leaves them
# with the calling thread, beside weak references to the arrays it returned. The kernel uses
# them only when it is handed those very arrays, and measures them itself otherwise. Q, K and V
# are then read once before the tiles instead of twice, about 3% of a call at B=4, H=8, T=512.

# %%
#| export
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
_inputs_checked: ContextVar = ContextVar("tinytorch_attention_inputs_checked", default=False)


@contextmanager
def inputs_checked():
    """Inside a layer whose inputs were checked: skip the NaN/inf scan of arrays derived from them."""
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


def largest_row_norm(array: np.ndarray) -> float:
    """The largest Euclidean norm of a row (along the last axis) of a float array; NaN or inf if it holds them."""
    if array.size == 0:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        return math.sqrt(np.einsum("...i,...i->...", array, array).max())


_last_scan = threading.local()      # .value: (weak references to query, key, value; their norms)


def scan_attention_inputs(q, k, v) -> None:
    """The NaN/inf check of an attention's query, key and value, which measures their norms on the way.

    The largest row norms of q and k and the norm of v are what the tuned kernel's shift-free test
    needs (section 5); this thread remembers them beside weak references to the arrays.
    """
    norms = (largest_row_norm(q), largest_row_norm(k), array_norm(v))
    for name, array, measured in zip(("query", "key", "value"), (q, k, v), norms):
        if not math.isfinite(measured) and not all_finite(array):     # inf alone may be an overflow
            raise ValueError(f"{name} holds NaN or inf; attention needs finite numbers")
    _last_scan.value = (weakref.ref(q), weakref.ref(k), weakref.ref(v), norms)


def scanned_norms(q, k, v) -> tuple | None:
    """The norms `scan_attention_inputs` measured, if this thread's last scan was of these very arrays."""
    scan = getattr(_last_scan, "value", None)
    if scan is not None and scan[0]() is q and scan[1]() is k and scan[2]() is v:
        return scan[3]
    return None


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
    """A read-only causal mask that remembers its diagonal offset: entry [i, j] is 1 where j <= i + offset."""

    def __init__(self, data, offset: int):
        super().__init__(np.array(data, dtype=np.float32))
        if self.data.ndim != 2:
            raise ValueError(f"a causal mask has shape (seq_len, key_len), got shape {self.data.shape}")
        if not np.array_equal(self.data, np.tri(*self.data.shape, k=offset, dtype=np.float32)):
            raise ValueError(f"data is not the causal mask with offset {offset}: entry [i, j] must be 1 "
                             f"exactly where j <= i + {offset}")
        self.data.flags.writeable = False  # kernels trust the offset, so the data may not change
        self.offset = int(offset)


def causal_offset(mask, seq_q: int, seq_k: int) -> int | None:
    """The offset of a CausalMask that covers the (seq_q, seq_k) scores exactly; None for any other mask.

    A causal mask that only broadcasts to the scores (a (1, 1) mask is all ones) is an ordinary
    mask: its offset says nothing about which keys the scores may skip.
    """
    if isinstance(mask, CausalMask) and mask.shape == (seq_q, seq_k):
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
    if _inputs_checked.get():
        _last_scan.value = None
    else:
        scan_attention_inputs(q, k, v)
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
_chosen_backend = DEFAULT_BACKEND
_backend_in_block: ContextVar = ContextVar("tinytorch_attention_backend", default=None)


def _check_backend(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return name


def get_attention_backend() -> str:
    """The kernel that attention layers use here: "math" or "fast"."""
    return _backend_in_block.get() or _chosen_backend


def set_attention_backend(name: str) -> None:
    """Choose the kernel of every attention layer: "math" (the student's, the default) or "fast" (tuned)."""
    global _chosen_backend
    _chosen_backend = _check_backend(name)


@contextmanager
def attention_backend(name: str):
    """Use the named kernel inside a `with` block; other threads keep theirs."""
    token = _backend_in_block.set(_check_backend(name))
    try:
        yield
    finally:
        _backend_in_block.reset(token)

# %% [markdown]
# ## 4. The thread policy
#
# Threads are chosen here and nowhere else:
#
# - The tuned kernels split their work into tiles. `parallel_map` runs them on the **calling
#   thread plus `cores() - 1` pool threads**, which take tiles from one shared queue. The caller
#   always works, so a call never waits for a pool thread to be scheduled: on a loaded machine,
#   or when another caller is using the pool, the caller simply does more of the tiles itself.
#   NumPy releases Python's global interpreter lock inside BLAS and `exp`, so the tiles really
#   run in parallel.
# - While the tiles run, BLAS is held at one thread, so that BLAS threads and tile threads do
#   not fight over the same cores (two tiles each asking OpenBLAS for two threads would also
#   queue on OpenBLAS's lock for its multithreaded level-3 calls).
# - **Why the limit is process-wide during the call.** NumPy's OpenBLAS is the pthreads build,
#   whose thread count is one global variable: `openblas_set_num_threads` sets it, and so does
#   `openblas_set_num_threads_local`, which is per-thread only in OpenMP builds (checked on
#   this machine: calling it from one thread changes what every thread reads). No call can
#   give one thread one BLAS thread and leave the others alone. So `single_threaded_blas` sets
#   the limit when the first caller (in any thread) enters and restores the previous value
#   when the last one leaves; after a call nothing is changed. While a call runs, other code in
#   the same process that multiplies matrices sees one BLAS thread, for the few milliseconds
#   the call lasts. (Code that sets its own limit in another thread during a call has it
#   overwritten when the call ends: set limits from the thread that calls the layers.)
# - Work too small to share (`PARALLEL_MIN_SCORES`) runs on the caller alone, with BLAS as the
#   caller left it.

# %%
#| export
_blas_controller = None
_blas_lock = threading.Lock()
_blas_single_users = 0
_blas_limiter = None


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _blas():
    """The threadpoolctl controller of the BLAS library NumPy uses (found once, on first use)."""
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController
        _blas_controller = ThreadpoolController()
    return _blas_controller


@contextmanager
def single_threaded_blas():
    """BLAS on one thread while any caller, in any thread, needs it: the first in limits, the last out restores."""
    global _blas_single_users, _blas_limiter
    with _blas_lock:
        if _blas_single_users == 0:
            _blas_limiter = _blas().limit(limits=1, user_api="blas")
        _blas_single_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_single_users -= 1
            if _blas_single_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads: start its own pool and locks when needed."""
    global _pool, _pool_lock, _blas_lock, _blas_single_users, _blas_limiter
    _pool, _pool_lock, _blas_lock, _blas_single_users, _blas_limiter = None, threading.Lock(), threading.Lock(), 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def parallel_map(function, tasks) -> None:
    """Run function(*task) for every task on the calling thread and up to cores() - 1 pool threads.

    Every task runs even when one fails; the first failure is raised after all have stopped.
    """
    global _pool
    queue, errors = list(tasks)[::-1], []              # pop() from the end takes tasks in order
    helpers = min(cores(), len(queue)) - 1
    if helpers <= 0:
        for task in queue[::-1]:
            function(*task)
        return
    lock = threading.Lock()

    def take_tasks():
        while True:
            with lock:
                if not queue:
                    return
                task = queue.pop()
            try:
                function(*task)
            except BaseException as error:                # noqa: B036 - re-raised by the caller
                errors.append(error)

    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, cores() - 1), thread_name_prefix="tinytorch-attention")
        pool = _pool
    with single_threaded_blas():
        futures = [pool.submit(take_tasks) for _ in range(helpers)]
        take_tasks()                                     # the caller works too, never idle waiting
        for future in futures:
            future.cancel()                              # a helper that has not started is not needed
        wait(futures)                                    # every task has stopped writing
    if errors:
        raise errors[0]

# %% [markdown]
# ## 5. The tuned kernel
#
# `fast_attention` computes exactly what `math_attention` computes, and changes only how:
#
# - It works on **tiles**: one batch-and-head at a time, a block of up to 512 query rows at a
#   time, and no more rows than keep a tile within `TILE_SCORES` scores (4 MiB) while it has at
#   least one. At S = 512 a tile's scores (1 MiB) stay in the core's cache while they are
#   exponentiated in place (`out=`), summed and multiplied by V.
# - Each thread keeps its tiles' scores in **scratch memory it reuses from call to call**. Fresh
#   memory costs a page fault for every 4 KiB the first time it is written: at B=4, H=8,
#   T=S=512 that was about 1,300 faults, a tenth of the call. Arrays above `SCRATCH_KEPT`
#   floats are not kept, so a thread holds at most a few tiles' worth between calls.
# - It usually skips the softmax's max-subtraction. Every score is at most |q_i|·|k_j| in size
#   (Cauchy–Schwarz), so when the largest query norm times the largest key norm is small enough
#   (`SHIFT_FREE_BOUND`), the exponentials can neither overflow nor fall below float32's normal
#   range, and exp(s) / Σ exp(s) is the same softmax as exp(s − max) / Σ exp(s − max). That saves
#   two of the four passes over the scores. The output before it is normalised must not
#   overflow either, so V's norm is bounded too; larger inputs take the max-subtracting path.
# - On that path it computes the scores **in base 2**: it scales Q (r·d multiplies, not r·S) by
#   the score scale times log2(e), so that 2^score₂ = e^score, because NumPy's `exp2` is about
#   twice as fast as its `exp` in float32. `exp2` is slow on -inf and wherever it underflows, so
#   masked scores are zeroed *after* it, and the max-subtracting path uses `exp`.
# - It sums each row with a matrix-vector product (BLAS) instead of `sum(axis=-1)`, which is
#   about three times slower on rows this long.
# - It normalises *after* multiplying by V: scaling the (T, d_v) output by the inverse row sums
#   is S / d_v times cheaper than dividing the (T, S) weights.
# - It runs the tiles with `parallel_map`, on every core.
# - With a `CausalMask` it reads the offset and skips every key block that lies wholly in the
#   future. Its tiles are then smaller (32 rows) but span every head at once (a group of heads
#   when S is so long that all of them would exceed `TILE_SCORES`), so that one batched call
#   replaces many small ones, and only the block on the diagonal is masked.
# - For so few rows OpenBLAS is slow on Q·Kᵀ, which must read K transposed, and fast on its
#   transpose, Sᵀ = K·Qᵀ: K is used as stored, and only the tile's rows of Q are transposed, in
#   the same pass that scales them. The softmax then reads Sᵀ through a transposed view. Causal
#   tiles do this, and so do plain ones when S is so long that a tile holds fewer than 512 rows.
# - A boolean mask that *is* causal (what `KVCache.append` returns for a prefill) is recognised
#   and takes the same path; a mask that hides nothing (a decoding step's) is dropped.

# %%
#| export
TILE_SCORES = 1 << 20            # scores per tile at most: 4 MiB of float32 (measured faster than 1 MiB at S = 4096)
QUERY_ROWS = 512                 # at most this many query rows per tile (all 512 at S = 512: measured fastest)
CAUSAL_QUERY_ROWS = 32           # smaller tiles skip more of a causal mask's future
PARALLEL_MIN_SCORES = 1 << 18    # below ~260k scores per call, thread hand-offs cost more than they save
SCRATCH_KEPT = 2 * TILE_SCORES  # a thread keeps scratch arrays of up to 8 MiB each between calls
SHIFT_FREE_BOUND = 86.0          # base-2 scores within +-86: 2^86 ~ 8e25 is far from overflow, 2^-86 ~ 1e-26 is normal
LOG2_E = math.log2(math.e)       # e^x = 2^(x log2 e)

_scratch_memory = threading.local()


def _scratch(name: str, shape: tuple) -> np.ndarray:
    """A float32 array of `shape` for `name` that this thread reuses from call to call.

    An array larger than SCRATCH_KEPT floats is allocated afresh and not kept, so that a thread
    never holds more than a few tiles' worth of memory between calls.
    """
    size = math.prod(shape)
    if size > SCRATCH_KEPT:
        return np.empty(shape, dtype=np.float32)
    buffers = _scratch_memory.__dict__
    if name not in buffers or buffers[name].size < size:
        buffers[name] = np.empty(size, dtype=np.float32)
    return buffers[name][:size].reshape(shape)


def _attend_tile(q, k, v, hidden, output, weights, q_scale: float, shift_free: bool, keys_first: bool) -> None:
    """Softmax attention for one tile, written into `output` (and `weights`) in place.

    q (..., r, d), k (..., s, d), v (..., s, dv); the scores are (q * q_scale) @ kᵀ. hidden
    (..., r, w), True = masked, covers the last w keys (all of them for a general mask, the
    diagonal block for a causal one). shift_free: the scores are in base 2 (the score times
    log2 e) and lie within +-SHIFT_FREE_BOUND, so the row maxima need not be subtracted;
    otherwise they are the scores themselves. keys_first: form Sᵀ = k (q q_scale)ᵀ instead, which
    is faster for a few query rows; the steps after it read Sᵀ through a transposed view.
    """
    lead = output.shape[:-2]
    (r, d), s = q.shape[-2:], k.shape[-2]
    if keys_first:
        q_t = np.multiply(np.swapaxes(q, -1, -2), np.float32(q_scale), out=_scratch("query", lead + (d, r)))
        scores = np.swapaxes(np.matmul(k, q_t, out=_scratch("scores", lead + (s, r))), -1, -2)   # (..., r, s)
    else:
        if q_scale != 1.0:
            q = np.multiply(q, np.float32(q_scale), out=_scratch("query", lead + (r, d)))
        scores = np.matmul(q, np.swapaxes(k, -1, -2), out=_scratch("scores", lead + (r, s)))     # (..., r, s)
    masked = None if hidden is None else scores[..., s - hidden.shape[-1]:]
    if shift_free:
        np.exp2(scores, out=scores)                              # 2^(score log2 e) = e^score
        if hidden is not None:
            np.copyto(masked, 0.0, where=hidden)                 # after exp2, which is slow on -inf
    else:
        if hidden is not None:
            np.copyto(masked, -np.inf, where=hidden)
        row_max = scores.max(axis=-1, keepdims=True)             # (..., r, 1)
        if hidden is not None:
            np.copyto(row_max, 0.0, where=np.isneginf(row_max))  # fully masked rows
        np.subtract(scores, row_max, out=scores)
        np.exp(scores, out=scores)                               # exp2 would be slow where it underflows
    totals = scores @ np.ones((s, 1), dtype=np.float32)          # (..., r, 1) row sums
    if hidden is not None:
        np.copyto(totals, 1.0, where=totals == 0.0)              # fully masked rows stay 0
    np.matmul(scores, v, out=output)                             # (..., r, dv)
    inverse = np.divide(1.0, totals, dtype=np.float32)
    np.multiply(output, inverse, out=output)
    if weights is not None:
        np.multiply(scores, inverse, out=weights)


def _shift_free(q, k, v, scale: float) -> bool:
    """Whether the max-subtraction may be skipped, so that the exponentials are 2^(base-2 score).

    Every base-2 score, scale * log2(e) * q_i . k_j, must lie within +-SHIFT_FREE_BOUND: the
    largest query norm times the largest key norm bounds them (Cauchy-Schwarz). And the output
    before it is normalised, at most S * 2^SHIFT_FREE_BOUND * max|v|, must stay within float32:
    the norm of all of v bounds max|v|. The input check measured these norms when it scanned
    q, k and v for NaN (section 1); other arrays are measured here.
    """
    if scale * LOG2_E > FLOAT32_MAX:                                      # the base-2 scale itself overflows
        return False
    q_norm, k_norm, v_norm = scanned_norms(q, k, v) or (largest_row_norm(q), largest_row_norm(k), array_norm(v))
    return (q_norm * k_norm * scale * LOG2_E <= SHIFT_FREE_BOUND          # an inf norm gives False
            and k.shape[-2] * 2.0 ** SHIFT_FREE_BOUND * v_norm <= FLOAT32_MAX)


def _simplify_mask(keep, T: int, S: int):
    """(keep, offset): None for a mask that hides nothing; an offset for a boolean causal mask."""
    if keep is None:
        return None, None
    if keep.all():
        return None, None
    if T > 1 and keep.shape[-2:] == (T, S) and np.array_equal(keep, np.broadcast_to(
            np.tri(T, S, k=S - T, dtype=bool), keep.shape)):
        return None, S - T
    return keep, None


def _causal_tile(r0: int, r1: int, S: int, offset: int):
    """Keys [0, seen) that query rows r0..r1-1 may see, and the future among keys [first, seen), or None."""
    seen = min(S, max(0, r1 + offset))            # what the tile's last row sees
    first = min(S, max(0, r0 + 1 + offset))       # what its first row sees
    if first == seen:
        return seen, None                         # every row sees all `seen` keys
    return seen, np.arange(first, seen)[None, :] > (np.arange(r0, r1)[:, None] + offset)   # (r, seen - first)


def _causal_tasks(q, k, v, offset, output, weights, score_scale, shift_free) -> list:
    """Tiles of a causal attention: a block of rows across the heads, over the keys it may see.

    Keys past a tile's horizon are never touched. A tile spans every head, so that one batched
    call does the work of many small ones, unless that would hold more than TILE_SCORES scores
    (long sequences): then it spans a group of heads.
    """
    T, S = q.shape[-2], k.shape[-2]
    heads = math.prod(output.shape[:-2])
    group = max(1, TILE_SCORES // (CAUSAL_QUERY_ROWS * S))
    head_groups = [Ellipsis]
    if group < heads:                                            # heads on one axis, taken a group at a time
        q, k, v, output = (x.reshape((heads,) + x.shape[-2:]) for x in (q, k, v, output))
        weights = None if weights is None else weights.reshape((heads, T, S))
        head_groups = [slice(h, h + group) for h in range(0, heads, group)]
    tasks = []
    for r0 in range(0, T, CAUSAL_QUERY_ROWS):
        r1 = min(r0 + CAUSAL_QUERY_ROWS, T)
        seen, triangle = _causal_tile(r0, r1, S, offset)
        if seen == 0:                                            # every row of the tile is masked
            output[..., r0:r1, :] = 0.0
            continue
        for g in head_groups:
            tasks.append((q[g, r0:r1, :], k[g, :seen, :], v[g, :seen, :], triangle, output[g, r0:r1, :],
                          None if weights is None else weights[g, r0:r1, :seen], score_scale, shift_free, True))
    return tasks[::-1]                                           # largest first: the threads finish together


def _row_tasks(q, k, v, hidden, output, weights, score_scale, shift_free) -> list:
    """Tiles of a general attention: one head and a block of query rows each, within TILE_SCORES scores.

    When S is so long that a tile holds fewer than QUERY_ROWS rows, it forms Sᵀ = K·Qᵀ (faster for few rows).
    """
    lead, T, S = output.shape[:-2], q.shape[-2], k.shape[-2]
    rows = max(1, min(QUERY_ROWS, TILE_SCORES // max(S, 1)))
    tasks = []
    for r0 in range(0, T, rows):
        r1 = min(r0 + rows, T)
        for index in np.ndindex(*lead):
            tasks.append((q[index][r0:r1], k[index], v[index], None if hidden is None else hidden[index][r0:r1],
                          output[index][r0:r1], None if weights is None else weights[index][r0:r1], score_scale,
                          shift_free, rows < QUERY_ROWS))
    return tasks


def tuned_attention(q, k, v, keep, scale: float, offset: int | None, need_weights: bool):
    """The tiled, threaded kernel on checked arrays; returns (output, weights or None) arrays.

    keep is the boolean mask (or None); offset is a CausalMask's offset when it covers the
    scores exactly, which lets the kernel skip the future instead of reading `keep`. A boolean
    `keep` that is causal is treated as such, and one that hides nothing as no mask.
    """
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    if offset is None:
        keep, offset = _simplify_mask(keep, T, S)
    empty = S == 0 or T == 0 or math.prod(lead) == 0
    output = (np.zeros if empty else np.empty)(lead + (T, dv), dtype=np.float32)   # the tiles write every row
    weights = np.zeros(lead + (T, S), dtype=np.float32) if need_weights else None
    if empty:
        return output, weights                                   # nothing to attend to: zeros
    small = math.prod(lead) * T * S < PARALLEL_MIN_SCORES
    shift_free = not small and _shift_free(q, k, v, scale)       # small calls: the check would cost more
    score_scale = scale * LOG2_E if shift_free else scale       # base-2 scores where exp2 is safe
    q, k, v = (np.broadcast_to(x, lead + x.shape[-2:]) for x in (q, k, v))
    hidden = None if keep is None or offset is not None else np.broadcast_to(~keep, lead + (T, S))
    if small:                                                    # one vectorised call
        if offset is not None:
            hidden = ~np.tri(T, S, k=offset, dtype=bool)         # (T, S), True = future
        _attend_tile(q, k, v, hidden, output, weights, score_scale, shift_free, False)
    elif offset is not None:
        parallel_map(_attend_tile, _causal_tasks(q, k, v, offset, output, weights, score_scale, shift_free))
    else:
        parallel_map(_attend_tile, _row_tasks(q, k, v, hidden, output, weights, score_scale, shift_free))
    return output, weights


def fast_attention(query, key, value, mask=None, scale=None, need_weights: bool = True):
    """`math_attention`'s result from the tiled, threaded kernel.

    Args:
        query, key, value, mask, scale: as for `math_attention`; a CausalMask's future is skipped.
        need_weights: also form and return the (..., T, S) weights.
    Returns:
        (output (..., T, d_v), weights (..., T, S) or None) as float32 Tensors.
    """
    q, k, v, keep, scale = check_attention_inputs(query, key, value, mask, scale)
    offset = causal_offset(mask, q.shape[-2], k.shape[-2])
    output, weights = tuned_attention(q, k, v, keep, scale, offset, need_weights)
    return Tensor(output), None if weights is None else Tensor(weights)

# %% [markdown]
# ## 6. Blocked attention on every core
#
# Query blocks are independent: block i needs only its own rows of Q and of the mask, and all of
# K and V. So the layer (`ScaledDotProductAttention(block_size=...)`) hands one query block at a
# time to each core, each running the student's `blocked_attention`. A causal mask travels with
# its rows: rows r0..r1 of a mask with offset o form a causal mask with offset o + r0.

# %%
#| export
def parallel_blocked_attention(blocked_attention, q, k, v, keep, offset: int | None, scale: float,
                               block_size: int) -> np.ndarray:
    """`blocked_attention` on checked arrays, one block of query rows per task; returns the output.

    keep is the checked boolean mask (or None); offset is a CausalMask's offset when it covers
    the scores exactly, and then replaces `keep`. The blocks skip the NaN/inf scan of the arrays
    the caller has checked.
    """
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S, dv = q.shape[-2], k.shape[-2], v.shape[-1]

    def rows_mask(r0, r1):
        if offset is not None:                                           # (r, S), offset shifted
            return CausalMask(np.tri(r1 - r0, S, k=offset + r0, dtype=np.float32), offset + r0)
        if keep is None or keep.ndim < 2 or keep.shape[-2] == 1:
            return keep                                                  # the same for every row
        return keep[..., r0:r1, :]

    def rows(r0, r1):
        with inputs_checked():                  # a context variable: each pool thread enters its own
            return blocked_attention(q[..., r0:r1, :], k, v, rows_mask(r0, r1), scale, block_size).data

    if T <= block_size or cores() == 1:
        return rows(0, T)
    output = np.empty(lead + (T, dv), dtype=np.float32)

    def run(r0, r1):
        output[..., r0:r1, :] = rows(r0, r1)

    blocks = [(r0, min(r0 + block_size, T)) for r0 in range(0, T, block_size)]
    parallel_map(run, blocks[::-1])                                      # largest causal blocks first
    return output

# %% [markdown]
# ## 7. The layers' input checks
#
# `KVCacheChecks` is the part of `KVCache` that is not the lesson: which row an index names,
# whether new positions fit, and a readable `repr`. `PagedKVCacheChecks` is the same for
# `PagedKVCache`: which sequences exist, whether the free blocks cover an append (counting the
# copies that copy-on-write will make), sequence bookkeeping and the memory report.
# `check_multihead_inputs` checks a `MultiHeadAttention` call, including, with either cache, that
# the new keys fit before anything is written, so that a refused call leaves the cache exactly as
# it was.

# %%
#| export
class KVCacheChecks:
    """Row and room checks of a KV cache with cached_keys, cache_lengths, max_batch_size, max_seq_length,
    num_heads and head_dim."""

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



class PagedKVCacheChecks:
    """Sequence and room checks, sequence bookkeeping and the memory report of a paged KV cache.

    The cache holds key_blocks and value_blocks (num_blocks, num_heads, block_size, head_dim),
    free_blocks (a list of block ids), ref_counts (num_blocks,), block_tables and lengths (dicts
    keyed by sequence id), finished (the ids already freed), batch (the sequences of the batch
    rows) and next_sequence_id.
    """

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
    if not isinstance(kv_cache, (KVCacheChecks, PagedKVCacheChecks)):
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
# ## 8. The profiler's sweeps
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
        rng = np.random.default_rng(self.seed)
        mask = CausalMask(np.tri(seq_len, dtype=np.float32), 0) if causal else None
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
# ## 9. The serving measurements' input checks
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

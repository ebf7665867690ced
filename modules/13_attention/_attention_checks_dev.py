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
# # Module 13, provided: the input checks and the public boundary
#
# > What every public name of module 13 checks before the student's code runs. Provided complete.
#
# `attention_dev.py` is the lesson: students write every idea of attention there, on plain
# float32 arrays, with no checks. This file holds the checks and the boundary that runs them:
#
# 1. **Input checks**: every public function converts its inputs to float32 arrays and rejects
#    bad ones with a message that names the argument, what was expected and what was given.
# 2. **Masks**: `CausalMask`, the causal mask that remembers its offset, and the conversion of any
#    user mask to one boolean "may attend" array.
# 3. **The layers' and the serving measurements' input checks.**
# 4. **The public boundary**: `@checked`, and each public name's checks, a named function
#    registered under that name.
#
# Beside it: `_attention_bases_dev.py` (what the student's classes extend),
# `_attention_backend_dev.py` (the switch between the student's attention core and the tuned
# kernel) and `_attention_kernel_dev.py` (the kernel). None of them imports the student's module.
# `tinytorch/core/_attention_checks.py` is generated from this file.

# %%
#| default_exp core._attention_checks

# %%
#| export
import contextlib
import functools
import inspect
import math
import tracemalloc
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

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
# Every entry point checks what its caller gave it once (section 4). Inside
# `with inputs_checked():`, the block a checked call runs the student's code in, the module's own
# functions take their arrays as given: nothing derived from checked inputs is scanned for NaN and
# inf again, which would otherwise read a whole KV cache at every decoding step.

# %%
#| export
FLOAT32_TINY, FLOAT32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
_inputs_checked: ContextVar = ContextVar("tinytorch_attention_inputs_checked", default=False)


@contextmanager
def flag_set(flag: ContextVar):
    """`flag` is True inside the block, in this thread and context only, and as it was afterwards."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def inputs_checked():
    """Inside a checked call: the module's functions take their arrays as given, checked once already."""
    return flag_set(_inputs_checked)



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
# diagonal offset. At the boundary it becomes a `CausalKeep`, the boolean array the student's code
# receives, which keeps the offset: the tuned kernel and the blocked loop read it and skip the
# keys that lie wholly in the future instead of computing their scores and throwing them away.
# Those are the only two mask types; every other mask is a plain boolean array.

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


class CausalKeep(np.ndarray):
    """A boolean causal mask that knows its offset: what a `CausalMask` becomes at the boundary.

    Only the array made at the boundary carries the offset; a slice or a result computed from it
    is an ordinary boolean array (its `offset` is None), since it need not be causal any more.
    """

    offset = None

    def __array_finalize__(self, obj):
        self.offset = None


def causal_offset(mask, seq_q: int, seq_k: int) -> int | None:
    """The offset of a CausalMask that covers the (seq_q, seq_k) scores exactly; None for any other mask.

    A causal mask that only broadcasts to the scores (a (1, 1) mask is all ones) is an ordinary
    mask: its offset says nothing about which keys the scores may skip.
    """
    if isinstance(mask, (CausalMask, CausalKeep)) and mask.offset is not None and mask.shape == (seq_q, seq_k):
        return mask.offset
    return None


def keep_mask(mask, scores_shape: tuple, name: str = "mask"):
    """`as_keep_mask`, except that a CausalMask covering the scores' last two axes keeps its offset."""
    keep = as_keep_mask(mask, scores_shape, name)
    offset = causal_offset(mask, *scores_shape[-2:]) if len(scores_shape) >= 2 else None
    if offset is not None:
        keep = keep.view(CausalKeep)
        keep.offset = offset
    return keep


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
# ## 3. The layers' and the serving measurements' input checks
#
# `check_multihead_inputs` checks a `MultiHeadAttention` call, including, with either cache, that
# the new keys fit before anything is written, so that a refused call leaves the cache exactly as
# it was. `simulate_serving` replays a workload of requests against a KV-cache budget, and
# `kv_cache_capacity` works out how much cache fits on an accelerator. Their arguments are checked
# here, so that the lesson's cells hold only the ideas.

# %%
#| export
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
    if not callable(getattr(kv_cache, "check_append", None)):            # KVCacheBase and PagedKVCacheBase
        raise TypeError(f"kv_cache must be a KVCache or a PagedKVCache, got {type(kv_cache).__name__}")
    seq_k = kv_cache.check_append(batch, layer.num_kv_heads, seq_k, layer.head_dim)   # keys after appending
    if seq_q != x_k.shape[1]:
        raise ValueError(f"with a kv_cache, query and key must hold the same new positions: "
                         f"query has {seq_q}, key has {x_k.shape[1]}")
    if mask is not None:                      # combined with the cache's boolean mask by the layer
        mask = as_keep_mask(mask_over_heads(mask, batch, layer.num_heads, seq_q, seq_k),
                            (batch, layer.num_heads, seq_q, seq_k))
    return x_q, x_k, x_v, mask


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

# %% [markdown]
# ## 4. The public boundary: every entry point checks its inputs once
#
# A student's function works on plain float32 arrays and holds no checks. `@checked`, on a
# function or a class, makes its public entry points. A call from outside the module runs the
# checks registered under the function's name ("math_attention", "KVCache.update") once, runs the
# student's code on the checked arguments, and hands back the result by one rule (`returned`).
# A call from inside another checked call (the multi-head layer calling `split_heads`, a cache's
# `append` calling `update`) goes straight to the student's code with its arrays: nothing is
# checked twice.
#
# Each public name's checks are one named function, registered under that name just above it:
# search for the name to find them. A check receives the call's arguments by name, after
# defaults, and replaces them with their checked form; it returns nothing. A name registered for
# a class that has no such method is an error when the class is made.

# %%
#| export
@dataclass(frozen=True)
class EntryPoint:
    """How one public name is checked, and what its caller gets back."""

    check: object                      # (arguments: dict) -> None; raises on bad input
    complete: object = None            # (result, arguments) -> the result with what the boundary adds
    tensors: bool = True               # False: the result comes back as the student's code made it
    checks_nested: bool = True         # False: the code calls back into public functions, which check themselves
    around: object = None              # (arguments: dict) -> a context manager the student's code runs in


ENTRY_POINTS: dict[str, EntryPoint] = {}
APPLIED: set[str] = set()              # the names `checked` has made public


def entry_point(name: str, complete=None, tensors: bool = True, checks_nested: bool = True, around=None):
    """Register `check`, a named function, as the checks of the student function or method `name`."""
    def register(check):
        for part in (check, complete, around):
            if part is not None and part.__name__ in ("_", "<lambda>"):
                raise ValueError(f"the checks of {name} need a function with a name, got {part.__name__}")
        if name in ENTRY_POINTS:
            raise ValueError(f"{name} has checks already: {ENTRY_POINTS[name].check.__name__}")
        ENTRY_POINTS[name] = EntryPoint(check, complete, tensors, checks_nested, around)
        return check
    return register


def as_tensors(result):
    """Arrays as Tensors (float arrays as float32), tuples item by item, anything else as it is."""
    if isinstance(result, tuple):
        return tuple(as_tensors(item) for item in result)
    return Tensor(result) if isinstance(result, np.ndarray) else result


def returned(entry: EntryPoint, result, arguments: dict):
    """What a caller outside gets back: the result, completed by the entry point's `complete` if it has
    one, with its arrays as Tensors unless the entry point says `tensors=False`."""
    if entry.complete is not None:
        result = entry.complete(result, arguments)
    return as_tensors(result) if entry.tensors else result


def inside_checked_call() -> bool:
    """True inside a checked call, where the module's functions take their arrays as given."""
    return _inputs_checked.get()


def checked(target):
    """Make a student's function, or the registered methods of a student's class, public entry points."""
    if not isinstance(target, type):
        if target.__qualname__ not in ENTRY_POINTS:
            raise ValueError(f"no checks are registered for {target.__qualname__}")
        APPLIED.add(target.__qualname__)
        return _entry(target, ENTRY_POINTS[target.__qualname__])
    for name, entry in ENTRY_POINTS.items():
        owner, _, method = name.partition(".")
        if owner != target.__name__:
            continue
        if method not in vars(target):
            raise ValueError(f"checks are registered for {name}, but {target.__name__} has no method {method}")
        raw = vars(target)[method]
        if isinstance(raw, staticmethod):
            setattr(target, method, staticmethod(_entry(raw.__func__, entry)))
        else:
            setattr(target, method, _entry(raw, entry))
        APPLIED.add(name)
    return target


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
        return returned(entry, result, bound.arguments)

    call.student_function = function
    return call

# %% [markdown]
# ### The checks of each public name

# %%
#| export
def check_nothing(arguments) -> None:
    """A method whose only argument is the object itself: nothing to check."""


# ---------------------------------------------------------------- masks and the softmax
def complete_causal_mask(mask, arguments) -> CausalMask:
    """The student's causal mask as a CausalMask that remembers its offset."""
    return CausalMask(mask, arguments["key_len"] - arguments["seq_len"])


@entry_point("create_causal_mask", complete=complete_causal_mask)
def check_create_causal_mask(a):
    a["seq_len"] = check_int(a["seq_len"], "seq_len", 0)
    a["key_len"] = a["seq_len"] if a["key_len"] is None else check_int(a["key_len"], "key_len", 0)


@entry_point("create_padding_mask")
def check_create_padding_mask(a):
    a["key_len"] = check_int(a["key_len"], "key_len", 0)
    lengths = a["lengths"]
    lengths = np.asarray(lengths.data if isinstance(lengths, Tensor) else lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths must be a 1-D array of integers, got {lengths.dtype} of shape {lengths.shape}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > a["key_len"]):
        raise ValueError(f"lengths must lie in 0..key_len={a['key_len']}, got {lengths.tolist()}")
    a["lengths"] = lengths


@entry_point("masked_softmax")
def check_masked_softmax(a):
    scores = as_float32(a["scores"], "scores", finite=False)
    if scores.ndim < 1:
        raise ValueError(f"scores must have at least 1 axis, got shape {scores.shape}")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError("scores hold NaN or +inf; a softmax needs finite scores (-inf means masked out)")
    a["scores"], a["mask"] = scores, as_keep_mask(a["mask"], scores.shape)


# ---------------------------------------------------------------- attention
def check_qkv_and_mask(a):
    """query, key and value as checked float32 arrays, and the mask as a boolean one over their scores."""
    mask = a["mask"]
    a["query"], a["key"], a["value"], _, scale = check_attention_inputs(a["query"], a["key"], a["value"], None,
                                                                        a.get("scale"))
    if "scale" in a:
        a["scale"] = scale
    lead = np.broadcast_shapes(a["query"].shape[:-2], a["key"].shape[:-2], a["value"].shape[:-2])
    a["mask"] = keep_mask(mask, lead + (a["query"].shape[-2], a["key"].shape[-2]))


entry_point("math_attention")(check_qkv_and_mask)


@entry_point("blocked_attention")
def check_blocked_attention(a):
    check_qkv_and_mask(a)
    a["block_size"] = check_int(a["block_size"], "block_size", 1)
    a["return_logsumexp"] = check_flag(a["return_logsumexp"], "return_logsumexp")


# ---------------------------------------------------------------- the backward pass (Part 11)
# The forward's checks, plus the shapes of the gradient and of what the forward saved. Callers get each
# gradient in the shape of its input: where a leading axis was broadcast (one key shared by every head),
# the gradient is summed over it.
def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def sum_to_shape(gradient: np.ndarray, shape: tuple) -> np.ndarray:
    """`gradient` summed over the axes along which an input of `shape` was broadcast."""
    extra = gradient.ndim - len(shape)
    gradient = gradient.sum(axis=tuple(range(extra))) if extra else gradient
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and gradient.shape[axis] != 1)
    return gradient.sum(axis=stretched, keepdims=True) if stretched else gradient


def saved_array(a, name: str, shape: tuple, minus_inf_allowed: bool = False) -> np.ndarray:
    """The gradient or a saved array of the forward, float32, in the forward's shape."""
    array = as_float32(a[name], name, finite=not minus_inf_allowed)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, the forward's, got {array.shape}")
    if minus_inf_allowed and (np.isnan(array).any() or np.isposinf(array).any()):
        raise ValueError(f"{name} holds NaN or +inf; only -inf, for a row that sees no key, is allowed")
    return array


def check_backward_inputs(a) -> tuple:
    """The forward's inputs and d_output; returns the forward's (leading shape, T, S, d_v)."""
    check_qkv_and_mask(a)
    q, k, v = a["query"], a["key"], a["value"]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    a["d_output"] = saved_array(a, "d_output", lead + (q.shape[-2], v.shape[-1]))
    return lead, q.shape[-2], k.shape[-2], v.shape[-1]


def complete_gradients(gradients, a) -> tuple:
    """Each gradient summed back to the shape of its input."""
    return tuple(sum_to_shape(np.asarray(gradient, dtype=np.float32), a[name].shape)
                 for gradient, name in zip(gradients, ("query", "key", "value")))


@entry_point("attention_backward", complete=complete_gradients)
def check_attention_backward(a):
    lead, T, S, _ = check_backward_inputs(a)
    a["weights"] = saved_array(a, "weights", lead + (T, S))


@entry_point("blocked_attention_backward", complete=complete_gradients)
def check_blocked_attention_backward(a):
    lead, T, _, d_v = check_backward_inputs(a)
    a["output"] = saved_array(a, "output", lead + (T, d_v))
    a["logsumexp"] = saved_array(a, "logsumexp", lead + (T,), minus_inf_allowed=True)
    a["block_size"] = check_int(a["block_size"], "block_size", 1)


@entry_point("repeat_kv_heads_backward")
def check_repeat_kv_heads_backward(a):
    d_x, a["num_kv_heads"] = as_float32(a["d_x"], "d_x"), check_int(a["num_kv_heads"], "num_kv_heads", 1)
    if d_x.ndim != 4:
        raise ValueError(f"d_x must have shape (batch, heads, seq, head_dim), got shape {d_x.shape}")
    if d_x.shape[1] % a["num_kv_heads"]:
        raise ValueError(f"the {d_x.shape[1]} query heads of d_x are not a multiple of num_kv_heads={a['num_kv_heads']}")
    a["d_x"] = d_x


# ---------------------------------------------------------------- heads
@entry_point("split_heads")
def check_split_heads(a):
    x, a["num_heads"] = as_float32(a["x"], "x"), check_int(a["num_heads"], "num_heads", 1)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, seq, features), got shape {x.shape}")
    if x.shape[-1] % a["num_heads"]:
        raise ValueError(f"features={x.shape[-1]} is not divisible by num_heads={a['num_heads']}")
    a["x"] = x


@entry_point("merge_heads")
def check_merge_heads(a):
    a["x"] = as_float32(a["x"], "x")
    if a["x"].ndim != 4:
        raise ValueError(f"x must have shape (batch, heads, seq, head_dim), got shape {a['x'].shape}")


@entry_point("repeat_kv_heads")
def check_repeat_kv_heads(a):
    x, a["num_heads"] = as_float32(a["x"], "x"), check_int(a["num_heads"], "num_heads", 1)
    if x.ndim != 4:
        raise ValueError(f"x must have shape (batch, kv_heads, seq, head_dim), got shape {x.shape}")
    if x.shape[1] == 0 or a["num_heads"] % x.shape[1]:
        raise ValueError(f"num_heads={a['num_heads']} is not a multiple of the {x.shape[1]} key/value heads")
    a["x"] = x


# ---------------------------------------------------------------- the attention layer
@entry_point("ScaledDotProductAttention.__init__")
def check_sdpa_init(a):
    a["dropout"], a["temperature"], a["block_size"] = check_layer_options(a["dropout"], a["temperature"],
                                                                          a["block_size"])


@entry_point("ScaledDotProductAttention.forward")
def check_sdpa_forward(a):
    if a["return_attention_weights"] and a["self"].block_size is not None:
        raise ValueError(f"return_attention_weights=True needs the full weight matrix, which "
                         f"block_size={a['self'].block_size} never forms")
    check_qkv_and_mask(a)


# ---------------------------------------------------------------- the multi-head layer
@entry_point("MultiHeadAttention.__init__")
def check_multihead_init(a):
    a["embed_dim"], a["num_heads"] = check_int(a["embed_dim"], "embed_dim", 1), check_int(a["num_heads"], "num_heads", 1)
    if a["embed_dim"] % a["num_heads"]:
        raise ValueError(f"embed_dim={a['embed_dim']} is not divisible by num_heads={a['num_heads']}")
    kv_heads = a["num_heads"] if a["num_kv_heads"] is None else check_int(a["num_kv_heads"], "num_kv_heads", 1)
    if a["num_heads"] % kv_heads:
        raise ValueError(f"num_heads={a['num_heads']} is not divisible by num_kv_heads={kv_heads}")
    a["num_kv_heads"] = kv_heads
    a["dropout"], _, a["block_size"] = check_layer_options(a["dropout"], 1.0, a["block_size"])


_in_layer_forward: ContextVar = ContextVar("tinytorch_attention_in_layer_forward", default=False)


def projections_on_blas_threads(a):
    """Around a multi-head layer's forward, whose projections run on BLAS's threads just before its
    attention core: the tuned kernel then leaves its pool alone (the kernel's section 2)."""
    return flag_set(_in_layer_forward)


def after_threaded_blas() -> bool:
    """Inside a multi-head layer's forward, right after its projections ran on BLAS's threads."""
    return _in_layer_forward.get()


@entry_point("MultiHeadAttention.forward", around=projections_on_blas_threads)
def check_multihead_forward(a):
    x_q, x_k, x_v, mask = check_multihead_inputs(a["self"], a["query"], a["key"], a["value"], a["mask"],
                                                 a["kv_cache"], a["return_attention_weights"])
    if isinstance(mask, CausalMask):
        mask = keep_mask(mask, (x_q.shape[1], x_k.shape[1]))
    a["query"], a["key"], a["value"], a["mask"] = x_q, x_k, x_v, mask


def complete_layer_memory(counts_and_cache, a) -> dict:
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


entry_point("MultiHeadAttention.get_memory_usage", complete=complete_layer_memory)(check_nothing)


# ---------------------------------------------------------------- the KV cache
@entry_point("KVCache.update")
def check_kv_cache_update(a):
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


def check_cache_append(a):
    """Either cache's `append(new_keys, new_values)`: one (B, Hkv, T, hd) shape, and room for all of it."""
    keys, values = as_float32(a["new_keys"], "new_keys"), as_float32(a["new_values"], "new_values")
    if keys.ndim != 4 or values.shape != keys.shape:
        raise ValueError(f"new_keys and new_values must have one shape (batch, num_heads, new_len, head_dim), "
                         f"got {keys.shape} and {values.shape}")
    a["self"].check_append(*keys.shape)
    a["new_keys"], a["new_values"] = keys, values


entry_point("KVCache.append", tensors=False)(check_cache_append)      # arrays, as the layer reads them


def complete_cache_memory(figures, a) -> dict:
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


entry_point("KVCache.get_memory_usage", complete=complete_cache_memory)(check_nothing)


# ---------------------------------------------------------------- the profiler
@entry_point("AttentionProfiler.__init__")
def check_profiler_init(a):
    a["repeats"], a["warmup"] = check_int(a["repeats"], "repeats", 1), check_int(a["warmup"], "warmup", 0)
    a["seed"] = check_int(a["seed"], "seed", 0)


def check_callable(a):
    """A measurement's `function` argument: something to call."""
    if not callable(a["function"]):
        raise TypeError(f"function must be callable, got {type(a['function']).__name__}")


entry_point("AttentionProfiler.measure_time", tensors=False, checks_nested=False)(check_callable)


@contextmanager
def tracing(a):
    """tracemalloc on for the call, and off after it unless it was on before."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        yield
    finally:
        if not was_tracing:
            tracemalloc.stop()


def complete_peak_memory(peak, a) -> int:
    """The student's peak as a Python int of bytes."""
    return int(peak)


entry_point("AttentionProfiler.peak_memory", complete=complete_peak_memory, checks_nested=False,
            around=tracing)(check_callable)


def complete_fit_exponent(slope, a) -> float:
    """The student's slope as a Python float."""
    return float(slope)


@entry_point("AttentionProfiler.fit_exponent", complete=complete_fit_exponent)
def check_fit_exponent(a):
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


def complete_generation_report(loops, a) -> dict:
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


def blas_on_one_thread(a):
    """BLAS held at one thread while the student's loops run (the kernel's pool keeps the count)."""
    return kernel.POOL.blas_on_one_thread()


@entry_point("AttentionProfiler.compare_generation", complete=complete_generation_report, checks_nested=False,
             around=blas_on_one_thread)
def check_compare_generation(a):
    layer = a["attention_layer"]
    if "MultiHeadAttention" not in [cls.__name__ for cls in type(layer).__mro__]:
        raise TypeError(f"attention_layer must be a MultiHeadAttention, got {type(layer).__name__}")
    for name, minimum in (("prompt_length", 1), ("new_tokens", 1), ("batch_size", 1)):
        a[name] = check_int(a[name], name, minimum)


# ---------------------------------------------------------------- the paged cache and serving
@entry_point("PagedKVCache.append_tokens")
def check_paged_append_tokens(a):
    cache = a["self"]
    a["sequence_id"] = cache._check_sequence(a["sequence_id"])
    a["new_keys"], a["new_values"] = cache._check_new_tokens(a["new_keys"], a["new_values"])
    cache._check_room([a["sequence_id"]], a["new_keys"].shape[1])


def check_known_sequence(a):
    """A paged cache's `sequence_id` argument: a live sequence."""
    a["sequence_id"] = a["self"]._check_sequence(a["sequence_id"])


entry_point("PagedKVCache.get_sequence")(check_known_sequence)
entry_point("PagedKVCache.fork")(check_known_sequence)


def complete_free(result, a):
    """A freed sequence stays known, so that a second free is refused."""
    a["self"].finished.add(a["sequence_id"])


entry_point("PagedKVCache.free", complete=complete_free)(check_known_sequence)
entry_point("PagedKVCache.append", tensors=False)(check_cache_append)    # arrays, as the layer reads them


@entry_point("simulate_serving", tensors=False)
def check_simulate_serving(a):
    a["requests"], a["budget_tokens"], a["max_seq_length"], a["block_size"] = check_serving_inputs(
        a["requests"], a["budget_tokens"], a["max_seq_length"], a["block_size"])


@entry_point("kv_cache_capacity", tensors=False)
def check_kv_cache_capacity(a):
    names = ("memory_bytes", "num_parameters", "num_layers", "num_kv_heads", "head_dim", "bytes_per_number",
             "batch_size", "context_length")
    for name, value in zip(names, check_capacity_inputs(*(a[name] for name in names))):
        a[name] = value

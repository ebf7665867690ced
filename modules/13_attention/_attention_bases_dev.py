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
# # Module 13, provided: what the student's classes extend
#
# > The parts of the lesson's classes that are not the lesson. Provided complete.
#
# 1. **`Layer`**: `layer(...)` runs `layer.forward(...)`, and `train()`/`eval()`.
# 2. **`KVCacheBase` and `PagedKVCacheBase`**: the caches' arrays, bookkeeping and checks.
# 3. **`ProfilerSweeps`**: the profiler's sweeps over sequence lengths.
#
# Where this code needs a student function, the student's class hands it in (the profiler's
# `causal_mask`); nothing here imports the student's module. `tinytorch/core/_attention_bases.py`
# is generated from this file.

# %%
#| default_exp core._attention_bases

# %%
#| export
import math
import time

import numpy as np

from tinytorch.core._attention_backend import single_threaded_blas
from tinytorch.core._attention_checks import as_float32, check_int, inside_checked_call
from tinytorch.core.tensor import Tensor

# %% [markdown]
# ## 1. Layers
#
# A layer in the PyTorch style. Inside a checked call (the multi-head layer calling its inner
# attention) `layer(...)` goes straight to the student's `forward`, whose inputs were checked
# already; from outside it goes through the boundary, which checks them.

# %%
#| export
class Layer:
    """A layer in the PyTorch style: `layer(...)` is `layer.forward(...)`, and `train()`/`eval()`
    switch `training` on it and on every layer it holds as an attribute."""

    training = True

    def __call__(self, *args, **kwargs):
        forward = type(self).forward
        if inside_checked_call():                             # checked already: the student's forward itself
            forward = getattr(forward, "student_function", forward)
        return forward(self, *args, **kwargs)

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

# %% [markdown]
# ## 2. The caches' provided part
#
# `KVCacheBase` is the part of `KVCache` that is not the lesson: the preallocated arrays, which
# row an index names, whether new positions fit, reading a row back, emptying rows, and a
# readable `repr`. `PagedKVCacheBase` is the same for `PagedKVCache`: which sequences exist,
# whether the free blocks cover an append (counting the copies that copy-on-write will make),
# sequence bookkeeping and the memory report. The boundary (`_attention_checks_dev.py`) calls
# their checks before the student's methods run.

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

# %% [markdown]
# ## 3. The profiler's sweeps
#
# `AttentionProfiler` in the lesson measures one call (`measure_time`, `peak_memory`) and fits an
# exponent (`fit_exponent`). `ProfilerSweeps` runs those measurements over a range of sequence
# lengths on random inputs, with BLAS held at one thread for the whole sweep, so that no size
# switches thread counts halfway through. A causal sweep needs the student's causal mask: the
# student's class hands its `create_causal_mask` in as `causal_mask`, so nothing here computes one.

# %%
#| export
class ProfilerSweeps:
    """Sweeps of a profiler with measure_time(fn), peak_memory(fn), fit_exponent(sizes, costs) and seed."""

    blas_threads = 1  # BLAS threads during a sweep: fixed, so that no size switches thread counts
    causal_mask = None  # (seq_len) -> a causal mask: the subclass hands in the student's create_causal_mask

    def time_call(self, function) -> float:
        """Median seconds of `function()`."""
        return self.measure_time(function)["median_ms"] / 1e3

    def _workload(self, attention_layer, seq_len, batch_size, num_heads, head_dim, causal):
        """A call of `attention_layer` on random inputs of length `seq_len`, and its number of heads."""
        if causal and self.causal_mask is None:
            raise TypeError(f"a causal sweep needs {type(self).__name__}.causal_mask, a function that makes a causal "
                            f"mask (the lesson hands in create_causal_mask)")
        rng = np.random.default_rng(self.seed)
        mask = self.causal_mask(seq_len) if causal else None
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

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
# # Module 13, provided: the tuned attention kernel
#
# > The tiled, threaded attention core that runs when `set_attention_backend("fast")` switches it on.
# > Provided complete; it computes what the lesson's `math_attention` computes, and the tests hold
# > it to a float64 reference. Every layer and cache around it is the student's.
#
# Everything the kernel needs comes in as arguments: checked float32 arrays, the boolean mask or
# a causal offset, the scale, `techniques`, which says which of its techniques to use, and
# whether the caller has just run BLAS on several threads. Nothing is carried from one call to
# the next except the worker pool and its threads. `tito bench --ablation` switches each
# technique on and off, the others on, and measures what it buys.
#
# ## Design note: what each technique buys, per machine class, and what it guards against
#
# Gain: the time without the technique over the time with it, minus 1, through the layers,
# median of 9 alternating pairs of blocks of runs (`tito bench --ablation`), with the
# interquartile range of the pairs. A control runs the same techniques on both sides, and a
# gain counts only when its middle half lies beyond the control's. Two classes of one 2-core
# AMD EPYC, quiet but shared with other virtual machines: AVX-512 as it is, and AVX2 as NumPy and OpenBLAS see it with
# `OPENBLAS_CORETYPE=Haswell` and NumPy's AVX-512 groups in `NPY_DISABLE_CPU_FEATURES`. A
# technique stays only if it pays on some class and loses on none; each one left is on
# everywhere.
#
# | technique | switch | AVX-512 | AVX2 | hazard it guards against |
# |---|---|---|---|---|
# | worker pool: the caller plus one thread per further core, BLAS held at one thread | `threads` | +27% SDPA, +48% causal SDPA | +38% SDPA, +41% causal SDPA | none: each tile is computed by one thread, so results do not depend on scheduling |
# | right after the caller's own threaded BLAS (a multi-head layer's projections), tiles on the caller and BLAS on its threads, which OpenBLAS keeps spinning | `warm_blas_threads` | no clear effect (−7% to +7% on every row) | +20% causal multi-head (+17% multi-head, within the noise) | the pool's thread sharing a core with a spinning BLAS thread |
# | causal tiles: key blocks wholly in a row block's future are skipped | `causal_tiles` | +48% causal SDPA | +57% causal SDPA, +13% causal multi-head | rows that see no key at all are written as zeros, as the formula's fully masked rows |
# | tile sizes: 512-row plain tiles; 32-row causal tiles across heads, within `TILE_SCORES` | `tuned_tiles` | +44% SDPA, +56% causal SDPA | +37% SDPA, +53% causal SDPA | none; a tile holds at most `TILE_SCORES` scores, so memory stays bounded at long S |
#
# Each cell lists the rows where the technique pays by the rule above; the multi-head rows of
# `causal_tiles` and `tuned_tiles` (+6% to +13%) stayed within the control's spread on one class
# or the other.
#
# Measured and removed, each paying on no class:
#
# - `base2` (base-2 scores and `exp2`) and `shift_free` (no max-subtraction where the norms of Q
#   and K bound every score): on AVX-512, 25 pairs gave `base2` −11% SDPA and −6% multi-head,
#   and `shift_free` +1% SDPA and −12% causal SDPA; other runs of the same ablation put each
#   anywhere from −12% to +14%, within this shared machine's drift from run to run. On AVX2
#   NumPy runs `exp2` scalar and both lost. Without them no overflow bound is needed: every
#   tile subtracts its rows' maxima.
# - `blas_row_sums` (row sums as a matrix-vector product): +2% to +4% on every row of both
#   classes, under the 5% a technique must gain.
# - `keys_first` (few-row tiles' scores formed as Sᵀ = K·Qᵀ): −1% and −5% on AVX-512, −2% and
#   +1% on AVX2.
# - `layer_on_pool`, the kernel's own copy of the multi-head layer's projections: the student's
#   layer runs under either backend.
# - Each worker's scratch memory reused from call to call, and the fork hook (the pool remembers
#   the process that made it).
#
# No remaining technique loses on either class, so nothing is chosen per machine, by CPU
# feature or by calibration.

# %%
#| default_exp core._attention_kernel

# %%
#| export
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

# %% [markdown]
# ## 0. Switched off while grading
#
# Graded tests run inside `provided_kernels_refused()`: there the kernel raises instead of
# running, so a student function that hands its work to the kernel fails its tests instead of
# earning their points. The refusal is process-wide: it holds in every thread, including one
# that a student function starts itself (a context variable would not follow it there). A count
# of the blocks inside it, under a lock, lets blocks nest and overlap.

# %%
#| export
_refusals = 0                          # how many provided_kernels_refused() blocks are open, in any thread
_refusals_lock = threading.Lock()


@contextmanager
def provided_kernels_refused():
    """Inside this block the tuned kernel raises instead of running, in every thread of the process."""
    global _refusals
    with _refusals_lock:
        _refusals += 1
    try:
        yield
    finally:
        with _refusals_lock:
            _refusals -= 1


def _refuse_while_grading() -> None:
    if _refusals:
        raise RuntimeError("the provided tuned attention kernel is switched off while grading: every graded "
                           "function must compute its result with the student's own code")

# %% [markdown]
# ## 1. The techniques, as explicit options
#
# `Techniques()` is every technique on; `Techniques(causal_tiles=False)` is the kernel without
# causal tiles, and so on. A call that passes no techniques uses them all: each one pays on some
# machine class measured and loses on none (the design note above), so none is chosen by the
# CPU. `cpu_features` and `simd_level` name the machine for `tito bench`'s output line.

# %%
#| export
@dataclass(frozen=True)
class Techniques:
    """Which of the kernel's techniques a call uses; all on by default."""

    threads: bool = True             # tiles on the caller plus a pool thread per further core, BLAS on one thread
    warm_blas_threads: bool = True   # but right after the caller's own threaded BLAS: BLAS's threads (section 2)
    causal_tiles: bool = True        # skip key blocks in a row block's future instead of masking them
    tuned_tiles: bool = True         # 512-row plain tiles, 32-row causal tiles spanning heads (off: 64 rows per head)


def cpu_features() -> dict:
    """The CPU features NumPy dispatches to in this process (NPY_DISABLE_CPU_FEATURES removes some)."""
    core = np._core if hasattr(np, "_core") else np.core          # NumPy 2 renamed numpy.core
    return dict(core._multiarray_umath.__cpu_features__)


def simd_level(features: dict | None = None) -> str:
    """The widest SIMD NumPy uses here: "AVX-512", "AVX2", "NEON" or "baseline"."""
    features = cpu_features() if features is None else features
    if features.get("AVX512_SKX"):
        return "AVX-512"
    if features.get("AVX2"):
        return "AVX2"
    if features.get("ASIMD") or features.get("NEON"):
        return "NEON"
    return "baseline"


TILE_SCORES = 1 << 20            # scores per tile at most: 4 MiB of float32, within a core's share of cache
QUERY_ROWS = 512                 # plain tiles: up to 512 query rows (all of T = 512: measured fastest)
CAUSAL_QUERY_ROWS = 32           # causal tiles: few rows, so that little of the future is computed
UNTUNED_ROWS = 64                # Part 7's tile height, what `tuned_tiles=False` uses
PARALLEL_MIN_SCORES = 1 << 18    # below ~260k scores a call runs on the caller alone: hand-offs cost more

# %% [markdown]
# ## 2. The worker pool
#
# `WorkerPool.map` runs `function(*task)` for every task on the calling thread and on
# `cores() - 1` pool threads, all taking tasks from one queue. The caller always works, so a
# call never waits for a pool thread to be scheduled.
#
# While tasks run, BLAS is held at one thread (`blas_on_one_thread`): NumPy's OpenBLAS is the
# pthreads build, whose thread count is one process-wide variable, so the limit is set by the
# first concurrent caller and restored by the last, and nothing is changed after a call. The
# pool remembers the process that made it: a forked child, which has none of its threads,
# makes its own.
#
# **Right after the caller's own BLAS work on several threads**, the pool loses. After a
# threaded call OpenBLAS keeps its threads spinning, waiting for more work, for 2^28 cycles
# (its THREAD_TIMEOUT, about 0.1 s), and a pool thread started then shares a core with one of
# them. A multi-head layer is that case: its projections `x @ w` run on BLAS's threads just
# before the attention core. A caller says so with `after_threaded_blas=True` (the layer's
# boundary does), and the kernel then runs its tiles on the caller and lets BLAS use its own,
# already spinning, threads (`Techniques.warm_blas_threads`), unless BLAS runs on one thread
# (held so around the call, or limited so by the user), when none spin.

# %%
#| export
def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class WorkerPool:
    """The caller plus cores() - 1 threads, and BLAS held at one thread while they run."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = None

    def _start(self) -> None:
        """(Re)start in this process: threads and the BLAS limit's bookkeeping."""
        self._pid, self._executor = os.getpid(), None
        self._blas_users, self._blas_limiter, self._blas_controller = 0, None, None

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._start()

    def _controller(self):
        if self._blas_controller is None:
            from threadpoolctl import ThreadpoolController
            self._blas_controller = ThreadpoolController().select(user_api="blas")
        return self._blas_controller

    def blas_threads(self) -> int:
        """How many threads BLAS may use now (1 while held here, or as the user limited it)."""
        self._check_process()
        return max((library.num_threads for library in self._controller().lib_controllers), default=1)

    @contextmanager
    def blas_on_one_thread(self):
        """BLAS on one thread while any caller, in any thread, is inside: the first in limits, the last out restores."""
        self._check_process()
        with self._lock:
            if self._blas_users == 0:
                self._blas_limiter = self._controller().limit(limits=1)
            self._blas_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._blas_users -= 1
                if self._blas_users == 0:
                    self._blas_limiter.restore_original_limits()
                    self._blas_limiter = None

    def map(self, function, tasks, threads: bool = True) -> None:
        """function(*task) for every task, on the caller and, when `threads`, the pool.

        Every task runs even when one fails; the first failure is raised after all have stopped.
        Without `threads` the caller runs them alone, with BLAS as the caller left it.
        """
        queue, errors = list(tasks)[::-1], []             # pop() from the end takes tasks in order
        helpers = min(cores(), len(queue)) - 1 if threads else 0
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
                except BaseException as error:          # noqa: B036 - re-raised by the caller
                    errors.append(error)

        self._check_process()
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=max(1, cores() - 1),
                                                    thread_name_prefix="tinytorch-attention")
            executor = self._executor
        with self.blas_on_one_thread():
            futures = [executor.submit(take_tasks) for _ in range(helpers)]
            take_tasks()                                  # the caller works too, never idle waiting
            for future in futures:
                future.cancel()                           # a helper that has not started is not needed
            wait(futures)                                 # every task has stopped writing
        if errors:
            raise errors[0]


POOL = WorkerPool()


def use_pool(techniques: Techniques, after_threaded_blas: bool) -> bool:
    """Whether a call's tiles go to the worker pool, or run on the caller with BLAS as the caller left it."""
    if not techniques.threads:
        return False
    return not (techniques.warm_blas_threads and after_threaded_blas and POOL.blas_threads() > 1)

# %% [markdown]
# ## 3. One tile
#
# A tile is a block of query rows (of one head, or of several heads at once) against the keys
# they may see. Its scores are formed, exponentiated in place, summed and multiplied by V while
# they are in the core's cache, and the output is normalised after the product with V, which
# scales (r, d_v) numbers instead of (r, s).

# %%
#| export
def attend_tile(q, k, v, hidden, output, weights, scale: float, techniques: Techniques) -> None:
    """Softmax attention of one tile, written into `output` (and `weights`) in place.

    q (..., r, d), k (..., s, d), v (..., s, dv), leading axes broadcasting; hidden (..., r, w),
    True = masked, covers the last w keys (all of them, or a causal tile's diagonal block), or
    None.
    """
    s = k.shape[-2]
    scores = np.matmul(q * np.float32(scale), np.swapaxes(k, -1, -2))                              # (..., r, s)
    if hidden is not None:
        np.copyto(scores[..., s - hidden.shape[-1]:], -np.inf, where=hidden)
    row_max = scores.max(axis=-1, keepdims=True)                  # (..., r, 1)
    if hidden is not None:
        np.copyto(row_max, 0.0, where=np.isneginf(row_max))       # fully masked rows
    np.subtract(scores, row_max, out=scores)
    np.exp(scores, out=scores)
    totals = scores.sum(axis=-1, keepdims=True)                   # (..., r, 1)
    if hidden is not None:
        np.copyto(totals, 1.0, where=totals == 0.0)               # fully masked rows stay 0
    np.matmul(scores, v, out=output)                              # (..., r, dv)
    inverse = np.divide(1.0, totals, dtype=np.float32)
    np.multiply(output, inverse, out=output)
    if weights is not None:
        np.multiply(scores, inverse, out=weights)

# %% [markdown]
# ## 4. Cutting a call into tiles
#
# **Plain tiles** are one head and up to `QUERY_ROWS` query rows each, within `TILE_SCORES`
# scores. **Causal tiles** (a causal offset instead of a boolean mask) are `CAUSAL_QUERY_ROWS`
# rows across every head at once (a group of heads when that would exceed `TILE_SCORES`), over
# only the keys their last row may see; only the block on the diagonal is masked.

# %%
#| export
def _causal_tile(r0: int, r1: int, S: int, offset: int):
    """Keys [0, seen) that query rows r0..r1-1 may see, and the future among keys [first, seen), or None."""
    seen = min(S, max(0, r1 + offset))            # what the tile's last row sees
    first = min(S, max(0, r0 + 1 + offset))       # what its first row sees
    if first == seen:
        return seen, None                         # every row sees all `seen` keys
    return seen, np.arange(first, seen)[None, :] > (np.arange(r0, r1)[:, None] + offset)   # (r, seen - first)


def _causal_tasks(q, k, v, offset, output, weights, scale, techniques) -> list:
    """Tiles of a causal attention: a block of rows across a group of heads, over the keys it may see."""
    T, S = q.shape[-2], k.shape[-2]
    lead = output.shape[:-2]
    rows = CAUSAL_QUERY_ROWS if techniques.tuned_tiles else UNTUNED_ROWS
    if not lead or (techniques.tuned_tiles and math.prod(lead) * rows * S <= TILE_SCORES):
        groups = [()]                                            # every head in one tile
    elif techniques.tuned_tiles:                                 # heads of the last leading axis in groups
        per = max(1, TILE_SCORES // (rows * S))
        groups = [index + (slice(h, h + per),) for index in np.ndindex(*lead[:-1]) for h in range(0, lead[-1], per)]
    else:
        groups = list(np.ndindex(*lead))                         # one head per tile
    tasks = []
    for r0 in range(0, T, rows):
        r1 = min(r0 + rows, T)
        seen, triangle = _causal_tile(r0, r1, S, offset)
        if seen == 0:                            # every row of the tile is masked
            output[..., r0:r1, :] = 0.0
            continue
        for g in groups:
            tasks.append((q[g][..., r0:r1, :], k[g][..., :seen, :], v[g][..., :seen, :], triangle,
                          output[g][..., r0:r1, :], None if weights is None else weights[g][..., r0:r1, :seen],
                          scale, techniques))
    return tasks[::-1]                           # largest first: the workers finish together


def _row_tasks(q, k, v, hidden, output, weights, scale, techniques) -> list:
    """Tiles of a general attention: one head and a block of query rows each, within TILE_SCORES scores."""
    lead, T, S = output.shape[:-2], q.shape[-2], k.shape[-2]
    rows = max(1, min(QUERY_ROWS, TILE_SCORES // max(S, 1))) if techniques.tuned_tiles else UNTUNED_ROWS
    tasks = []
    for r0 in range(0, T, rows):
        r1 = min(r0 + rows, T)
        for index in np.ndindex(*lead):
            tasks.append((q[index][r0:r1], k[index], v[index], None if hidden is None else hidden[index][r0:r1],
                          output[index][r0:r1], None if weights is None else weights[index][r0:r1], scale,
                          techniques))
    return tasks

# %% [markdown]
# ## 5. Attention
#
# `attention` is `math_attention`'s result on checked arrays. Small calls run as one vectorised
# tile on the caller. A boolean mask that is exactly causal (a prefill through a `KVCache`) is
# read as an offset, and one that hides nothing (a decoding step's) as no mask.

# %%
#| export
def simplify_mask(keep, T: int, S: int):
    """(keep, offset): (None, None) for a mask that hides nothing, (None, offset) for a causal one."""
    if keep is None or keep.all():
        return None, None
    if T > 1 and keep.shape[-2:] == (T, S) and np.array_equal(keep, np.broadcast_to(
            np.tri(T, S, k=S - T, dtype=bool), keep.shape)):
        return None, S - T
    return keep, None


def attention(q, k, v, keep, scale: float, offset: int | None = None, need_weights: bool = False, out=None,
              techniques: Techniques | None = None, after_threaded_blas: bool = False):
    """Softmax attention on checked float32 arrays; returns (output, weights or None).

    Args:
        q: (..., T, d); k: (..., S, d); v: (..., S, dv); leading axes broadcast.
        keep: boolean mask broadcasting to (..., T, S), True = may attend, or None.
        scale: multiplies the scores.
        offset: the diagonal offset of a causal mask covering the (T, S) scores; replaces `keep`.
        need_weights: also return the (..., T, S) weights.
        out: an array (any strides) of shape (..., T, dv) to write the output into.
        techniques: which techniques to use; None: all of them.
        after_threaded_blas: the caller has just run BLAS on several threads (section 2).
    """
    _refuse_while_grading()
    techniques = Techniques() if techniques is None else techniques
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    T, S, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    if offset is None:
        keep, offset = simplify_mask(keep, T, S)
    if offset is not None and offset >= S - 1:
        offset = None                                            # the first row already sees every key
    output = np.empty(lead + (T, dv), dtype=np.float32) if out is None else out
    weights = np.zeros(lead + (T, S), dtype=np.float32) if need_weights else None
    if S == 0 or T == 0 or math.prod(lead) == 0:
        output[...] = 0.0
        return output, weights                                   # nothing to attend to: zeros
    if offset is not None and not techniques.causal_tiles:
        keep, offset = np.tri(T, S, k=offset, dtype=bool), None
    q, k, v = (x if x.shape[:-2] == lead else np.broadcast_to(x, lead + x.shape[-2:]) for x in (q, k, v))
    if math.prod(lead) * T * S < PARALLEL_MIN_SCORES:           # one vectorised tile on the caller
        hidden = (None if keep is None else np.broadcast_to(~keep, lead + (T, S))) if offset is None \
            else ~np.tri(T, S, k=offset, dtype=bool)
        attend_tile(q, k, v, hidden, output, weights, scale, techniques)
    elif offset is not None:
        POOL.map(attend_tile, _causal_tasks(q, k, v, offset, output, weights, scale, techniques),
                 use_pool(techniques, after_threaded_blas))
    else:
        hidden = None if keep is None else np.broadcast_to(~keep, lead + (T, S))
        POOL.map(attend_tile, _row_tasks(q, k, v, hidden, output, weights, scale, techniques),
                 use_pool(techniques, after_threaded_blas))
    return output, weights

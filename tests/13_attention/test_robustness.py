"""The provided machinery under stress: threads, forks, failed cached calls, failing tiles."""
import multiprocessing
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from tinytorch.core import _attention_kernel as kernel
from tinytorch.core import _attention_backend as runtime
from tinytorch.core.attention import (KVCache, MultiHeadAttention, ScaledDotProductAttention, attention_backend,
                                      create_causal_mask, get_attention_backend)


def blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_concurrent_small_and_large_calls_restore_the_blas_threads():
    before = blas_threads()
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=(1, 2, 16, 8)), rng.normal(size=(2, 8, 256, 32))
    layer = ScaledDotProductAttention()

    def repeat(x, times):
        with attention_backend("fast"):
            for _ in range(times):
                layer(x, x, x)

    threads = [threading.Thread(target=repeat, args=(small, 200)) for _ in range(3)]
    threads.append(threading.Thread(target=repeat, args=(large, 10)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert blas_threads() == before


def test_attention_backend_blocks_are_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["other"] = get_attention_backend()
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with attention_backend("fast"):
        with attention_backend("math"):
            inside.set()
            release.wait(timeout=10)
            seen["here"] = get_attention_backend()
        seen["restored"] = get_attention_backend()
    thread.join()
    assert seen == {"other": runtime.DEFAULT_BACKEND, "here": "math", "restored": "fast"}
    with pytest.raises(ValueError, match="attention backend must be one of"):
        with attention_backend("flash"):
            pass


def _attend_in_child(_):
    x = np.random.default_rng(1).normal(size=(1, 4, 300, 16))
    with attention_backend("fast"):
        return float(ScaledDotProductAttention()(x, x, x).data.sum())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="only POSIX forks a process with the parent's threads' state (Windows spawns)")
def test_a_forked_child_can_use_the_thread_pool():
    x = np.random.default_rng(1).normal(size=(1, 4, 300, 16))
    with attention_backend("fast"):
        expected = float(ScaledDotProductAttention()(x, x, x).data.sum())   # the parent's pool now exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        result = pool.map_async(_attend_in_child, [0]).get(timeout=60)
    assert result == pytest.approx([expected], rel=1e-6)


def test_failed_cached_forwards_leave_the_cache_unchanged():
    rng = np.random.default_rng(2)
    layer = MultiHeadAttention(8, 2, seed=0)
    cache = KVCache(1, 8, 2, 4)
    layer(rng.normal(size=(1, 3, 8)), kv_cache=cache)
    snapshot = cache.cached_keys.copy(), cache.cached_values.copy(), cache.cache_lengths.copy()
    with pytest.raises(ValueError, match="does not broadcast"):
        layer(rng.normal(size=(1, 3, 8)), kv_cache=cache, mask=create_causal_mask(3))   # needs (3, 6)
    with pytest.raises(ValueError, match="does not broadcast"):
        layer(rng.normal(size=(1, 1, 8)), kv_cache=cache, mask=np.ones((5, 5)))
    with pytest.raises(ValueError, match="never forms"):
        MultiHeadAttention(8, 2, seed=0, block_size=2)(rng.normal(size=(1, 3, 8)), kv_cache=cache,
                                                      return_attention_weights=True)
    with pytest.raises(ValueError, match="would need 9"):
        layer(rng.normal(size=(1, 6, 8)), kv_cache=cache)
    for kept, now in zip(snapshot, (cache.cached_keys, cache.cached_values, cache.cache_lengths)):
        np.testing.assert_array_equal(kept, now)


def test_a_failing_tile_is_raised_only_after_every_tile_has_stopped():
    finished = []

    def tile(index):
        if index == 0:
            raise RuntimeError("tile 0 failed")
        threading.Event().wait(0.01)
        finished.append(index)

    with pytest.raises(RuntimeError, match="tile 0 failed"):
        kernel.POOL.map(tile, [(index,) for index in range(8)])
    assert sorted(finished) == list(range(1, 8))

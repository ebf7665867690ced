"""Part 9, `AttentionProfiler`: timing, the fitted exponent, peak memory and the generation comparison.

Timing is checked against a scripted clock: `time.perf_counter` is replaced by a clock that only
moves when the timed function runs, by durations the test chooses, so the expected median,
spread and runs are exact. Memory is checked against arrays of known size.

The four functions are one part. Besides a test of each, a profiling session that uses all four
is graded on nine workloads, most with fewer key/value heads than query heads, so a bug in any
one of them costs at least half of the part.
"""
import time
import tracemalloc

import numpy as np
import pytest

from tinytorch.core.attention import AttentionProfiler, MultiHeadAttention

GRADES = pytest.mark.grades("test-attention-profiler")
MiB = 2**20


class ScriptedClock:
    """perf_counter() in seconds that advances only when `step()` is called, by the next scripted duration (ms)."""

    def __init__(self, durations_ms):
        self.now, self.durations = 0.0, list(durations_ms)
        self.calls = 0

    def __call__(self):
        return self.now

    def step(self):
        self.now += self.durations[self.calls] / 1e3
        self.calls += 1


def check_timing(profiler, monkeypatch, durations_ms, median, spread, case):
    """measure_time on a scripted clock: the first `warmup` durations are untimed; median and spread by hand."""
    clock = ScriptedClock(durations_ms)
    with monkeypatch.context() as patch:
        patch.setattr(time, "perf_counter", clock)
        result = profiler.measure_time(clock.step)
    assert clock.calls == len(durations_ms), f"{case}: function called {clock.calls} times, expected {len(durations_ms)}"
    np.testing.assert_allclose(result["runs_ms"], durations_ms[profiler.warmup:], rtol=1e-9,
                               err_msg=f"{case}: runs_ms (warm-up untimed)")
    np.testing.assert_allclose(result["median_ms"], median, rtol=1e-9, err_msg=f"{case}: median_ms")
    np.testing.assert_allclose(result["spread_ms"], spread, rtol=1e-9, err_msg=f"{case}: spread_ms = p75 - p25")


def check_peak_memory(case, nbytes):
    """peak_memory of allocating `nbytes` while tracemalloc already traces 32 MiB held by the caller, after
    a 16 MiB peak that ended before the call: the call's own peak is measured, not an earlier one."""
    tracemalloc.start()
    try:
        held = np.ones(4 * MiB)                                           # 32 MiB already allocated
        np.ones(2 * MiB)                                                  # a 16 MiB peak, freed before the call
        peak = AttentionProfiler.peak_memory(lambda: np.ones(nbytes // 8))
        del held
    finally:
        tracemalloc.stop()
    assert nbytes <= peak < nbytes + MiB, (
        f"{case}: peak_memory {peak} bytes, expected about {nbytes} above what was allocated when the call "
        "started (reset the peak first, so an earlier, larger peak does not count)")


def check_generation(profiler, layer, prompt_length, new_tokens, batch_size, case):
    result = profiler.compare_generation(layer, prompt_length, new_tokens, batch_size=batch_size)
    assert len(result["cached_token_ms"]) == len(result["recompute_token_ms"]) == new_tokens, (
        f"{case}: {len(result['cached_token_ms'])} cached and {len(result['recompute_token_ms'])} recomputed "
        f"token times, expected {new_tokens} each")
    assert result["max_abs_difference"] < 1e-4, (
        f"{case}: cached and recomputed outputs differ by {result['max_abs_difference']}")
    assert min(result["cached_token_ms"]) > 0 and result["prefill_ms"] > 0, f"{case}: times must be measured"


# ---------------------------------------------------------------- one function each
@GRADES
def test_measure_time_reports_median_spread_and_runs_after_untimed_warmup(monkeypatch):
    check_timing(AttentionProfiler(repeats=5, warmup=2), monkeypatch, [50.0, 40.0, 3.0, 1.0, 9.0, 2.0, 4.0],
                 3.0, 2.0, "warmup 2 (50, 40 ms), runs 3, 1, 9, 2, 4 ms: median 3, p25 2, p75 4")


@GRADES
@pytest.mark.parametrize("exponent, factor", [(2.0, 0.003), (1.5, 40.0)])
def test_fit_exponent_is_the_log_log_slope(exponent, factor):
    sizes = [64, 128, 256, 512]
    costs = [factor * n**exponent for n in sizes]
    fitted = AttentionProfiler.fit_exponent(sizes, costs)
    assert abs(fitted - exponent) < 1e-9, f"costs {factor} * n^{exponent}: fitted {fitted}, expected {exponent}"


@GRADES
def test_peak_memory_counts_only_what_the_call_allocates():
    check_peak_memory("8 MiB array, 32 MiB held before", 8 * MiB)


@GRADES
def test_compare_generation_outputs_agree():
    layer = MultiHeadAttention(16, 4, num_kv_heads=2, seed=0).eval()
    check_generation(AttentionProfiler(seed=1), layer, 5, 4, 2, "E=16, 4 heads, 2 kv heads, batch 2")


# ---------------------------------------------------------------- a whole profiling session
@GRADES
@pytest.mark.parametrize("case", [
    dict(durations=[30.0, 5.0, 1.0, 2.0, 8.0], warmup=1, median=3.5, spread=5.75 - 1.75, exponent=2.0, nbytes=4 * MiB, heads=(8, 2, 2)),
    dict(durations=[90.0, 90.0, 2.0, 2.0, 3.0, 20.0], warmup=2, median=2.5, spread=7.25 - 2.0, exponent=1.0, nbytes=2 * MiB, heads=(16, 4, 1)),
    dict(durations=[10.0, 7.0, 1.0, 6.0], warmup=1, median=6.0, spread=6.5 - 3.5, exponent=2.5, nbytes=6 * MiB, heads=(12, 3, 3)),
    dict(durations=[4.0, 4.0, 4.0, 1.0, 2.0, 9.0, 10.0, 3.0], warmup=3, median=3.0, spread=9.0 - 2.0, exponent=3.0, nbytes=3 * MiB,
         heads=(8, 4, 2)),
    dict(durations=[12.0, 3.0, 5.0, 4.0], warmup=1, median=4.0, spread=4.5 - 3.5, exponent=1.8, nbytes=5 * MiB, heads=(24, 6, 2), batch=2),
    dict(durations=[8.0, 8.0, 2.0, 6.0, 1.0, 7.0, 3.0], warmup=2, median=3.0, spread=6.0 - 2.0, exponent=2.2, nbytes=7 * MiB, heads=(16, 8, 4),
         batch=3),
    dict(durations=[20.0, 1.0, 3.0, 2.0, 11.0, 5.0], warmup=1, median=3.0, spread=5.0 - 2.0, exponent=0.5, nbytes=1 * MiB, heads=(12, 6, 3)),
    dict(durations=[6.0, 6.0, 6.0, 6.0, 2.0, 1.0, 4.0], warmup=4, median=2.0, spread=3.0 - 1.5, exponent=2.0, nbytes=2 * MiB, heads=(32, 8, 2),
         batch=2),
    dict(durations=[3.0, 9.0, 2.0, 8.0, 4.0], warmup=1, median=6.0, spread=8.25 - 3.5, exponent=1.2, nbytes=8 * MiB, heads=(16, 4, 1), batch=2),
])
def test_profiling_session_reports_the_measured_numbers(monkeypatch, case):
    """Time a call, fit how the cost grows, measure memory under a tracing profiler, compare generation."""
    name = f"session {case['durations']} warmup {case['warmup']}, n^{case['exponent']}, {case['nbytes']} bytes"
    profiler = AttentionProfiler(repeats=len(case["durations"]) - case["warmup"], warmup=case["warmup"], seed=2)
    check_timing(profiler, monkeypatch, case["durations"], case["median"], case["spread"], name)
    sizes = [100, 200, 400]
    fitted = profiler.fit_exponent(sizes, [7.0 * n**case["exponent"] for n in sizes])
    assert abs(fitted - case["exponent"]) < 1e-9, f"{name}: fitted exponent {fitted}"
    check_peak_memory(name, case["nbytes"])
    E, H, Hkv = case["heads"]
    check_generation(profiler, MultiHeadAttention(E, H, num_kv_heads=Hkv, seed=3).eval(), 3, 2, case.get("batch", 1),
                     name)


# ---------------------------------------------------------------- provided code (not graded)
def test_time_call_is_the_median_in_seconds(monkeypatch):
    clock = ScriptedClock([5.0, 1.0, 3.0, 2.0])
    profiler = AttentionProfiler(repeats=3, warmup=1)
    with monkeypatch.context() as patch:
        patch.setattr(time, "perf_counter", clock)
        seconds = profiler.time_call(clock.step)
    assert abs(seconds - 0.002) < 1e-12


def test_scaling_rows_and_their_exponents():
    profiler = AttentionProfiler(repeats=1, warmup=0)
    rows = profiler.measure_attention_scaling(MultiHeadAttention(16, 4, seed=0), [8, 16])
    assert [row["seq_len"] for row in rows] == [8, 16]
    assert all(row["time_ms"] > 0 and row["peak_memory_mb"] > 0 and row["blas_threads"] == 1 for row in rows)
    assert rows[1]["weights_mb_estimate"] == 4 * 16 * 16 * 4 / MiB
    fitted = profiler.analyze_quadratic_scaling([{"seq_len": n, "time_ms": n**2.0, "peak_memory_mb": n * 1.0}
                                                 for n in (10, 20, 40)])
    assert abs(fitted["time_exponent"] - 2.0) < 1e-9 and abs(fitted["memory_exponent"] - 1.0) < 1e-9


def test_profiler_checks_its_arguments():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        AttentionProfiler(repeats=0)
    with pytest.raises(ValueError, match="two 1-D arrays of the same length >= 2"):
        AttentionProfiler.fit_exponent([1], [1])
    with pytest.raises(ValueError, match="must be positive"):
        AttentionProfiler.fit_exponent([1, 2], [0, 1])
    with pytest.raises(TypeError, match="attention_layer must be a MultiHeadAttention, got str"):
        AttentionProfiler().compare_generation("layer", 2, 2)

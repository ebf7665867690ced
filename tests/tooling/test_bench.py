"""`tito bench --ablation`'s blocks of runs, timed by a scripted clock: what is timed, and in what order."""
import pytest

from tito import bench


class Clock:
    """perf_counter() that advances only when a workload runs, by that workload's duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def workload(clock: Clock, seconds: float, calls: list, name: str, first_runs: float | None = None):
    """A workload that takes `seconds` (or `first_runs` seconds for as long as the other one ran last)."""
    def run():
        calls.append(name)
        slow = first_runs is not None and calls[-2:-1] != [name] and len(calls) > 1
        clock.now += first_runs if slow else seconds
    return run


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    return clock


def test_blocks_alternate_and_time_only_settled_runs(clock, monkeypatch):
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.15)
    calls = []
    # Durations are powers of two, so the clock adds them exactly. `first`'s run right after a
    # `second` run is slow (1 s), as a pool run right after a run that left BLAS threads spinning
    # is; otherwise first takes 1/32 s and second 1/64 s.
    first = workload(clock, 1 / 32, calls, "first", first_runs=1.0)
    second = workload(clock, 1 / 64, calls, "second")
    ratios = bench.blocks(first, second, pairs=4, repeats=3)
    assert ratios == [2.0] * 4, f"the unsettled runs were timed: ratios {ratios}"
    runs = []                                     # consecutive runs of one workload: (name, count)
    for name in calls:
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1] + 1)
        else:
            runs.append((name, 1))
    # Blocks: first, second | second, first | first, second | second, first. A block is its untimed
    # runs, until 0.15 s have passed (5 of first, 10 of second, or first's one slow run), then 3 timed.
    first_block, slow_first_block, second_block = 5 + 3, 1 + 3, 10 + 3
    assert runs == [("first", first_block), ("second", 2 * second_block), ("first", slow_first_block + first_block),
                    ("second", 2 * second_block), ("first", slow_first_block)], f"runs in order: {runs}"

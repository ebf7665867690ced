"""`tito bench --ablation`: its blocks of runs, timed by a scripted clock, and its verdicts."""
import pytest

from tito import bench


class Clock:
    """perf_counter() that advances only when a workload runs, by that workload's duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    return clock


def test_blocks_alternate_and_time_only_settled_runs(clock, monkeypatch):
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.5)
    calls, spinning_until = [], [0.0]

    # As OpenBLAS's threads spin on after a threaded call: for 3/8 s after a `second` run, `first`
    # runs four times slower, long enough to spoil the median of a block's timed runs had they
    # started with the block. Durations are powers of two, so the clock adds them exactly.
    def first():
        calls.append("first")
        clock.now += 1 / 32 * (4 if clock.now < spinning_until[0] else 1)

    def second():
        calls.append("second")
        clock.now += 1 / 64
        spinning_until[0] = clock.now + 3 / 8

    ratios = bench.blocks(first, second, pairs=4, repeats=3)
    assert ratios == [2.0] * 4, f"runs were timed while the other side's effects lingered: ratios {ratios}"
    runs = []                                     # consecutive runs of one workload: (name, count)
    for name in calls:
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1] + 1)
        else:
            runs.append((name, 1))
    assert [name for name, _ in runs] == ["first", "second", "first", "second", "first"], (
        f"blocks ran in the order {runs}: first, second | second, first | first, second | second, first")


def scripted_ablation(monkeypatch, ratios_in_order: list[list[float]], pairs: int, names: list[str]) -> dict:
    """run_ablation on the SDPA row, with `blocks` returning these ratios (control first, then each name)."""
    script = iter(ratios_in_order)
    monkeypatch.setattr(bench, "_our_workloads", lambda sizes: {row: (lambda: None) for row in bench.GOAL_ROWS})
    monkeypatch.setattr(bench, "blocks", lambda first, second, pairs, repeats: next(script))
    return bench.run_ablation(pairs=pairs, names=names, rows=["sdpa"])


def test_a_verdict_needs_the_gain_beyond_the_threshold_and_the_controls_spread(monkeypatch):
    control = [1.00, 0.98, 1.02, 1.01, 0.99]             # the machine's noise: gains of -2% to +2%
    pays = [1.30, 1.25, 1.35, 1.28, 1.31]
    loses = [0.80, 0.85, 0.82, 0.81, 0.83]
    within_noise = [1.06, 0.90, 1.20, 1.07, 1.00]        # median +6%, but its middle half reaches below +1%
    result = scripted_ablation(monkeypatch, [control, pays, loses, within_noise], 5,
                               ["threads", "causal_tiles", "tuned_tiles"])
    cells = {name: result["techniques"][name]["sdpa"] for name in ("threads", "causal_tiles", "tuned_tiles")}
    assert result["control"]["sdpa"]["gain"] == pytest.approx(0.0)
    assert cells["threads"]["pays"] and not cells["threads"]["loses"], cells["threads"]
    assert cells["causal_tiles"]["loses"] and not cells["causal_tiles"]["pays"], cells["causal_tiles"]
    assert cells["tuned_tiles"]["gain"] == pytest.approx(0.06)
    assert not cells["tuned_tiles"]["pays"] and not cells["tuned_tiles"]["loses"], cells["tuned_tiles"]
    lines = bench.format_ablation(result).splitlines()
    verdicts = {line.split()[0]: line for line in lines[4:7]}     # after the machine (2 lines), header, control
    assert verdicts["threads"].endswith("pays")
    assert verdicts["causal_tiles"].endswith("ON BUT LOSES on a goal row")
    assert verdicts["tuned_tiles"].endswith("no clear effect here")


def test_too_few_pairs_give_gains_but_no_verdict(monkeypatch):
    result = scripted_ablation(monkeypatch, [[1.0, 1.0], [0.5, 0.5]], 2, ["threads"])
    cell = result["techniques"]["threads"]["sdpa"]
    assert cell["gain"] == pytest.approx(-0.5) and not cell["loses"] and not result["judged"]
    assert bench.format_ablation(result).splitlines()[4].endswith("too few pairs to judge")

"""Part 10c, `simulate_serving`: requests served step by step under a budget of cache slots.

The small cases are worked out by hand in full, step by step, for both schemes. The seeded
workloads check what must hold for any correct run of the rules:

- at every step, real tokens <= slots held <= budget;
- every request generates one token per step it runs, so the running counts add up to the
  output tokens of all requests, and a request finishes no earlier than arrival + output - 1;
- in the k-th step it runs, a request holds its prompt and the k tokens generated so far
  (preempted or not), so the tokens of all steps add up to the sum over requests of
  prompt x output + output x (output + 1) / 2;
- reserved regions hold max_seq_length slots per running request and are never preempted;
- a paged request holds whole blocks and wastes less than one of them, so the slots held less
  the tokens is a multiple-of-the-block remainder below running x block_size.

Every case runs both schemes, so a bug in either shows in most cases. The seeded runs are also
compared step by step with the course's own run of the rules (stored for a release), so a bug
that breaks none of the properties, such as a preempted request sent to the back of the queue or
one admitted before it arrives, still shows.
"""
import numpy as np
import pytest

from tinytorch.core.attention import simulate_serving

GRADES = pytest.mark.grades("test-serving-simulation")


def as_lists(result):
    return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in result.items()}


def check(case, result, expected):
    got = as_lists(result)
    for key, value in expected.items():
        assert got[key] == value, f"{case}: {key} expected {value}, got {got[key]}"


def check_step_by_step(ref, case, result, requests, budget, max_seq_length, block_size=None):
    """Every step's record, every finish step and the preemptions against the course's own run of the four rules."""
    expected = ref.serving(requests, budget, max_seq_length, block_size)
    for name, value in zip(("tokens", "allocated", "running", "finish_step"), expected):
        got = np.asarray(result[name])
        if got.shape != value.shape or (got != value).any():
            shorter = min(len(got), len(value))
            first = next((i for i in range(shorter) if got[i] != value[i]), shorter)
            what = "step" if name != "finish_step" else "request"
            raise AssertionError(f"{case}: {name} has {len(got)} entries, expected {len(value)}; first difference at "
                                 f"{what} {first}: expected {value[first:first + 3].tolist()}, "
                                 f"got {got[first:first + 3].tolist()}")
    assert result["preemptions"] == int(expected[4]), \
        f"{case}: preemptions expected {int(expected[4])}, got {result['preemptions']}"


def workload(seed, count, max_seq_length):
    """Busy spells, where a queue builds up, between two quiet spells, where the server drains and idles."""
    rng = np.random.default_rng(seed)
    gaps = rng.integers(0, 4, size=count)
    gaps[count // 3::count // 3] += 4 * max_seq_length           # long enough for every request before to finish
    arrivals = np.cumsum(gaps)
    prompts = rng.integers(1, max_seq_length // 2, size=count)
    outputs = np.minimum(rng.integers(1, max_seq_length // 2, size=count), max_seq_length - prompts)
    return np.stack([arrivals, prompts, outputs], axis=1)


# ---------------------------------------------------------------- graded: worked by hand
@GRADES
def test_the_worked_example_both_ways():
    """Budget 12, max_seq_length 8: requests (0, 3, 2) and (0, 2, 2)."""
    requests = np.array([[0, 3, 2], [0, 2, 2]])
    check("reserved regions of 8", simulate_serving(requests, 12, 8),
          {"tokens": [4, 5, 3, 4], "allocated": [8, 8, 8, 8], "running": [1, 1, 1, 1], "finish_step": [1, 3],
           "preemptions": 0})
    check("paged, blocks of 2", simulate_serving(requests, 12, 8, block_size=2),
          {"tokens": [7, 9], "allocated": [8, 10], "running": [2, 2], "finish_step": [1, 1], "preemptions": 0})


@GRADES
def test_preemption_frees_the_newest_request():
    """Budget 8 (4 blocks of 2): (0, 3, 2), (0, 2, 3), (1, 1, 2).

    Paged: step 0 admits r0 (4 tokens, 4 slots) and r1 (3 tokens, 4 slots). Step 1: r0 grows to 5
    tokens and needs 6 slots, so r1, the newest, is preempted; r0 finishes. Step 2: r1 comes back
    with 2 + 1 + 1 = 4 tokens, and r2 with 2. Step 3: r1 grows to 5 (6 slots, 8 in all), then r2
    needs a block, and being the newest it preempts itself; r1 finishes. Step 4: r2 with 3 tokens.
    """
    requests = np.array([[0, 3, 2], [0, 2, 3], [1, 1, 2]])
    check("paged, blocks of 2", simulate_serving(requests, 8, 8, block_size=2),
          {"tokens": [7, 5, 6, 5, 3], "allocated": [8, 6, 6, 6, 4], "running": [2, 1, 2, 1, 1],
           "finish_step": [1, 3, 4], "preemptions": 2})
    check("reserved regions of 8: one at a time", simulate_serving(requests, 8, 8),
          {"tokens": [4, 5, 3, 4, 5, 2, 3], "allocated": [8] * 7, "running": [1] * 7, "finish_step": [1, 4, 6],
           "preemptions": 0})


@GRADES
def test_no_request_overtakes_an_earlier_one():
    """Budget 12, max_seq_length 12: (0, 4, 3), (0, 11, 1), (1, 1, 1).

    r1 needs 12 slots, so it waits for r0 to finish. r2 would fit beside r0 in a block of 4 from
    step 1 on, but it arrived after r1 and waits behind it.
    """
    requests = np.array([[0, 4, 3], [0, 11, 1], [1, 1, 1]])
    check("paged, blocks of 4", simulate_serving(requests, 12, 12, block_size=4),
          {"tokens": [5, 6, 7, 12, 2], "allocated": [8, 8, 8, 12, 4], "running": [1] * 5, "finish_step": [2, 3, 4],
           "preemptions": 0})
    check("reserved regions of 12", simulate_serving(requests, 12, 12),
          {"tokens": [5, 6, 7, 12, 2], "allocated": [12] * 5, "running": [1] * 5, "finish_step": [2, 3, 4],
           "preemptions": 0})


@GRADES
def test_a_request_waits_for_its_arrival():
    """Budget 12, max_seq_length 8: (0, 3, 2), then (4, 2, 3) and (4, 1, 1), which arrive after r0 has finished.

    r0 runs at steps 0 and 1. Nothing runs at steps 2 and 3, which are recorded with zeros, though
    there is room: r1 and r2 have not arrived. Paged, both are admitted at step 4, and r2, which
    has only its prefill's token to generate, finishes there, before r1 (step 6). With regions of
    8, r2 waits for r1's region and runs at step 7.
    """
    requests = np.array([[0, 3, 2], [4, 2, 3], [4, 1, 1]])
    check("reserved regions of 8", simulate_serving(requests, 12, 8),
          {"tokens": [4, 5, 0, 0, 3, 4, 5, 2], "allocated": [8, 8, 0, 0, 8, 8, 8, 8],
           "running": [1, 1, 0, 0, 1, 1, 1, 1], "finish_step": [1, 6, 7], "preemptions": 0})
    check("paged, blocks of 2", simulate_serving(requests, 12, 8, block_size=2),
          {"tokens": [4, 5, 0, 0, 5, 4, 5], "allocated": [4, 6, 0, 0, 6, 4, 6], "running": [1, 1, 0, 0, 2, 1, 1],
           "finish_step": [1, 6, 4], "preemptions": 0})


# ---------------------------------------------------------------- graded: properties of seeded runs
@GRADES
@pytest.mark.parametrize("seed, count, max_seq_length, regions, block_size", [
    (0, 60, 40, 3, 4), (1, 80, 64, 4, 8), (2, 50, 30, 2, 3)])
def test_runs_keep_the_budget_and_serve_every_token(ref, seed, count, max_seq_length, regions, block_size):
    requests = workload(seed, count, max_seq_length)
    arrival, prompt, output = requests.T
    held_tokens = int((prompt * output + output * (output + 1) // 2).sum())
    budget = regions * max_seq_length
    runs = {"reserved": simulate_serving(requests, budget, max_seq_length),
            "paged": simulate_serving(requests, budget, max_seq_length, block_size=block_size)}
    for scheme, run in runs.items():
        case = f"seed {seed}, {scheme}"
        tokens, held, running, finish = run["tokens"], run["allocated"], run["running"], run["finish_step"]
        assert len(tokens) == len(held) == len(running) == finish.max() + 1, \
            f"{case}: one record per step until the last request finishes at step {finish.max()}: " \
            f"{len(tokens)}, {len(held)} and {len(running)} records"
        assert (tokens <= held).all() and (held <= budget).all(), f"{case}: tokens <= slots held <= budget {budget}"
        assert running.sum() == output.sum(), \
            f"{case}: one token per running request per step: running adds up to {running.sum()}, " \
            f"the outputs to {output.sum()}"
        early = np.flatnonzero(finish < arrival + output - 1)
        assert early.size == 0, \
            f"{case}: a request runs from its arrival at the earliest, so it finishes no earlier than arrival + " \
            f"output - 1; request {early[:1].tolist()} arrived at step {arrival[early[:1]].tolist()} with " \
            f"{output[early[:1]].tolist()} tokens to generate and finished at step {finish[early[:1]].tolist()}"
        assert tokens.sum() == held_tokens, \
            f"{case}: in its k-th running step a request holds prompt + k tokens, so the steps' tokens add up to " \
            f"{held_tokens}, got {tokens.sum()}"
    reserved, paged = runs["reserved"], runs["paged"]
    np.testing.assert_array_equal(reserved["allocated"], reserved["running"] * max_seq_length,
                                  err_msg=f"seed {seed}: each running request holds one region of {max_seq_length}")
    assert reserved["running"].max() == regions and reserved["preemptions"] == 0, \
        f"seed {seed}: the budget fits {regions} regions, and regions are never preempted: " \
        f"{reserved['running'].max()} at once, {reserved['preemptions']} preemptions"
    waste = paged["allocated"] - paged["tokens"]
    assert (paged["allocated"] % block_size == 0).all() and (waste < np.maximum(paged["running"], 1) * block_size).all(), \
        f"seed {seed}: paged requests hold whole blocks of {block_size} and waste less than one each"
    assert paged["running"].max() > regions, \
        f"seed {seed}: the paged cache runs more than {regions} requests at once, got {paged['running'].max()}"
    assert (paged["tokens"].sum() / paged["allocated"].sum()) > (reserved["tokens"].sum() / reserved["allocated"].sum())
    check_step_by_step(ref, f"seed {seed}, reserved", reserved, requests, budget, max_seq_length)
    check_step_by_step(ref, f"seed {seed}, paged", paged, requests, budget, max_seq_length, block_size)


@GRADES
def test_blocks_of_one_token_hold_exactly_the_tokens(ref):
    requests = workload(3, 40, 32)
    paged = simulate_serving(requests, 64, 32, block_size=1)
    np.testing.assert_array_equal(paged["allocated"], paged["tokens"], err_msg="blocks of 1: slots held = tokens")
    assert paged["allocated"].max() <= 64 and paged["preemptions"] > 0, \
        f"blocks of 1 under a budget of 64: the running requests outgrow it and must be preempted to stay within " \
        f"it; held at most {paged['allocated'].max()}, {paged['preemptions']} preemptions"
    reserved = simulate_serving(requests, 64, 32)
    arrival = requests[:, 0]
    paged_time, reserved_time = (int((run["finish_step"] - arrival).sum()) for run in (paged, reserved))
    assert paged_time < reserved_time, \
        f"exact allocation runs more requests at once than 2 regions, so they spend fewer steps from arrival to " \
        f"their last token: {paged_time} steps in all against {reserved_time}"
    assert paged["running"].sum() == reserved["running"].sum() == requests[:, 2].sum()
    prompt, output = requests[:, 1], requests[:, 2]
    assert paged["tokens"].sum() == reserved["tokens"].sum() == (prompt * output + output * (output + 1) // 2).sum(), \
        "in its k-th running step a request holds prompt + k tokens, in either scheme"
    check_step_by_step(ref, "blocks of 1, budget 64", paged, requests, 64, 32, 1)
    check_step_by_step(ref, "reserved regions of 32, budget 64", reserved, requests, 64, 32)


# ---------------------------------------------------------------- not graded: the provided checks
@pytest.mark.parametrize("requests, message", [
    (np.array([[0, 3, 2], [0, 7, 2]]), "a request of 9 tokens"),
    (np.array([[2, 3, 2], [1, 2, 2]]), "in order"),
    (np.array([[0, 0, 2]]), ">= 1"),
    (np.array([[0, 2, 0]]), ">= 1"),
])
def test_bad_requests_raise(requests, message):
    with pytest.raises(ValueError, match=message):
        simulate_serving(requests, 16, 8)


def test_bad_shapes_and_budgets_raise():
    with pytest.raises(TypeError, match=r"\(N, 3\) array of integers"):
        simulate_serving(np.zeros((2, 2), dtype=int), 16, 8)
    with pytest.raises(TypeError, match=r"\(N, 3\) array of integers"):
        simulate_serving(np.zeros((2, 3)), 16, 8)
    with pytest.raises(ValueError, match="cannot hold one request of max_seq_length=8: it needs 8"):
        simulate_serving(np.array([[0, 1, 1]]), 7, 8)
    with pytest.raises(ValueError, match="in blocks of 3: it needs 9"):
        simulate_serving(np.array([[0, 1, 1]]), 8, 8, block_size=3)


def test_no_requests_take_no_steps():
    result = simulate_serving(np.zeros((0, 3), dtype=int), 8, 8, block_size=2)
    assert as_lists(result) == {"tokens": [], "allocated": [], "running": [], "finish_step": [], "preemptions": 0}

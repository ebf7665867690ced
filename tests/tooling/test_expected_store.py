"""The stored expected values: keyed by the asking test, compared with tolerances another CPU's rounding
stays within, and still stale when the reference or a test's inputs really change."""
import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest

STORE = Path(__file__).resolve().parents[1] / "13_attention" / "expected.py"
spec = importlib.util.spec_from_file_location("expected_under_test", STORE)
expected = importlib.util.module_from_spec(spec)
spec.loader.exec_module(expected)

TEST = "test_example.py::test_case[3-causal]"


def attention(q, k, v, scale=None):
    """A small float64 attention, standing in for the course's reference."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    scores = q @ k.swapaxes(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return weights @ v, weights


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 5, 4)).astype(np.float32) for _ in range(3)]


def recorded(reference, *args, **kwargs) -> dict:
    """The store a recording run of one test writes."""
    recorder = expected.ExpectedValues({}, types.SimpleNamespace(attention=reference), record=True)
    recorder.begin_test(TEST)
    recorder.attention(*args, **kwargs)
    return recorder.asked


def ask(store, reference, *args, **kwargs):
    """One question of TEST, in the course repository (reference given) or in a release (reference None)."""
    namespace = None if reference is None else types.SimpleNamespace(attention=reference)
    values = expected.ExpectedValues(store, namespace)
    values.begin_test(TEST)
    return values.attention(*args, **kwargs)


def one_ulp_off(function):
    """The reference as another CPU's BLAS may round it: every float result one unit in the last place away."""
    def rounded(*args, **kwargs):
        return tuple(np.nextafter(part, np.inf) for part in function(*args, **kwargs))
    return rounded


def test_keys_name_the_test_and_the_question_not_the_inputs():
    q, k, v = inputs()
    store = recorded(attention, q, k, v)
    assert sorted(store) == [f"{TEST}#0.attention.0", f"{TEST}#0.attention.1", f"{TEST}#0.attention.inputs",
                             f"{TEST}#0.attention.len"]
    # inputs another CPU computed a few float32 units apart ask the same question, and get the same answer
    nudged = [np.nextafter(x, np.inf) for x in (q, k, v)]
    assert sorted(recorded(attention, *nudged)) == sorted(store)
    output, weights = ask(store, None, *nudged)
    np.testing.assert_array_equal(output, store[f"{TEST}#0.attention.0"])


def test_the_course_hands_every_test_the_stored_answer_when_the_reference_agrees():
    """Course and release grade with the same numbers: the recomputed reference is checked, the store answers."""
    q, k, v = inputs()
    store = recorded(attention, q, k, v)
    course_output, _ = ask(store, one_ulp_off(attention), q, k, v)
    release_output, _ = ask(store, None, q, k, v)
    np.testing.assert_array_equal(course_output, store[f"{TEST}#0.attention.0"])
    np.testing.assert_array_equal(release_output, course_output)


def test_a_real_change_to_the_reference_is_stale():
    q, k, v = inputs()
    store = recorded(attention, q, k, v)

    def changed(q, k, v, scale=None):                      # the scale off by one part in a million
        return attention(q, k, v, scale=q.shape[-1] ** -0.5 * (1 + 1e-6))

    with pytest.raises(AssertionError, match=r"expected_values.npz is stale.*question test_example.py"):
        ask(store, changed, q, k, v)


def test_a_real_change_to_a_tests_inputs_is_caught_in_the_course_and_in_a_release():
    q, k, v = inputs(seed=0)
    store = recorded(attention, q, k, v)
    other_seed = inputs(seed=1)
    permuted = [q[:, ::-1], k, v]                          # the same numbers in another order
    reshaped = [q.reshape(2, 4, 5)[..., :4], k, v]
    for changed in (other_seed, permuted, reshaped):
        with pytest.raises(AssertionError, match="stale"):
            ask(store, attention, *changed)
        with pytest.raises(LookupError, match="stored for other inputs"):
            ask(store, None, *changed)
    with pytest.raises(LookupError, match="no stored expected value"):   # a question the course never asked
        values = expected.ExpectedValues(store)
        values.begin_test("test_example.py::test_other")
        values.attention(q, k, v)


def test_tolerances_sit_between_rounding_and_a_grade():
    stored = np.array([1e5, 0.25, -3.0])
    assert expected.agrees(stored, np.nextafter(stored, 0))              # one unit in the last place
    assert expected.agrees(stored, stored * (1 + 1e-12))
    assert not expected.agrees(stored, stored * (1 + 1e-6))             # the float32 tests' own tolerance
    assert not expected.agrees(np.array([0.5, -np.inf]), np.array([0.5, 0.0]))     # -inf stays where it was
    assert expected.agrees(np.array([1, 0, 1]), np.array([1, 0, 1]))
    assert not expected.agrees(np.array([1, 0, 1]), np.array([1, 1, 1]))          # masks: exact
    assert not expected.agrees(stored, stored[:2])


def test_questions_outside_a_test_are_refused():
    values = expected.ExpectedValues({}, types.SimpleNamespace(attention=attention))
    with pytest.raises(RuntimeError, match="outside a test"):
        values.attention(*inputs())

"""Grading setup for module 13.

Every test here runs with the "math" attention backend, the default, so the student's own
`math_attention` is what the layers execute; tests of the provided fast kernel switch to "fast"
explicitly. A graded test cannot use the provided kernels at all (see `_grading_guard`). A test
marked `@pytest.mark.grades("<grade_id>")` grades the notebook part with that nbgrader grade_id;
`tito grade` adds up its points from the notebook's metadata.

Expected values come from the `ref` fixture, or `from expected import ref` in module-level
helpers: `ref.attention(q, k, v, keep)` is the float64 reference's answer for those inputs, stored
under the test that asks. In the course repository the reference recomputes it and the stored copy
must agree; a student workspace holds only the stored values (`expected.py` says how).
"""
import importlib.util
import os
import sys
import tracemalloc
from pathlib import Path

import pytest

from tinytorch.core._attention_kernel import provided_kernels_refused
from tinytorch.core.attention import attention_backend

HERE = Path(__file__).parent
REFERENCE_FILE = HERE / "course" / "reference.py"    # the course repository only; never released


def _load(name: str, path: Path):
    """A file of this folder as a module (pytest imports test files by path, so helpers are too)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


expected = sys.modules.get("expected") or _load("expected", HERE / "expected.py")
RECORDING = os.environ.get("TITO_RECORD_EXPECTED") == "1"
if REFERENCE_FILE.exists():
    _reference = sys.modules.get("attention_reference") or _load("attention_reference", REFERENCE_FILE)
    expected.ref = expected.ExpectedValues({} if RECORDING else expected.read_store(), _reference, RECORDING)
else:
    expected.ref = expected.ExpectedValues(expected.read_store())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Expected values are stored by the test that asks for them: name it before its fixtures run."""
    expected.ref.begin_test(expected.test_id(item.path, item.nodeid))


def pytest_runtest_teardown(item):
    expected.ref.begin_test(None)


def pytest_configure(config):
    if RECORDING and (hasattr(config, "workerinput") or getattr(config.option, "numprocesses", None)):
        raise pytest.UsageError("TITO_RECORD_EXPECTED=1 writes the whole store from one process: run it without -n")


SUMMARY = ("expected values: {checked} stored answers agree with the reference computed here; largest difference "
           "{largest:.1e} of their magnitude (tolerance " + f"{expected.STORE_RTOL:.0e})")


def pytest_terminal_summary(terminalreporter):
    """How far the stored answers were from the reference recomputed on this machine. Under pytest -n the
    workers hand their counts to the controlling process instead, and the course's top conftest adds them up."""
    if expected.ref.checked:
        terminalreporter.write_line(SUMMARY.format(checked=expected.ref.checked,
                                                   largest=expected.ref.largest_difference))


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workeroutput"):       # a pytest-xdist worker: hand its count to the controller
        session.config.workeroutput["expected_values"] = {"checked": expected.ref.checked, "summary": SUMMARY,
                                                          "largest": expected.ref.largest_difference}
    if RECORDING and exitstatus == 0:
        expected.write_store(expected.ref.asked)


@pytest.fixture(scope="session")
def ref():
    """Expected values: the float64 reference's answers, computed (course) or stored (student workspace)."""
    return expected.ref


def _peak_bytes(function):
    """(function(), the peak bytes tracemalloc saw allocated while it ran, above those allocated when it began)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        result = function()
        return result, tracemalloc.get_traced_memory()[1] - baseline
    finally:
        if not was_tracing:
            tracemalloc.stop()


@pytest.fixture
def peak_bytes():
    """peak_bytes(function): (its result, the peak bytes allocated while it ran), measured by tracemalloc."""
    return _peak_bytes


@pytest.fixture(autouse=True)
def _grade_the_student_path(request):
    """Run the student's math path; a graded test also refuses the provided kernels, so that a
    student function cannot earn points by calling them."""
    with attention_backend("math"):
        if request.node.get_closest_marker("grades"):
            with provided_kernels_refused():
                yield
        else:
            yield

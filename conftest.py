"""What pytest-xdist's workers report to the controlling process, for the course's whole test suite.

Under `pytest -n` the tests run in worker processes; the controlling process collects nothing, so a
test folder's own conftest never loads there. Module 13's workers each send how many stored expected
values they checked against the reference, the largest difference and the summary line to print
(tests/13_attention/conftest.py); this adds them up and prints that line once, as a run without -n does.
"""
import pytest

_expected_values = []           # one report per worker that checked stored expected values


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    report = getattr(node, "workeroutput", {}).get("expected_values")
    if report and report["checked"]:
        _expected_values.append(report)


def pytest_terminal_summary(terminalreporter):
    if _expected_values:
        terminalreporter.write_line(_expected_values[0]["summary"].format(
            checked=sum(report["checked"] for report in _expected_values),
            largest=max(report["largest"] for report in _expected_values)))

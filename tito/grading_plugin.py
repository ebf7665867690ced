"""A pytest plugin that `tito grade` and `tito test` load (`-p tito.grading_plugin`) in their pytest run.

Each of its jobs is switched on by an environment variable, so `tito test -v` can use one of them
without the others:

- TITO_GRADE_PACKAGE: make sure the tests import the package being graded and no other.
- TITO_GRADE_REPORT: record every collected test with the part it grades, and append one JSON
  line per test phase to the report file, with the frames of a failure's traceback. Results
  survive even if student code kills the run: a collected test with no result is then graded
  as failed.
- TITO_TEST_PART: run only the tests of that part (a grade_id of a `@pytest.mark.grades` marker).
"""
from __future__ import annotations

import importlib
import json
import os
import traceback
from pathlib import Path

import pytest

PACKAGE_ENV = "TITO_GRADE_PACKAGE"   # the tinytorch folder being graded
MODULE_ENV = "TITO_GRADE_MODULE"     # e.g. tinytorch.core.attention
REPORT_ENV = "TITO_GRADE_REPORT"     # where the JSON lines go
PART_ENV = "TITO_TEST_PART"          # the one grade_id to run, if any
MESSAGE_LIMIT = 4000                 # characters of an exception message kept in the report


def _write(record: dict) -> None:
    if REPORT_ENV in os.environ:
        with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")


def pytest_configure(config):
    if PACKAGE_ENV not in os.environ:
        return
    expected = Path(os.environ[PACKAGE_ENV]).resolve()
    import tinytorch

    found = Path(tinytorch.__file__).resolve().parent
    if found != expected:
        pytest.exit(f"tito grade: the tests would import tinytorch from {found}, not from the package "
                    f"being graded, {expected}; nothing was graded", returncode=3)
    try:
        module = importlib.import_module(os.environ[MODULE_ENV])
    except Exception as error:  # the student's exported file itself fails to import
        _write({"kind": "import-error", "error": f"{type(error).__name__}: {error}"})
        return
    _write({"kind": "graded-file", "path": str(Path(module.__file__).resolve())})


def _todo_location(report) -> dict | None:
    """Where a NotImplementedError came from in the graded package, if that is what failed."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is None or "NotImplementedError" not in crash.message:
        return None
    return {"path": str(Path(crash.path).resolve()), "line": crash.lineno}


def _grade_id(item) -> str | None:
    marker = item.get_closest_marker("grades")
    return marker.args[0] if marker else None


def pytest_collection_modifyitems(config, items):
    wanted = os.environ.get(PART_ENV)
    if wanted:
        deselected = [item for item in items if _grade_id(item) != wanted]
        items[:] = [item for item in items if _grade_id(item) == wanted]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
    for item in items:
        _write({"kind": "collected", "nodeid": item.nodeid, "grades": _grade_id(item)})


def _frames(excinfo) -> list[dict]:
    """Every frame of the failure's traceback, innermost last, with real (resolved) file paths."""
    frames = []
    for frame in traceback.extract_tb(excinfo.tb):
        try:
            path = str(Path(frame.filename).resolve())
        except OSError:
            path = frame.filename
        frames.append({"path": path, "line": frame.lineno, "function": frame.name, "code": frame.line or ""})
    return frames


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and REPORT_ENV in os.environ:
        report.tito_failure = {"frames": _frames(call.excinfo),
                               "exception": call.excinfo.exconly()[:MESSAGE_LIMIT]}
    return report


def pytest_runtest_logreport(report):
    if not (report.when == "call" or report.failed or report.skipped):
        return
    _write({
        "kind": "test",
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "longrepr": str(report.longrepr) if report.failed else "",
        "todo": _todo_location(report) if report.failed else None,
        "failure": getattr(report, "tito_failure", None),
    })


def pytest_collectreport(report):
    if report.failed:
        _write({"kind": "collect-error", "nodeid": report.nodeid, "longrepr": str(report.longrepr)})

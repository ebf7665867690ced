"""A pytest plugin that `tito grade` loads (`-p tito.grading_plugin`) in the grading subprocess.

It makes sure the tests import the package being graded and no other, records every collected
test with the part it grades, and appends one JSON line per test phase to the report file, so
that results survive even if student code kills the run: a collected test with no result is
then graded as failed.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

PACKAGE_ENV = "TITO_GRADE_PACKAGE"   # the tinytorch folder being graded
MODULE_ENV = "TITO_GRADE_MODULE"     # e.g. tinytorch.core.attention
REPORT_ENV = "TITO_GRADE_REPORT"     # where the JSON lines go


def _write(record: dict) -> None:
    with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def pytest_configure(config):
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
    return {"path": str(Path(crash.path).resolve()), "line": crash.lineno}  # through the scratch link


def pytest_collection_modifyitems(items):
    for item in items:
        marker = item.get_closest_marker("grades")
        _write({"kind": "collected", "nodeid": item.nodeid, "grades": marker.args[0] if marker else None})


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
    })


def pytest_collectreport(report):
    if report.failed:
        _write({"kind": "collect-error", "nodeid": report.nodeid, "longrepr": str(report.longrepr)})

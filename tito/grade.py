"""`tito grade`: run a module's grading tests against one exported package and add up the points.

Points come from the nbgrader metadata of the course's own module source (a grade cell's
`points`); a pytest test grades the part named by its `@pytest.mark.grades("<grade_id>")`
marker. A part earns its points in proportion to its tests that pass. Parts graded by hand
(markdown answers) are listed with their points but never counted as earned here.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tito
from tito.export import read_source
from tito.workspace import Module, TitoError, resolve_module

COURSE_ROOT = Path(tito.__file__).resolve().parents[1]  # the course repository tito runs from


@dataclass
class Part:
    grade_id: str
    points: float
    manual: bool
    tests: list[str] = field(default_factory=list)
    passed: int = 0
    failures: list[dict] = field(default_factory=list)

    @property
    def earned(self) -> float:
        return 0.0 if self.manual or not self.tests else self.points * self.passed / len(self.tests)


def graded_parts(module: Module) -> list[Part]:
    """The graded cells of the module's notebook, in order, with their points."""
    parts = []
    for cell in read_source(module).cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            parts.append(Part(meta["grade_id"], float(meta.get("points", 0)), manual=cell.cell_type == "markdown"))
    return parts


def resolve_package(path: Path) -> Path:
    """The `tinytorch` folder for --package, given either it or the workspace that holds it."""
    path = path.resolve()
    for candidate in (path / "tinytorch", path):
        if candidate.name == "tinytorch" and (candidate / "__init__.py").is_file():
            return candidate
    raise TitoError(f"--package {path}: expected a tinytorch package folder (with __init__.py) or a "
                    "workspace that contains one")


def _function_at(path: str, line: int) -> str | None:
    """`Class.method` or `function` around `line` of a Python file, or None."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    names, body = [], tree.body
    while True:
        around = next((node for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                       and node.lineno <= line <= node.end_lineno), None)
        if around is None:
            return ".".join(names) or None
        names.append(around.name)
        body = around.body


def run_grading(module: Module, package: Path, tests: Path) -> list[dict]:
    """Run pytest on `tests` with `package` first on the path; returns the plugin's records."""
    with tempfile.TemporaryDirectory(prefix="tito-grade-") as scratch:
        report = Path(scratch) / "report.jsonl"
        env = dict(os.environ,
                   PYTHONPATH=os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   TITO_GRADE_PACKAGE=str(package), TITO_GRADE_MODULE=f"tinytorch.core.{module.name}",
                   TITO_GRADE_REPORT=str(report))
        command = [sys.executable, "-m", "pytest", str(tests), "-p", "tito.grading_plugin", "-q",
                   "-p", "no:cacheprovider", "--rootdir", str(COURSE_ROOT), "--no-header", "-W",
                   "ignore::pytest.PytestAssertRewriteWarning"]
        # cwd is the scratch folder: `python -m` puts the cwd first on sys.path, and it must hold no tinytorch
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    if result.returncode == 3 or not records:
        raise TitoError(f"grading did not run:\n{(result.stdout + result.stderr).strip()[-3000:]}")
    return records


def grade(root: Path, spec: str, package: Path | None = None) -> dict:
    """Grade the module named by `spec` in the exported `package`; returns the full result."""
    module = resolve_module(root, spec)
    course_module = resolve_module(COURSE_ROOT, module.folder_name)
    tests = course_module.tests
    if not tests.is_dir():
        raise TitoError(f"the course has no grading tests for {module.folder_name} at {tests}")
    package = resolve_package(package or root)
    graded_file = package / "core" / f"{module.name}.py"
    if not graded_file.exists():
        raise TitoError(f"{graded_file} does not exist: run `tito export {module.number}` first")

    parts = {part.grade_id: part for part in graded_parts(course_module)}
    records = run_grading(module, package, tests)
    problems = []
    for record in records:
        if record["kind"] == "graded-file" and Path(record["path"]) != graded_file.resolve():
            raise TitoError(f"the tests imported {record['path']} instead of {graded_file}; nothing was graded")
        if record["kind"] in ("import-error", "collect-error"):
            problems.append(record.get("error") or record["longrepr"])
        if record["kind"] != "test" or record["grades"] is None:
            continue
        part = parts.get(record["grades"])
        if part is None:
            raise TitoError(f"{record['nodeid']} grades {record['grades']!r}, which is not a graded part of "
                            f"{course_module.relative(course_module.source)}")
        if record["nodeid"] not in part.tests:
            part.tests.append(record["nodeid"])
        if record["outcome"] == "passed":
            part.passed += 1
        else:
            todo = record.get("todo")
            function = _function_at(todo["path"], todo["line"]) if todo else None
            part.failures.append({"test": record["nodeid"], "todo": function, "traceback": record["longrepr"]})

    auto = [part for part in parts.values() if not part.manual]
    return {
        "module": module.folder_name,
        "graded_file": str(graded_file.resolve()),
        "tests": str(tests),
        "parts": [dict(asdict(part), earned=part.earned) for part in parts.values()],
        "earned": sum(part.earned for part in auto),
        "possible": sum(part.points for part in auto),
        "manual_points": sum(part.points for part in parts.values() if part.manual),
        "problems": problems,
        "all_passed": not problems and all(part.tests and part.passed == len(part.tests) for part in auto),
    }


def format_report(result: dict, source_hint: str) -> str:
    """The table `tito grade` prints, with what to do next for each failing part."""
    lines = [f"graded: {result['graded_file']}", f"tests:  {result['tests']}", "",
             f"{'part':<28} {'tests':>7} {'points':>8} {'of':>6}"]
    for part in result["parts"]:
        if part["manual"]:
            lines.append(f"{part['grade_id']:<28} {'manual':>7} {'-':>8} {part['points']:>6g}")
        else:
            tests = f"{part['passed']}/{len(part['tests'])}"
            lines.append(f"{part['grade_id']:<28} {tests:>7} {part['earned']:>8.2f} {part['points']:>6g}")
    lines.append(f"{'total (auto-graded)':<28} {'':>7} {result['earned']:>8.2f} {result['possible']:>6g}")
    if result["manual_points"]:
        lines.append(f"{result['manual_points']:g} more points are graded by hand (the reflection answers).")
    for problem in result["problems"]:
        lines += ["", "could not import or collect the tests:", problem.strip()[-2000:]]
    for part in result["parts"]:
        if not part["failures"]:
            continue
        first = part["failures"][0]
        lines.append("")
        if first["todo"]:
            lines.append(f"{part['grade_id']}: not done yet; complete the TODO in {first['todo']}() "
                         f"in {source_hint} (it still raises NotImplementedError)")
        else:
            lines.append(f"{part['grade_id']}: {len(part['failures'])} test(s) failed; first: {first['test']}")
            lines.extend("    " + line for line in first["traceback"].strip().splitlines()[-25:])
    return "\n".join(lines)

"""`tito grade`: run a module's grading tests against one exported package and add up the points.

The tests and the points are the workspace's own: run it in the course repository to grade a
student's package with `--package`, or in a student workspace to check one's own work. Points
come from the nbgrader metadata of the module source (a grade cell's `points`); a pytest test
grades the part named by its `@pytest.mark.grades("<grade_id>")` marker. A part earns its points in proportion to its tests that pass. Parts graded by hand
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

from tito.export import read_source
from tito.workspace import Module, TitoError, resolve_module


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
    for cell in read_source(module.main).cells:
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


def run_grading(module: Module, package: Path, timeout: float) -> tuple[list[dict], list[str]]:
    """Run pytest on `tests` against `package`; returns the plugin's records and any problems.

    Only the graded package is put on the path (a link to it in a scratch folder), so nothing
    else in the student's workspace, such as a folder named `tito` or `numpy`, can stand in for
    the real one.
    """
    problems = []
    with tempfile.TemporaryDirectory(prefix="tito-grade-") as scratch:
        report, path = Path(scratch) / "report.jsonl", Path(scratch) / "path"
        path.mkdir()
        (path / "tinytorch").symlink_to(package, target_is_directory=True)
        env = dict(os.environ, PYTHONPATH=str(path), TITO_GRADE_PACKAGE=str(package),
                   TITO_GRADE_MODULE=f"tinytorch.core.{module.name}", TITO_GRADE_REPORT=str(report))
        command = [sys.executable, "-m", "pytest", str(module.tests), "-p", "tito.grading_plugin", "-q",
                   "-p", "no:cacheprovider", "--rootdir", str(module.root), "--no-header",
                   "--tb=native", "--color=no"]  # plain Python tracebacks: many times faster to format
        # cwd is the scratch folder: `python -m` puts the cwd first on sys.path
        try:
            result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
            output, code = result.stdout + result.stderr, result.returncode
        except subprocess.TimeoutExpired as expired:
            output, code = f"{expired.stdout or ''}{expired.stderr or ''}", None
            problems.append(f"the tests did not finish within {timeout:g} s (an endless loop?); "
                            "the tests that had not finished count as failed")
        lines = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # the last line of a run that was killed mid-write
            continue
    if code == 3 or not any(record["kind"] == "collected" for record in records):
        raise TitoError(f"grading did not run:\n{output.strip()[-3000:]}")
    if code not in (0, 1, None):
        problems.append(f"the test run ended early (pytest exit status {code}); "
                        f"the tests that had not finished count as failed\n{output.strip()[-1500:]}")
    return records, problems


def _outcomes(records: list[dict]) -> dict[str, dict]:
    """Each collected test's result: its first failed phase, a skip, a pass, or 'did not finish'."""
    results = {record["nodeid"]: {"grades": record["grades"], "outcome": "unfinished"}
               for record in records if record["kind"] == "collected"}
    for record in records:
        if record["kind"] != "test" or record["nodeid"] not in results:
            continue
        result = results[record["nodeid"]]
        if result["outcome"] == "failed":
            continue
        if record["outcome"] in ("failed", "skipped") or (record["when"] == "call" and result["outcome"] == "unfinished"):
            result.update(outcome=record["outcome"], longrepr=record["longrepr"], todo=record["todo"])
    return results


def grade(root: Path, spec: str, package: Path | None = None, timeout: float = 600) -> dict:
    """Grade the module named by `spec` in the exported `package`; returns the full result."""
    module = resolve_module(root, spec)
    tests = module.tests
    if not tests.is_dir():
        raise TitoError(f"no grading tests for {module.folder_name}: expected them in {tests}")
    package = resolve_package(package or root)
    graded_file = package / "core" / f"{module.name}.py"
    if not graded_file.exists():
        raise TitoError(f"{graded_file} does not exist: run `tito export {module.number}` first")

    parts = {part.grade_id: part for part in graded_parts(module)}
    if not any(not part.manual for part in parts.values()):
        raise TitoError(f"{module.relative(module.source)} has no auto-graded parts; nothing to grade")
    records, problems = run_grading(module, package, timeout)
    imported = [record for record in records if record["kind"] in ("graded-file", "import-error")]
    if not imported:
        raise TitoError("the grading run did not report which file it imported; nothing was graded")
    for record in imported:
        if record["kind"] == "graded-file" and Path(record["path"]) != graded_file.resolve():
            raise TitoError(f"the tests imported {record['path']} instead of {graded_file}; nothing was graded")
        if record["kind"] == "import-error":
            problems.append(f"{graded_file} does not import: {record['error']}")
    problems.extend(record["longrepr"] for record in records if record["kind"] == "collect-error")

    for nodeid, result in _outcomes(records).items():
        if result["grades"] is None or result["outcome"] == "skipped":
            continue
        part = parts.get(result["grades"])
        if part is None:
            raise TitoError(f"{nodeid} grades {result['grades']!r}, which is not a graded part of "
                            f"{module.relative(module.source)}")
        part.tests.append(nodeid)
        if result["outcome"] == "passed":
            part.passed += 1
            continue
        todo = result.get("todo")
        function = _function_at(todo["path"], todo["line"]) if todo else None
        traceback = result.get("longrepr") or "the test did not finish: the test run ended before it"
        part.failures.append({"test": nodeid, "todo": function, "traceback": traceback})

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
        lines += ["", "problem: " + problem.strip()[-2000:]]
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

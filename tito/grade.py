"""`tito grade`: run a module's grading tests against one exported package and add up the points.

The tests and the points are the workspace's own: run it in the course repository to grade a
student's package with `--package`, or in a student workspace to check one's own work. Points
come from the nbgrader metadata of the module source (a grade cell's `points`); a pytest test
grades the part named by its `@pytest.mark.grades("<grade_id>")` marker. A part earns its points
in proportion to its tests that pass. Parts graded by hand (markdown answers) are listed with
their points, and whether they are still empty or say "YOUR ANSWER HERE", but never counted as earned here.

Failures are shown in the student's terms: the frames of the test and of the student's code,
each package line mapped back to its line in `*_dev.py` (tito/tracemap.py);
pytest's, pluggy's and hypothesis's own frames are left out. `tito test` shares this machinery.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from tito.export import read_source
from tito.grading_plugin import MODULE_ENV, PACKAGE_ENV, PART_ENV, REPORT_ENV
from tito.release import TEXT_STUB
from tito.tracemap import locate
from tito.workspace import Module, TitoError, resolve_module

TEST_PREFIX = "test-"   # a grade cell's grade_id is its part's name with this prefix
UNGRADED_ROW = "other checks"   # tests that grade no part: edge cases, and provided code run through the student's
STUBS_NAMED = 3         # a "not done yet" note names at most this many stubs


@dataclass
class Part:
    grade_id: str
    points: float
    manual: bool
    tests: list[str] = field(default_factory=list)
    passed: int = 0
    failures: list[dict] = field(default_factory=list)
    answered: bool | None = None   # a hand-graded answer: False while it is empty or says YOUR ANSWER HERE
    functions: list[str] = field(default_factory=list)   # what the part checks: "name (line N)" in the source
    section: str = ""              # the lesson's "Part N" the grade cell stands in

    @property
    def earned(self) -> float:
        return 0.0 if self.manual or not self.tests else self.points * self.passed / len(self.tests)


def graded_parts(module: Module) -> list[Part]:
    """The graded cells of the module's notebook, in order, with their points and, for an auto-graded
    part, the functions of the solution cells since the previous grade cell (what its tests check)."""
    parts, written, previous, section = [], [], [], ""
    source_lines = module.main.path.read_text(encoding="utf-8").splitlines()
    for cell in read_source(module.main).cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "markdown" and (heading := re.search(r"^##\s+(Part \d+)?", cell.source, flags=re.M)):
            section = heading.group(1) or ""
        if meta.get("solution") and cell.cell_type == "code":
            written += _written_functions(cell.source)
        if meta.get("grade"):
            manual = cell.cell_type == "markdown"
            functions = [] if manual else [_with_line(name, source_lines) for name in written] or previous
            parts.append(Part(meta["grade_id"], float(meta.get("points", 0)), manual=manual, functions=functions,
                              section=section))
            previous, written = (previous if manual else functions), []
    return parts


def _written_functions(source: str) -> list[str]:
    """The functions and `Class.method`s a solution cell defines, in order; properties are provided, not written."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    found = []
    for node in tree.body:
        inner = node.body if isinstance(node, ast.ClassDef) else [node]
        for item in inner:
            provided = any(isinstance(decorator, ast.Name) and decorator.id == "property" for decorator in
                           getattr(item, "decorator_list", []))
            if isinstance(item, ast.FunctionDef) and not provided:
                found.append(f"{node.name}.{item.name}" if isinstance(node, ast.ClassDef) else item.name)
    return found


def _with_line(name: str, source_lines: list[str]) -> str:
    """`name (line N)`, N the line of its `def` in the source (inside its class, for a method)."""
    owner, _, function = name.rpartition(".")
    start = next((index for index, text in enumerate(source_lines) if text.startswith(f"class {owner}")), 0) if owner else 0
    line = next((index + 1 for index in range(start, len(source_lines))
                 if source_lines[index].lstrip().startswith(f"def {function}(")), None)
    return f"{name} (line {line})" if line else name


def part_name(grade_id: str) -> str:
    """What `tito test` calls a part: its grade_id without the `test-` prefix."""
    return grade_id[len(TEST_PREFIX):] if grade_id.startswith(TEST_PREFIX) else grade_id


def _defined_names(source: str) -> set[str]:
    """Functions and classes a cell defines, and `Class.method` for their methods."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
    return names


def select_part(module: Module, spec: str) -> str:
    """The grade_id of the auto-graded part that `spec` names: `masked-softmax`,
    `test-masked-softmax`, `masked_softmax`, or a function or class the part's code defines."""
    cells = read_source(module.main).cells
    auto = [part.grade_id for part in graded_parts(module) if not part.manual]
    wanted = spec.strip()
    as_part = TEST_PREFIX + part_name(wanted.lower().replace("_", "-"))
    if as_part in auto:
        return as_part
    pending = False       # a cell defining `spec` was seen; the next graded cell grades it
    for cell in cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and not pending:
            names = {name.lower() for name in _defined_names(cell.source)}
            if wanted.lower() in names:
                own = TEST_PREFIX + meta.get("grade_id", "")
                if own in auto:
                    return own
                pending = True
        if pending and meta.get("grade_id") in auto:
            return meta["grade_id"]
    known = ", ".join(part_name(grade_id) for grade_id in auto)
    raise TitoError(f"{module.folder_name} has no part {spec!r}; its parts are {known} "
                    "(a function name, such as the one a part asks you to write, works too)", exit_code=2)


def is_answered(text: str) -> bool:
    """A written answer counts once it holds more than whitespace and no longer says YOUR ANSWER HERE."""
    return bool(text.strip()) and TEXT_STUB not in text


def _answers(module: Module, source: Path) -> dict[str, bool]:
    """For each hand-graded markdown answer in `source`: whether it is answered (see `is_answered`)."""
    cells = read_source(module.main, source.read_text(encoding="utf-8")).cells
    return {cell.metadata["nbgrader"]["grade_id"]: is_answered(cell.source) for cell in cells
            if cell.cell_type == "markdown" and cell.metadata.get("nbgrader", {}).get("grade")}


def resolve_package(path: Path) -> Path:
    """The `tinytorch` folder for --package, given either it or the workspace that holds it."""
    path = path.resolve()
    for candidate in (path / "tinytorch", path):
        if candidate.name == "tinytorch" and (candidate / "__init__.py").is_file():
            return candidate
    raise TitoError(f"--package {path}: expected a tinytorch package folder (with __init__.py) or a "
                    "workspace that contains one")


@lru_cache(maxsize=8)
def _parsed(path: str) -> ast.Module | None:
    try:
        return ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _function_at(path: str, line: int) -> str | None:
    """`Class.method` or `function` around `line` of a Python file, or None."""
    tree = _parsed(path)
    if tree is None:
        return None
    names, body = [], tree.body
    while True:
        around = next((node for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                       and node.lineno <= line <= node.end_lineno), None)
        if around is None:
            return ".".join(names) or None
        names.append(around.name)
        body = around.body


# Python runs `sitecustomize` from the path at start-up: this one makes `import tinytorch` load the
# graded package from where it is, with no copy and no link (links need privileges on Windows).
_ONLY_THE_GRADED_PACKAGE = """\
import importlib.util
import os
import sys

PACKAGE = {package!r}


class GradedPackage:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "tinytorch":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(PACKAGE, "__init__.py"),
                                                      submodule_search_locations=[PACKAGE])


sys.meta_path.insert(0, GradedPackage)
"""


def run_grading(module: Module, package: Path, timeout: float, part: str | None = None) -> tuple[list[dict], list[str]]:
    """Run pytest on the module's tests against `package`; returns the plugin's records and any problems.

    Only the graded package is made importable (by `_ONLY_THE_GRADED_PACKAGE`, from a scratch
    folder on the path), so nothing else in the student's workspace, such as a folder named
    `tito` or `numpy`, can stand in for the real one. `part` (a grade_id) runs only that part's tests.
    """
    problems = []
    with tempfile.TemporaryDirectory(prefix="tito-grade-") as scratch:
        report, path = Path(scratch) / "report.jsonl", Path(scratch) / "path"
        path.mkdir()
        (path / "sitecustomize.py").write_text(_ONLY_THE_GRADED_PACKAGE.format(package=str(package)), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=str(path), **{PACKAGE_ENV: str(package), REPORT_ENV: str(report),
                                                         MODULE_ENV: f"tinytorch.core.{module.name}"})
        env.pop(PART_ENV, None)
        if part is not None:
            env[PART_ENV] = part
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
            result.update(outcome=record["outcome"], longrepr=record["longrepr"], todo=record["todo"],
                          failure=record.get("failure"))
    return results


def _shown_path(path: Path, root: Path) -> str:
    for base in (root, Path.cwd()):
        try:
            return path.relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def _student_frames(frames: list[dict], module: Module, package: Path) -> list[dict]:
    """The frames of the tests and of the graded package, each package line mapped to its source."""
    tests, package = module.tests.resolve(), package.resolve()
    kept = []
    for frame in frames:
        path = Path(frame["path"])
        shown = {"function": frame["function"], "code": frame["code"].strip(), "cell": None}
        if path.is_relative_to(package):
            where = locate(path, frame["line"])
            shown.update(path=_shown_path(where.source if where else path, module.root),
                         line=where.line if where else frame["line"], cell=where.cell if where else None)
        elif path.is_relative_to(tests):
            shown.update(path=_shown_path(path, module.root), line=frame["line"])
        else:
            continue
        kept.append(shown)
    return kept


def _frame_lines(frame: dict) -> list[str]:
    return [f"{frame['path']}:{frame['line']}, in {frame['function']}", f"    {frame['code']}"]


def failure_text(failure: dict, frame_limit: int = 8, message_limit: int = 12) -> list[str]:
    """A failure as the student reads it: the innermost frames, then the exception."""
    if not failure.get("frames") and not failure.get("exception"):
        return failure["traceback"].strip().splitlines()[-25:]
    frames = failure["frames"]
    lines = [f"({len(frames) - frame_limit} outer frames not shown)"] if len(frames) > frame_limit else []
    for frame in frames[-frame_limit:]:
        lines.extend(_frame_lines(frame))
    message = [line for line in failure["exception"].strip().splitlines() if line.strip()]
    lines.extend(message[:message_limit])
    if len(message) > message_limit:
        command = " ".join(word for word in ("tito test", failure["module"], failure["part"], "-v") if word)
        lines.append(f"... ({len(message) - message_limit} more lines: {command} shows them all)")
    return lines


def _todo(todo: dict | None, module: Module) -> dict | None:
    """The stub a NotImplementedError came from: its function, source line and notebook cell."""
    if todo is None:
        return None
    where = locate(Path(todo["path"]), todo["line"])
    return {"function": _function_at(todo["path"], todo["line"]),
            "path": _shown_path(where.source, module.root) if where else None,
            "line": where.line if where else None, "cell": where.cell if where else None}


def _failure(nodeid: str, result: dict, module: Module, package: Path, part: str) -> dict:
    recorded = result.get("failure") or {}
    failure = {"test": nodeid, "todo": _todo(result.get("todo"), module),
               "frames": _student_frames(recorded.get("frames", []), module, package),
               "exception": recorded.get("exception", ""), "module": module.number, "part": part,
               "traceback": result.get("longrepr") or "the test did not finish: the test run ended before it"}
    if recorded:
        failure["traceback"] = "\n".join(failure_text(failure, frame_limit=10, message_limit=20))
    return failure


def grade(root: Path, spec: str, package: Path | None = None, timeout: float = 600, part: str | None = None) -> dict:
    """Grade the module named by `spec` in the exported `package` (default: the workspace's own);
    `part`, a grade_id, grades only that part. Returns the full result."""
    module = resolve_module(root, spec)
    tests = module.tests
    if not tests.is_dir():
        raise TitoError(f"no grading tests for {module.folder_name}: expected them in {tests}")
    own_package = package is None
    package = resolve_package(package or root)
    graded_file = package / "core" / f"{module.name}.py"
    if not graded_file.exists():
        raise TitoError(f"{graded_file} does not exist: run `tito export {module.number}` first")

    parts = {part.grade_id: part for part in graded_parts(module)}
    if not any(not part.manual for part in parts.values()):
        raise TitoError(f"{module.relative(module.source)} has no auto-graded parts; nothing to grade")
    # The answers are in the source the package was exported from: this workspace's, or the one
    # holding the --package folder (an instructor grading a student's workspace).
    answers_in = module.source if own_package else package.parent / module.relative(module.source)
    answers = _answers(module, answers_in) if answers_in.is_file() else {}
    for item in parts.values():
        if item.manual:
            item.answered = answers.get(item.grade_id)
    records, problems = run_grading(module, package, timeout, part)
    imported = [record for record in records if record["kind"] in ("graded-file", "import-error")]
    if not imported:
        raise TitoError("the grading run did not report which file it imported; nothing was graded")
    for record in imported:
        if record["kind"] == "graded-file" and Path(record["path"]) != graded_file.resolve():
            raise TitoError(f"the tests imported {record['path']} instead of {graded_file}; nothing was graded")
        if record["kind"] == "import-error":
            problems.append(f"{graded_file} does not import: {record['error']}")
    problems.extend(record["longrepr"] for record in records if record["kind"] == "collect-error")

    ungraded = {"tests": 0, "passed": 0, "failures": []}   # tests without a grades marker
    skipped = 0
    for nodeid, result in _outcomes(records).items():
        if result["outcome"] == "skipped":
            skipped += 1
            continue
        item = parts.get(result["grades"]) if result["grades"] is not None else None
        if result["grades"] is not None and item is None:
            raise TitoError(f"{nodeid} grades {result['grades']!r}, which is not a graded part of "
                            f"{module.relative(module.source)}")
        if item is None:
            ungraded["tests"] += 1
            ungraded["passed"] += result["outcome"] == "passed"
        else:
            item.tests.append(nodeid)
            item.passed += result["outcome"] == "passed"
        if result["outcome"] != "passed":
            failure = _failure(nodeid, result, module, package, part_name(item.grade_id) if item else "")
            (item.failures if item else ungraded["failures"]).append(failure)

    shown = [item for item in parts.values() if part is None or item.grade_id == part]
    auto = [item for item in shown if not item.manual]
    return {
        "module": module.folder_name,
        "number": module.number,
        "graded_file": str(graded_file.resolve()),
        "source": module.relative(module.source),
        "tests": str(tests),
        "parts": [dict(asdict(item), earned=item.earned) for item in shown],
        "earned": sum(item.earned for item in auto),
        "possible": sum(item.points for item in auto),
        "manual_points": sum(item.points for item in shown if item.manual),
        "ungraded": ungraded,
        "skipped": skipped,
        "problems": problems,
        "all_passed": not problems and all(item.tests and item.passed == len(item.tests) for item in auto),
    }


def _todo_note(failures: list[dict], source_hint: str) -> str | None:
    """'not done yet: ...' when every failure is a stub still raising NotImplementedError."""
    if not failures or any(failure["todo"] is None for failure in failures):
        return None
    stubs: dict[str, dict] = {}
    for failure in failures:
        stubs.setdefault(failure["todo"]["function"] or "a function", failure["todo"])
    named = []
    for function, todo in list(stubs.items())[:STUBS_NAMED]:
        elsewhere = f"{todo['path']}:" if todo["path"] != source_hint else "line "
        named.append(f"{function}() ({elsewhere}{todo['line']})" if todo["line"] else f"{function}()")
    more = f" and {len(stubs) - STUBS_NAMED} more" if len(stubs) > STUBS_NAMED else ""
    return f"not done yet: {', '.join(named)}{more} still raise{'s' if len(stubs) == 1 else ''} NotImplementedError"


def _first_real_failure(part: dict) -> dict | None:
    return next((failure for failure in part["failures"] if failure["todo"] is None), None)


def _answer_lines(result: dict) -> list[str]:
    manual = [part for part in result["parts"] if part["manual"]]
    missing = [part["grade_id"] for part in manual if part["answered"] is False]
    lines = []
    if missing:
        lines.append(f"{len(missing)} of {len(manual)} written answers are still empty or say {TEXT_STUB!r}: "
                     f"{', '.join(missing)} (markdown cells in {result['source']})")
    elif manual and all(part["answered"] for part in manual):
        lines.append(f"all {len(manual)} written answers are filled in; they are graded by hand")
    return lines


def _section_width(parts: list[dict]) -> int:
    """The width of the lesson's "Part N" column: none when the lesson has no numbered parts."""
    return max((len(part.get("section", "")) for part in parts), default=0) + 1 if any(
        part.get("section") for part in parts) else 0


def format_report(result: dict, source_hint: str) -> str:
    """The table `tito grade` prints, with what to do next for each failing part."""
    width = _section_width(result["parts"])
    lines = [f"graded: {result['graded_file']}", f"tests:  {result['tests']}", "",
             f"{'':<{width}}{'part':<28} {'tests':>7} {'points':>8} {'of':>6}"]
    for part in result["parts"]:
        where = f"{part.get('section', ''):<{width}}"
        if part["manual"]:
            status = {True: "answered", False: "TODO", None: "manual"}[part["answered"]]
            lines.append(f"{where}{part['grade_id']:<28} {status:>8} {'-':>7} {part['points']:>6g}")
        else:
            tests = f"{part['passed']}/{len(part['tests'])}"
            lines.append(f"{where}{part['grade_id']:<28} {tests:>7} {part['earned']:>8.2f} {part['points']:>6g}")
    lines.append(f"{'':<{width}}{'total (auto-graded)':<28} {'':>7} {result['earned']:>8.2f} {result['possible']:>6g}")
    if result["manual_points"]:
        lines.append(f"{result['manual_points']:g} more points are graded by hand (the written answers).")
    lines.extend(_answer_lines(result))
    for problem in result["problems"]:
        lines += ["", "problem: " + problem.strip()[-2000:]]
    for part in result["parts"]:
        if not part["failures"]:
            continue
        lines.append("")
        note = _todo_note(part["failures"], source_hint)
        if note:
            lines.append(f"{part['grade_id']}: {note} (lines of {source_hint})")
            continue
        first = _first_real_failure(part)
        lines.append(f"{part['grade_id']}: {len(part['failures'])} test(s) failed; first: {first['test']}")
        if part.get("functions"):
            lines.append(f"    it checks your {', '.join(part['functions'])}")
        lines.extend("    " + line for line in first["traceback"].strip().splitlines()[-25:])
    return "\n".join(lines)


def format_summary(result: dict, source_hint: str, selected: bool) -> str:
    """What `tito test` prints by default: tests passed per part, and each failing part's first failure."""
    rows = [(part_name(part["grade_id"]), part) for part in result["parts"] if not part["manual"]]
    passed = sum(row["passed"] for _, row in rows)
    total = sum(len(row["tests"]) if isinstance(row["tests"], list) else row["tests"] for _, row in rows)
    ungraded = result["ungraded"]
    if ungraded["tests"]:
        rows.append((UNGRADED_ROW, ungraded))
    width = _section_width(result["parts"])
    sections = {part_name(part["grade_id"]): part.get("section", "") for part in result["parts"]}
    lines = [f"tito test {result['module']}: the tests of {result['tests']} against {result['graded_file']}",
             f"(lines below are those of {source_hint})", "",
             f"{'':<{width}}{'part':<26} {'passed':>7}  status"]
    details: list[str] = []
    for name, row in rows:
        count = row["tests"] if isinstance(row["tests"], int) else len(row["tests"])
        note = _todo_note(row["failures"], source_hint)
        if name == UNGRADED_ROW:
            status = "ok" if not row["failures"] else "not graded: edge cases and provided code, run through your code"
        elif not count:
            status = "no tests"
        elif not row["failures"]:
            status = "ok"
        elif note:
            status = note
        else:
            first = _first_real_failure(row)
            status = f"{len(row['failures'])} failed"
            details += ["", f"{name}: first failure of {len(row['failures'])}: {first['test']}"]
            if row.get("functions"):
                details.append(f"    it checks your {', '.join(row['functions'])}")
            details += ["    " + line for line in failure_text(first, frame_limit=4, message_limit=10)]
        lines.append(f"{sections.get(name, ''):<{width}}{name:<26} {str(row['passed']) + '/' + str(count):>7}  {status}")
    lines.extend(_answer_lines(result))
    for problem in result["problems"]:
        lines += ["", "problem: " + "\n".join(problem.strip().splitlines()[-15:])]
    lines.extend(details)
    if not selected and total != passed:
        lines += ["", f"One part's tests: tito test {result['number']} PART (e.g. tito test {result['number']} "
                  f"{rows[0][0]}); pytest's full output: tito test {result['number']} -v"]
    skipped = f", {result['skipped']} skipped" if result["skipped"] else ""
    lines += ["", f"{passed} passed, {total - passed} failed{skipped}"]
    return "\n".join(lines)

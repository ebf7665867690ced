"""`tito test` and `tito grade` as a student meets them, on a two-part toy module built here.

The toy workspace is small enough that every command runs in a second or two, and its parts,
stubs and written answer are fixed by this file, whatever the course's own modules look like.
"""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

from tito.freshness import changes_since_export
from tito.tracemap import CELL_HEADER, locate

REPO = Path(__file__).resolve().parents[2]
SOURCE = "modules/97_toy/toy_dev.py"
PACKAGE_FILE = "tinytorch/core/toy.py"
STUB = "    # YOUR CODE HERE\n    raise NotImplementedError()"
ADD_ONE = "    return np.asarray(x) + 1"
HALVE = "    return np.asarray(x, dtype=float) / 2"
ANSWER = "YOUR ANSWER HERE"

TOY_SOURCE = '''\
# %%
#| default_exp core.toy

# %%
#| export
import numpy as np

# %% [markdown]
# ## Part 1: add one

# %% nbgrader={{"grade": false, "grade_id": "add-one", "locked": false, "schema_version": 3, "solution": true}}
#| export
def add_one(x):
    """`x` plus one, elementwise."""
{add_one}

# %% nbgrader={{"grade": true, "grade_id": "test-add-one", "locked": true, "points": 2, "schema_version": 3, "solution": false}}
print("add_one checked by the tests")

# %% [markdown]
# ## Part 2: halve

# %% nbgrader={{"grade": false, "grade_id": "halve", "locked": false, "schema_version": 3, "solution": true}}
#| export
def halve(x):
    """`x` divided by two, as floats."""
{halve}

# %% nbgrader={{"grade": true, "grade_id": "test-halve", "locked": true, "points": 3, "schema_version": 3, "solution": false}}
print("halve checked by the tests")

# %% [markdown] nbgrader={{"grade": true, "grade_id": "reflection-why", "locked": false, "points": 1, "schema_version": 3, "solution": true}}
# {answer}
'''

TOY_TESTS = '''\
import numpy as np
import pytest

from tinytorch.core.toy import add_one, halve


@pytest.mark.grades("test-add-one")
@pytest.mark.parametrize("x", [0, 1, 2])
def test_add_one(x):
    assert add_one(x) == x + 1


@pytest.mark.grades("test-halve")
def test_halve_an_array():
    np.testing.assert_allclose(halve(np.array([2.0, 4.0])), [1.0, 2.0])


@pytest.mark.grades("test-halve")
def test_halve_an_integer():
    assert halve(3) == 1.5


def test_adding_one_then_halving():
    assert halve(add_one(1)) == 1.0
'''


def tito(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tito.cli", *args], capture_output=True, text=True, cwd=cwd)


def write_source(root: Path, add_one=STUB, halve=STUB, answer=ANSWER) -> None:
    (root / SOURCE).write_text(TOY_SOURCE.format(add_one=add_one, halve=halve, answer=answer))


def make_toy_workspace(root: Path, **parts) -> Path:
    """A workspace holding only the toy module, exported once as a release would be."""
    for name in ("pyproject.toml", "tinytorch/__init__.py", "tinytorch/core/__init__.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    (root / "modules/97_toy").mkdir(parents=True)
    (root / "tests/97_toy").mkdir(parents=True)
    (root / "tests/97_toy/test_toy.py").write_text(TOY_TESTS)
    write_source(root, **parts)
    exported = tito("export", "97", cwd=root)
    assert exported.returncode == 0, exported.stderr
    return root


@pytest.fixture(scope="module")
def blank_toy(tmp_path_factory):
    return make_toy_workspace(tmp_path_factory.mktemp("blank") / "toy")


@pytest.fixture(scope="module")
def toy_course(tmp_path_factory):
    """The toy's course workspace, with the solutions: for grading a student's --package. Read only."""
    return make_toy_workspace(tmp_path_factory.mktemp("course") / "course", add_one=ADD_ONE, halve=HALVE)


@pytest.fixture
def toy(blank_toy, tmp_path):
    """A fresh copy of the exported blank toy workspace, for one test to change."""
    return Path(shutil.copytree(blank_toy, tmp_path / "toy"))


def line_of(root: Path, text: str) -> int:
    lines = (root / SOURCE).read_text().splitlines()
    return next(number for number, line in enumerate(lines, start=1) if text in line)


# ----------------------------------------------------------------------------- never stale
def test_an_edit_that_was_not_exported_is_exported_before_testing(toy):
    write_source(toy, add_one=ADD_ONE)                     # edited, not exported
    assert changes_since_export(toy)
    result = tito("test", "97", cwd=toy)
    first = result.stdout.splitlines()[0]
    assert first == ("tito test: modules/97_toy/toy_dev.py changed since the last export; "
                     "exported first, as `tito export 97` does")
    assert re.search(r"^(?:Part \d+\s+|\s+)?add-one\s+3/3\s+ok$", result.stdout, flags=re.M), result.stdout
    assert ADD_ONE in (toy / PACKAGE_FILE).read_text()
    assert changes_since_export(toy) == {}
    assert result.returncode == 1                            # halve is still a stub

    write_source(toy, add_one=ADD_ONE, halve=HALVE, answer="Halving twice quarters.")
    graded = tito("grade", "97", cwd=toy)
    assert "tito grade: modules/97_toy/toy_dev.py changed since the last export; exported first" in graded.stdout
    assert graded.returncode == 0, graded.stdout + graded.stderr
    assert re.search(r"total \(auto-graded\)\s+5\.00\s+5", graded.stdout)


def test_a_notebook_edit_is_exported_before_grading(toy):
    notebook_path = toy / "modules/97_toy/toy_dev.ipynb"
    notebook = jupytext.read(notebook_path)
    for cell in notebook.cells:
        if "def add_one" in cell.source:
            cell.source = cell.source.replace(STUB, ADD_ONE)
    jupytext.write(notebook, notebook_path)
    result = tito("grade", "97", "--json", "-", cwd=toy)
    assert "modules/97_toy/toy_dev.ipynb changed since the last export; exported first" in result.stderr
    parts = {part["grade_id"]: part for part in json.loads(result.stdout)["parts"]}
    assert parts["test-add-one"]["earned"] == 2 and parts["test-halve"]["earned"] == 0
    assert ADD_ONE in (toy / SOURCE).read_text()             # the notebook's edit reached the source too


def test_a_notebook_saved_with_outputs_only_needs_no_export(toy, save_with_outputs):
    notebook_path = toy / "modules/97_toy/toy_dev.ipynb"
    notebook = save_with_outputs(notebook_path, "ran\n")
    assert changes_since_export(toy) == {}
    result = tito("test", "97", cwd=toy)
    assert "changed since the last export" not in result.stdout
    assert json.loads(notebook_path.read_text())["cells"] == notebook["cells"]   # outputs kept


def test_when_the_export_is_refused_nothing_is_tested_and_nothing_is_lost(toy):
    package_file = toy / PACKAGE_FILE
    package_file.write_text(package_file.read_text() + "\n# my own change\n")
    write_source(toy, add_one=ADD_ONE)
    source, package = (toy / SOURCE).read_text(), package_file.read_text()
    result = tito("test", "97", cwd=toy)
    assert result.returncode == 1
    assert "changed since the last export, and exporting it failed, so nothing was tested" in result.stderr
    assert "tinytorch/core/toy.py was edited by hand" in result.stderr
    assert "passed" not in result.stdout
    assert (toy / SOURCE).read_text() == source and package_file.read_text() == package


def test_grading_an_explicit_package_does_not_export(toy, toy_course):
    course = toy_course
    write_source(toy, add_one=ADD_ONE)                     # the student's newer, unexported edit
    result = tito("grade", "97", "--package", str(toy), "--json", "-", cwd=course)
    assert "changed since the last export" not in result.stdout + result.stderr
    parts = {part["grade_id"]: part for part in json.loads(result.stdout)["parts"]}
    assert parts["test-add-one"]["earned"] == 0                 # graded as exported: still the stub
    assert changes_since_export(toy)                            # and the student's files untouched


# ----------------------------------------------------------------------------- the summary
def test_the_summary_names_every_part_left_to_do(toy):
    result = tito("test", "97", cwd=toy)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) < 20, result.stdout
    line = line_of(toy, "raise NotImplementedError")
    assert re.search(rf"^(?:Part \d+\s+|\s+)?add-one\s+0/3\s+not done yet: add_one\(\) \(line {line}\) "
                     r"still raises NotImplementedError$", result.stdout, flags=re.M), result.stdout
    assert re.search(r"^(?:Part \d+\s+|\s+)?halve\s+0/2\s+not done yet: halve\(\)", result.stdout, flags=re.M)
    assert re.search(r"^(?:Part \d+\s+|\s+)?other checks\s+0/1\s+not graded: ", result.stdout, flags=re.M)
    assert lines[-1] == "0 passed, 5 failed"
    assert "Traceback" not in result.stdout and "_pytest" not in result.stdout


def test_a_failing_part_shows_its_first_failure_in_a_few_lines(toy):
    write_source(toy, add_one=ADD_ONE, halve="    return np.asarray(x, dtype=float) / 3")
    result = tito("test", "97", cwd=toy)
    assert result.returncode == 1
    block = result.stdout.split("halve: first failure of 2: ", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block[0] == "tests/97_toy/test_toy.py::test_halve_an_array"
    assert block[1].strip() == f"it checks your halve (line {line_of(toy, 'def halve')})"
    assert block[2].strip().startswith("tests/97_toy/test_toy.py:")
    assert "Mismatched elements: 2 / 2" in result.stdout
    assert len(block) <= 17
    assert re.search(r"^(?:Part \d+\s+|\s+)?other checks\s+0/1\s+not graded: ", result.stdout, flags=re.M)
    assert result.stdout.splitlines()[-1] == "3 passed, 2 failed"


# ----------------------------------------------------------------------------- one part
@pytest.mark.parametrize("spec", ["halve", "test-halve", "HALVE"])
def test_one_part_runs_only_its_tests(toy, spec):
    result = tito("test", "97", spec, cwd=toy)
    rows = [line for line in result.stdout.splitlines() if re.match(r"^(?:Part \d+\s+)?\S+\s+\d+/\d+\s", line)]
    assert len(rows) == 1 and re.match(r"(Part \d+\s+)?halve ", rows[0]) and " 0/2 " in rows[0], result.stdout
    assert result.stdout.splitlines()[-1] == "0 passed, 2 failed"


def test_a_part_is_found_by_its_function_name(toy):
    write_source(toy, add_one=ADD_ONE)
    result = tito("test", "97", "add_one", cwd=toy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^(?:Part \d+\s+|\s+)?add-one\s+3/3\s+ok$", result.stdout, flags=re.M)
    assert "halve" not in result.stdout


def test_an_unknown_part_lists_the_parts(toy):
    result = tito("test", "97", "softmax", cwd=toy)
    assert result.returncode == 2
    assert "97_toy has no part 'softmax'; its parts are add-one, halve" in result.stderr


def test_a_test_file_after_the_separator_runs_only_that_file(toy):
    (toy / "tests/97_toy/test_other.py").write_text("def test_other():\n    assert True\n")
    result = tito("test", "97", "--", "tests/97_toy/test_other.py", "-q", cwd=toy)
    assert result.returncode == 0, result.stdout
    assert re.search(r"^1 passed", result.stdout.splitlines()[-1])
    node = tito("test", "97", "--", "tests/97_toy/test_toy.py::test_halve_an_integer", "-q", cwd=toy)
    assert node.returncode == 1 and re.search(r"^1 failed", node.stdout.splitlines()[-1])


def test_verbose_shows_pytest_output_for_one_part(toy):
    result = tito("test", "97", "add-one", "-v", cwd=toy)
    assert result.returncode == 1
    assert "test_toy.py::test_add_one[0] FAILED" in result.stdout
    assert "test_halve" not in result.stdout
    assert "3 failed, 3 deselected" in result.stdout


def test_help_shows_how_to_run_one_part(capsys):
    from tito.cli import main

    with pytest.raises(SystemExit):
        main(["test", "--help"])
    out = capsys.readouterr().out
    assert "tito test 13 masked-softmax" in out and "tito test 13 masked_softmax" in out
    assert "tito test 13 -- tests/13_attention/test_masked_softmax.py" in out


# ----------------------------------------------------------------------------- tracebacks
def test_a_crash_is_shown_at_the_students_line_and_cell(toy, toy_course):
    crash = "    halves = np.asarray(x) / two"
    write_source(toy, add_one=ADD_ONE, halve=crash + "\n    return halves")
    result = tito("grade", "97", cwd=toy)
    assert result.returncode == 1
    expected = f"modules/97_toy/toy_dev.py:{line_of(toy, crash)}, in halve"
    assert expected in result.stdout, result.stdout
    assert crash.strip() in result.stdout and "NameError: name 'two' is not defined" in result.stdout
    failure = result.stdout.split("test-halve: ", 1)[1]
    for internal in ("_pytest", "pluggy", "site-packages", "tito-grade-", PACKAGE_FILE):
        assert internal not in failure, internal

    # An instructor grading that workspace's package from elsewhere sees the student's file.
    graded = tito("grade", "97", "--package", str(toy), cwd=toy_course)
    assert f"{toy / SOURCE}:{line_of(toy, crash)}, in halve" in graded.stdout


def test_tracemap_maps_every_exported_line_of_the_course_package_to_the_same_text():
    for package_file in sorted((REPO / "tinytorch/core").glob("*.py")):
        lines = package_file.read_text().splitlines()
        if not any(CELL_HEADER.match(line) for line in lines):
            continue
        code = [number for number, line in enumerate(lines, start=1)
                if line.strip() and not line.startswith("# %%") and number > 5]
        mapped = {number: locate(package_file, number) for number in code}
        found = {number: where for number, where in mapped.items() if where is not None}
        assert len(found) >= 0.95 * len(code), package_file.name
        for number, where in found.items():
            assert where.source.read_text().splitlines()[where.line - 1].rstrip() == lines[number - 1].rstrip()
        cells = jupytext.read(next(iter(found.values())).source).cells
        assert all(1 <= where.cell <= len(cells) and cells[where.cell - 1].cell_type == "code"
                   for where in found.values())


# ----------------------------------------------------------------------------- written answers
def test_grade_names_the_answers_still_to_write(toy):
    result = tito("grade", "97", cwd=toy)
    assert re.search(r"^(?:Part \d+\s+|\s+)?reflection-why\s+TODO\s+-\s+1$", result.stdout, flags=re.M), result.stdout
    assert ("1 of 1 written answers are still empty or say 'YOUR ANSWER HERE': reflection-why "
            "(markdown cells in modules/97_toy/toy_dev.py)") in result.stdout
    write_source(toy, answer="Because a half of a half is a quarter.")
    result = tito("grade", "97", "--json", "-", cwd=toy)
    assert "all 1 written answers are filled in" in result.stderr
    manual = [part for part in json.loads(result.stdout)["parts"] if part["manual"]]
    assert [(part["grade_id"], part["answered"]) for part in manual] == [("reflection-why", True)]


@pytest.mark.parametrize("answer", ["", "   ", "\t \n#\n#   ", "  YOUR ANSWER HERE  ",
                                    "YOUR ANSWER HERE\n#\n# (later)"])
def test_an_empty_answer_or_the_stub_is_not_an_answer(toy, answer):
    """Deleting the stub and leaving nothing, or only whitespace, answers nothing."""
    write_source(toy, answer=answer)
    result = tito("grade", "97", "--json", "-", cwd=toy)
    assert "1 of 1 written answers are still empty or say 'YOUR ANSWER HERE': reflection-why" in result.stderr
    manual = [part for part in json.loads(result.stdout)["parts"] if part["manual"]]
    assert [(part["grade_id"], part["answered"]) for part in manual] == [("reflection-why", False)]


def test_is_answered_needs_text_other_than_the_stub():
    from tito.grade import is_answered

    assert not any(is_answered(text) for text in ("", " ", "\n\t\n", "YOUR ANSWER HERE", "\nYOUR ANSWER HERE\n"))
    assert is_answered("The cache holds 2 x 32 x 128 numbers per token.")


# ----------------------------------------------------------------------------- run timings
def test_tito_run_reports_each_cells_time(toy, tmp_path):
    write_source(toy, add_one=ADD_ONE, halve=HALVE)
    report = tmp_path / "times.json"
    result = tito("run", "97", "--json", str(report), "--figures", str(tmp_path / "figures"), cwd=toy)
    assert result.returncode == 0, result.stdout + result.stderr
    timings = json.loads(report.read_text())
    assert timings["passed"] is True and timings["module"] == "97_toy"
    assert [cell["cell"] for cell in timings["cells"]] == [1, 2, 4, 5, 7, 8]
    assert all(cell["seconds"] >= 0 for cell in timings["cells"])
    assert re.search(r"^slowest cell: toy_dev\.py:\d+ \([\w ]+\) .+, \d+\.\d\ds$", result.stdout, flags=re.M)
    assert [cell["place"] for cell in timings["cells"]][0].startswith("toy_dev.py:")

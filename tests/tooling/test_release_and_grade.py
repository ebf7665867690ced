"""The student loop: release without solutions, export, and grading that cannot pass by accident."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tito.export import read_source
from tito.mutate import load_mutations
from tito.release import BEGIN_SOLUTION, END_SOLUTION, release
from tito.workspace import resolve_module

SOURCE = "modules/13_attention/attention_dev.py"
CAUSAL_STUB = ("masked out (a `CausalMask` to callers outside).\n    \"\"\"\n"
               "    # YOUR CODE HERE\n    raise NotImplementedError('create_causal_mask, Part 1 (masks): your code goes here')")
CAUSAL_DONE = ("masked out (a `CausalMask` to callers outside).\n    \"\"\"\n"
               "    return np.tril(np.ones((seq_len, key_len), dtype=np.float32), k=key_len - seq_len)")
PADDING_STUB = ("1 = a real token, 0 = padding.\n    \"\"\"\n"
                "    # YOUR CODE HERE\n    raise NotImplementedError('create_padding_mask, Part 1 (masks): your code goes here')")
PADDING_DONE = ("1 = a real token, 0 = padding.\n    \"\"\"\n"
                "    return (np.arange(key_len)[None, :] < lengths[:, None])[:, None, None, :].astype(np.float32)")


def fill_masks(source: str) -> str:
    """The student's answer to the first part (both masks), written into a released source."""
    return source.replace(CAUSAL_STUB, CAUSAL_DONE).replace(PADDING_STUB, PADDING_DONE)


def tito(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tito.cli", *args], capture_output=True, text=True, cwd=cwd)


def solution_lines(source: str) -> set[str]:
    """Non-empty lines inside solution regions, without comment markers."""
    found, inside = set(), False
    for line in source.splitlines():
        if BEGIN_SOLUTION in line:
            inside = True
        elif END_SOLUTION in line:
            inside = False
        elif inside and line.strip().lstrip("#").strip():
            found.add(line.strip().lstrip("#").strip())
    return found


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """One blank student release, shared by the tests that only read it."""
    course = Path(__file__).resolve().parents[2]
    out = tmp_path_factory.mktemp("student")
    release(course, resolve_module(course, "13"), out)
    return out


def test_no_solution_line_appears_anywhere_in_the_release(released, repo_root):
    source = (repo_root / SOURCE).read_text()
    outside = source
    for region in re.findall(rf"{BEGIN_SOLUTION}.*?{END_SOLUTION}", source, flags=re.S):
        outside = outside.replace(region, "")
    secret = {line for line in solution_lines(source) if line not in outside}
    assert len(secret) > 40                                             # the check looks at real content
    # the mutation table quotes the solutions and their buggy variants: it stays with the instructor
    assert (repo_root / "modules/13_attention/mutations.toml").is_file()
    assert not list(released.rglob("mutations*")), "tito release shipped the mutation table"
    mutations = load_mutations(resolve_module(repo_root, "13"))
    secret |= {mutation.replace.strip() for mutation in mutations                # the buggy code, never written
               if len(mutation.replace.strip()) > 20 and mutation.replace.strip() not in source}
    for path in released.rglob("*"):
        if path.is_file():
            content = path.read_bytes()                                   # the stored expected values are binary
            leaked = [line for line in secret if line.encode("utf-8") in content]
            assert not leaked, f"{path.relative_to(released)} shows solution lines: {leaked[:3]}"


def test_release_replaces_regions_with_stubs_and_keeps_metadata(released, repo_root):
    original = read_source(resolve_module(repo_root, "13").main)
    student = read_source(resolve_module(released, "13").main)
    assert len(student.cells) == len(original.cells)
    for before, after in zip(original.cells, student.cells):
        added = {key: after.metadata.get("nbgrader", {}).get(key) for key in ("checksum", "cell_type")}
        kept = {key: value for key, value in after.metadata.get("nbgrader", {}).items() if key not in added}
        assert kept == before.metadata.get("nbgrader", {})                # nbgrader adds checksums, changes nothing
        meta = before.metadata.get("nbgrader", {})
        if meta.get("solution") and before.cell_type == "code":
            assert "# YOUR CODE HERE" in after.source and "raise NotImplementedError(" in after.source
            stubs = re.findall(r"raise NotImplementedError\('([\w.]+), (Part \d+) \(([\w-]+)\): your code goes here'\)",
                               after.source)
            assert stubs and all(grade_id == meta["grade_id"] for _, _, grade_id in stubs), after.source
        elif meta.get("solution"):
            assert after.source == "YOUR ANSWER HERE"
        else:
            assert after.source == before.source                       # locked and grade cells unchanged
    assert CAUSAL_STUB in (released / SOURCE).read_text()               # stub at the region's indentation


def nbgrader_cells(notebook_path: Path) -> list:
    import nbformat

    return [cell for cell in nbformat.read(notebook_path, as_version=4).cells if "nbgrader" in cell.metadata]


def assert_locked_and_checksummed(notebook_path: Path, answered=()) -> int:
    """Every test and provided cell is non-editable and non-deletable, solution cells are non-deletable,
    and every nbgrader cell carries the checksum nbgrader computes for it, except the solution cells
    `answered` since the release, whose checksum no longer matches; returns the number of locked cells."""
    from nbgrader.utils import compute_checksum, is_locked, is_solution

    locked = 0
    for cell in nbgrader_cells(notebook_path):
        grade_id = cell.metadata.nbgrader["grade_id"]
        matches = cell.metadata.nbgrader.get("checksum") == compute_checksum(cell)
        assert matches != (grade_id in answered), f"{grade_id}: checksum"
        assert cell.metadata.nbgrader.get("cell_type") == cell.cell_type, grade_id
        assert cell.metadata.get("deletable") is False, f"{grade_id} can be deleted"
        if is_locked(cell):
            assert cell.metadata.get("editable") is False, f"{grade_id} can be edited"
            locked += 1
        else:
            assert is_solution(cell) and cell.metadata.get("editable", True) is True, grade_id
    return locked


def test_test_and_provided_cells_are_locked_with_nbgrader_checksums(released):
    notebook = released / "modules/13_attention/attention_dev.ipynb"
    cells = nbgrader_cells(notebook)
    tests = [cell for cell in cells if cell.metadata.nbgrader.get("grade") and cell.cell_type == "code"]
    assert len(tests) == 20 and all(cell.metadata.nbgrader["locked"] for cell in tests)
    assert assert_locked_and_checksummed(notebook) == 21                # 20 graded tests and the integration test
    source = (released / SOURCE).read_text()                           # the paired .py carries them too
    assert source.count(" deletable=false editable=false nbgrader=") == 21
    assert source.count('"checksum": ') == len(cells)


def test_lock_flags_and_checksums_survive_the_students_export(tmp_path, repo_root):
    """tito export rebuilds the notebook from the .py, and copies notebook edits back into the .py."""
    import nbformat

    out = tmp_path / "student"
    assert tito("release", "13", "--out", str(out), cwd=repo_root).returncode == 0
    notebook_path, source = out / "modules/13_attention/attention_dev.ipynb", out / SOURCE
    assert not list(out.rglob("*.bak*"))                               # the release wrote a consistent pair
    assert tito("export", "13", cwd=out).stdout == "export: everything already up to date\n"
    source.write_text(fill_masks(source.read_text()))                  # the student edits the .py
    exported = tito("export", "13", cwd=out)
    assert exported.returncode == 0 and "wrote modules/13_attention/attention_dev.ipynb" in exported.stdout
    assert any(CAUSAL_DONE in cell.source for cell in nbgrader_cells(notebook_path))
    assert assert_locked_and_checksummed(notebook_path, answered={"masks"}) == 21

    notebook = nbformat.read(notebook_path, as_version=4)              # then edits the notebook, as Jupyter saves it
    answer = next(cell for cell in notebook.cells
                  if cell.metadata.get("nbgrader", {}).get("grade_id") == "reflection-memory")
    answer.source = "Blocked attention never forms the 128 GiB of weights."
    nbformat.write(notebook, notebook_path)
    exported = tito("export", "13", cwd=out)
    assert exported.returncode == 0 and "updated from the edits made in" in exported.stdout, exported.stdout
    assert "Blocked attention never forms" in source.read_text()
    assert source.read_text().count(" deletable=false editable=false nbgrader=") == 21
    assert assert_locked_and_checksummed(notebook_path, answered={"masks", "reflection-memory"}) == 21


def nbgrader_validate(notebook: Path, workspace: Path) -> str:
    """`nbgrader validate` as a student runs it (it executes the notebook); its report, whitespace normalised."""
    result = subprocess.run(["nbgrader", "validate", str(notebook)], capture_output=True, text=True,
                            cwd=notebook.parent, env=dict(os.environ, PYTHONPATH=str(workspace)))
    assert result.returncode == 0, result.stderr
    return result.stdout


def reported_cells(report: str, heading: str) -> list[str]:
    """The first source line of each cell that `nbgrader validate` reports under `heading`."""
    blocks = report.split("=" * 90)[1:]
    return [block.split(heading, 1)[1].strip().splitlines()[0].strip() for block in blocks if heading in block]


def test_nbgrader_validate_lists_the_unanswered_answers_and_failing_tests(released):
    report = nbgrader_validate(released / "modules/13_attention/attention_dev.ipynb", released)
    assert " ".join(report.split()).startswith("VALIDATION FAILED ON 23 CELL(S)!")
    failed = reported_cells(report, "The following cell failed:")
    assert failed.count("YOUR ANSWER HERE") == 3                       # the three written answers
    assert "You did not provide a response." in report
    tests = [line for line in failed if line != "YOUR ANSWER HERE"]
    assert len(tests) == 20 and "def test_unit_masks():" in tests and "NotImplementedError" in report


def test_nbgrader_validate_flags_an_edited_test_cell(released, tmp_path):
    import nbformat

    notebook = nbformat.read(released / "modules/13_attention/attention_dev.ipynb", as_version=4)
    test_cell = next(cell for cell in notebook.cells
                     if cell.metadata.get("nbgrader", {}).get("grade_id") == "test-masks")
    assert "assert offset_mask.offset == 3" in test_cell.source
    test_cell.source = test_cell.source.replace("assert offset_mask.offset == 3", "assert offset_mask.offset >= 0")
    edited = tmp_path / "attention_dev.ipynb"
    nbformat.write(notebook, edited)
    report = nbgrader_validate(edited, released)
    assert "THE CONTENTS OF 1 TEST CELL(S) HAVE CHANGED!" in " ".join(report.split())
    assert reported_cells(report, "The following cell has changed:") == ["def test_unit_masks():"]


def test_release_without_nbgrader_stops_and_writes_nothing(tmp_path, repo_root):
    out = tmp_path / "student"
    without_nbgrader = ("import sys; sys.modules['nbgrader'] = None; from tito.cli import main; "
                        f"sys.exit(main(['release', '13', '--out', {str(out)!r}]))")
    result = subprocess.run([sys.executable, "-c", without_nbgrader], capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 1
    assert 'tito release needs nbgrader' in result.stderr and 'pip install -e ".[instructor]"' in result.stderr
    assert "Nothing was written" in result.stderr and not out.exists()


def test_release_never_overwrites_without_force(tmp_path, repo_root):
    released = tmp_path / "student"
    assert tito("release", "13", "--out", str(released), cwd=repo_root).returncode == 0
    student_source = released / SOURCE
    student_source.write_text(fill_masks(student_source.read_text()))
    work = student_source.read_text()
    result = tito("release", "13", "--out", str(released), cwd=repo_root)
    assert result.returncode == 1 and "nothing was written" in result.stderr
    assert student_source.read_text() == work

    result = tito("release", "13", "--out", str(released), "--force", cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert "kept your previous modules/13_attention/attention_dev.py as" in result.stdout
    assert (released / (SOURCE + ".bak")).read_text() == work           # the student's work survives
    assert CAUSAL_STUB in student_source.read_text()


def test_release_into_the_course_itself_is_refused(repo_root):
    result = tito("release", "13", "--out", str(repo_root), "--force", cwd=repo_root)
    assert result.returncode == 1 and "replace the solutions" in result.stderr


def test_blank_release_imports_and_every_todo_raises(released):
    code = """
import numpy as np
from tinytorch.core import attention as a
calls = {
    "create_causal_mask": lambda: a.create_causal_mask(3),
    "create_padding_mask": lambda: a.create_padding_mask(np.array([1, 2]), 2),
    "masked_softmax": lambda: a.masked_softmax(np.zeros((2, 2))),
    "math_attention": lambda: a.math_attention(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4))),
    "attention_with_dropout": lambda: a.attention_with_dropout(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4)),
                                                              None, 0.5, 0.5, np.random.default_rng(0)),
    "split_heads": lambda: a.split_heads(np.ones((1, 2, 4)), 2),
    "merge_heads": lambda: a.merge_heads(np.ones((1, 2, 2, 2))),
    "repeat_kv_heads": lambda: a.repeat_kv_heads(np.ones((1, 1, 2, 2)), 2),
    "MultiHeadAttention.__init__": lambda: a.MultiHeadAttention(4, 2, seed=0),
    "KVCache.update": lambda: a.KVCache(1, 4, 2, 2).update(0, np.ones((2, 1, 2)), np.ones((2, 1, 2))),
    "KVCache.get_memory_usage": lambda: a.KVCache(1, 4, 2, 2).get_memory_usage(),
    "KVCache.append": lambda: a.KVCache(1, 4, 2, 2).append(np.ones((1, 2, 1, 2)), np.ones((1, 2, 1, 2))),
    "blocked_attention": lambda: a.blocked_attention(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4))),
    "AttentionProfiler.measure_time": lambda: a.AttentionProfiler().measure_time(lambda: None),
    "AttentionProfiler.fit_exponent": lambda: a.AttentionProfiler.fit_exponent([1, 2], [1, 4]),
    "AttentionProfiler.peak_memory": lambda: a.AttentionProfiler.peak_memory(lambda: None),
    "PagedKVCache.append_tokens": lambda: (lambda c: c.append_tokens(c.add_sequence(), np.ones((1, 1, 1)),
                                                                    np.ones((1, 1, 1))))(a.PagedKVCache(2, 2, 1, 1)),
    "PagedKVCache.get_sequence": lambda: (lambda c: c.get_sequence(c.add_sequence()))(a.PagedKVCache(2, 2, 1, 1)),
    "PagedKVCache.fork": lambda: (lambda c: c.fork(c.add_sequence()))(a.PagedKVCache(2, 2, 1, 1)),
    "PagedKVCache.free": lambda: (lambda c: c.free(c.add_sequence()))(a.PagedKVCache(2, 2, 1, 1)),
    "PagedKVCache.append": lambda: (lambda c: c.set_batch([c.add_sequence()]).append(
        np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1))))(a.PagedKVCache(2, 2, 1, 1)),
    "simulate_serving": lambda: a.simulate_serving(np.array([[0, 1, 1]]), 4, 4),
    "kv_cache_capacity": lambda: a.kv_cache_capacity(2**20, 10, 1, 1, 1),
    "attention_backward": lambda: a.attention_backward(np.ones((2, 4)), np.ones((2, 4)), np.ones((2, 4)),
                                                       np.ones((2, 4)), np.full((2, 2), 0.5)),
    "repeat_kv_heads_backward": lambda: a.repeat_kv_heads_backward(np.ones((1, 2, 2, 2)), 1),
    "blocked_attention_backward": lambda: a.blocked_attention_backward(np.ones((2, 4)), np.ones((2, 4)),
                                                                       np.ones((2, 4)), np.ones((2, 4)),
                                                                       np.ones((2, 4)), np.zeros(2)),
}
for name, call in calls.items():
    try:
        call()
    except NotImplementedError:
        print("todo", name)
    else:
        print("DONE", name)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=released,
                            env={"PYTHONPATH": str(released), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("todo ") == 26 and "DONE" not in result.stdout, result.stdout


def test_grading_the_blank_release_fails_every_graded_test(released):
    result = tito("grade", "13", "--json", "-", cwd=released)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert "total (auto-graded)" in result.stderr
    assert report["graded_file"] == str((released / "tinytorch/core/attention.py").resolve())
    assert report["earned"] == 0 and report["possible"] == 135 and report["manual_points"] == 10
    for part in report["parts"]:
        if not part["manual"]:
            assert part["tests"] and part["passed"] == 0, part["grade_id"]


def test_grading_the_solution_passes_every_test(repo_root):
    result = tito("grade", "13", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"graded: {repo_root / 'tinytorch/core/attention.py'}" in result.stdout
    assert re.search(r"total \(auto-graded\)\s+135\.00\s+135", result.stdout)


def test_student_path_fill_one_todo_export_and_grade(tmp_path, repo_root):
    out = tmp_path / "student"
    assert tito("release", "13", "--out", str(out), cwd=repo_root).returncode == 0
    source = out / SOURCE
    source.write_text(fill_masks(source.read_text()))
    exported = tito("export", "13", cwd=out)
    assert exported.returncode == 0, exported.stderr
    graded = tito("grade", "13", "--json", str(tmp_path / "grade.json"), cwd=out)
    assert graded.returncode == 1                                     # other parts are still TODOs
    report = json.loads((tmp_path / "grade.json").read_text())
    parts = {part["grade_id"]: part for part in report["parts"]}
    assert parts["test-masks"]["earned"] == 8 and parts["test-masks"]["failures"] == []
    assert parts["test-math-attention"]["earned"] == 0
    assert re.search(r"^test-masked-softmax: not done yet: masked_softmax\(\) \(line \d+\) still raises "
                     r"NotImplementedError \(lines of modules/13_attention/attention_dev.py\)", graded.stdout,
                     flags=re.M), graded.stdout


def test_a_crash_in_student_code_fails_only_its_part_and_shows_the_traceback(tmp_path, repo_root):
    out = tmp_path / "student"
    shutil.copytree(repo_root / "tinytorch", out / "tinytorch")
    package_file = out / "tinytorch/core/attention.py"
    crashing = package_file.read_text().replace(
        "    heads = x.reshape(B, T, num_heads, E // num_heads)   # (B, T, H, hd)", "    heads = 1 / 0")
    assert "heads = 1 / 0" in crashing
    package_file.write_text(crashing)
    result = tito("grade", "13", "--package", str(out), "--json", str(tmp_path / "grade.json"), cwd=repo_root)
    assert result.returncode == 1
    assert "ZeroDivisionError" in result.stdout                             # the student's traceback
    parts = {part["grade_id"]: part for part in json.loads((tmp_path / "grade.json").read_text())["parts"]}
    assert parts["test-split-merge-heads"]["earned"] < 6
    assert any("ZeroDivisionError" in failure["traceback"] for failure in parts["test-split-merge-heads"]["failures"])
    assert parts["test-masks"]["earned"] == 8 and parts["test-kv-cache"]["earned"] == 6   # unaffected


def test_grading_a_folder_without_a_package_is_a_clear_error(tmp_path, repo_root):
    result = tito("grade", "13", "--package", str(tmp_path), cwd=repo_root)
    assert result.returncode == 1 and "expected a tinytorch package folder" in result.stderr


def test_released_notebook_stops_at_the_first_unfinished_part(released):
    result = tito("run", "13", cwd=released)
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAILED")]
    assert len(failed) == 1 and "test-masks" in failed[0]
    assert "NotImplementedError" in result.stdout


def test_the_release_is_a_self_contained_workspace(released):
    assert (released / "tito/cli.py").is_file() and (released / "tests/13_attention/conftest.py").is_file()
    assert not (released / "tests/tooling").exists()
    result = tito("test", "13", "--", "-x", "-q", cwd=released)         # its own tests, its own package
    assert result.returncode == 1 and "NotImplementedError" in result.stdout


def test_tito_run_runs_notebook_edits_against_the_workspace_package(tmp_path, repo_root):
    import jupytext

    out = tmp_path / "student"
    assert tito("release", "13", "--out", str(out), cwd=repo_root).returncode == 0
    notebook_path = out / "modules/13_attention/attention_dev.ipynb"
    notebook = jupytext.read(notebook_path)
    for cell in notebook.cells:
        cell.source = fill_masks(cell.source)
    probe = jupytext.reads("# %%\nimport tinytorch\nprint('package:', tinytorch.__file__)\n", fmt="py:percent")
    notebook.cells.insert(3, probe.cells[0])
    jupytext.write(notebook, notebook_path)
    result = tito("run", "13", cwd=out)
    assert "executing modules/13_attention/attention_dev.ipynb" in result.stdout
    assert f"package: {out / 'tinytorch/__init__.py'}" in result.stdout
    failed = [line for line in result.stdout.splitlines() if line.endswith("FAILED")]
    assert result.returncode == 1 and len(failed) == 1 and "test-masked-softmax" in failed[0]


def test_released_files_get_the_usual_permissions(released):
    """New files get 0o666 less the umask, as open() would give them, not mkstemp's private 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (released / "modules/13_attention/attention_dev.ipynb", released / "tinytorch/core/attention.py",
                 released / "README.md", released / ".tito/manifest.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_tito_test_on_the_blank_release_is_short_and_names_every_part(released):
    from tito.grade import graded_parts, part_name

    result = tito("test", "13", cwd=released)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) < 400, f"{len(lines)} lines"
    assert "changed since the last export" not in result.stdout           # a release is exported
    parts = [part for part in graded_parts(resolve_module(released, "13")) if not part.manual]
    assert parts
    for part in parts:
        assert re.search(rf"^{part.section}\s+{re.escape(part_name(part.grade_id))}\s+0/\d+\s+not done yet: ", result.stdout,
                         flags=re.M), f"{part.grade_id} not named as not done yet:\n{result.stdout}"
    assert re.fullmatch(r"\d+ passed, \d+ failed(, \d+ skipped)?", lines[-1])   # ungraded checks of provided code pass

"""`tito release`: the student version of a module, made by nbgrader's own preprocessors.

nbgrader (the `instructor` extra: `pip install -e ".[instructor]"`) processes every source the
way its `generate_assignment` does, in the same order:

- LockCells: test cells and provided (locked) cells become `editable: false` and
  `deletable: false`, and solution cells `deletable: false`, so JupyterLab refuses to change them;
- ClearSolutions: each region between `### BEGIN SOLUTION` and `### END SOLUTION` becomes
  `# YOUR CODE HERE` and `raise NotImplementedError()` at the region's indentation, and a
  markdown region becomes "YOUR ANSWER HERE";
- ClearOutput clears outputs, and CheckCellMetadata checks the nbgrader metadata;
- ComputeChecksums records each graded, solution and locked cell's checksum, so that
  `nbgrader validate` and `nbgrader autograde` notice an edited test cell and an unanswered
  written answer.

The release is a complete student workspace: the stripped module, the modules before it, their
tests, the package they export to, the `tito` tools and a manifest. Installed with
`pip install -e ".[dev]"`, it needs nothing from the course repository, which holds the solutions,
and students need no nbgrader. The lock flags and checksums live in the cell metadata, which
jupytext writes into the paired `.py` (`# %% nbgrader={...} deletable=false editable=false`), so
they survive `tito export` in the student's workspace.
"""
from __future__ import annotations

import shutil
import re
from pathlib import Path

from tito.export import (assign_cell_ids, backup_path, export, notebook_text, notebook_to_source, read_source,
                         write_atomic)
from tito.workspace import Module, Source, TitoError, discover_modules

BEGIN_SOLUTION, END_SOLUTION = "BEGIN SOLUTION", "END SOLUTION"
TEXT_STUB = "YOUR ANSWER HERE"    # what nbgrader's ClearSolutions writes in place of a written answer
WORKSPACE_FILES = ["pyproject.toml", "module.yaml", "tinytorch/__init__.py", "tinytorch/core/__init__.py"]
DEFAULT_OUT = Path("release")
INSTRUCTOR_INSTALL = 'pip install -e ".[instructor]"'
# Course tools that stay in the course repository: the benchmark holds its own generation loops and
# attention calls, which a student workspace must not hold beside the functions students write, and the
# mutation check needs the course's table of bugs, which is never released.
COURSE_TOOLS = {"bench.py", "mutate.py"}


def nbgrader_preprocessors() -> list:
    """nbgrader's preprocessors that make a release, in the order `nbgrader generate_assignment` runs them."""
    try:
        from nbgrader.preprocessors import CheckCellMetadata, ClearOutput, ClearSolutions, ComputeChecksums, LockCells
    except ModuleNotFoundError as error:
        raise TitoError(f"tito release needs nbgrader, which makes the release (it locks the test cells and "
                        f"records their checksums); install the instructor tools with {INSTRUCTOR_INSTALL}. "
                        "Nothing was written.") from error
    return [LockCells(), ClearSolutions(), ClearOutput(), CheckCellMetadata(), ComputeChecksums()]


def name_stubs(notebook) -> None:
    """Make each `raise NotImplementedError()` stub say which function it is and which part it belongs to.

    The first error a student meets then reads `NotImplementedError: create_causal_mask, Part 1
    (masks): your code goes here` instead of an empty message.
    """
    part = None
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and (heading := re.search(r"^#+\s*(Part \d+)", cell.source, flags=re.M)):
            part = heading.group(1)
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or not meta.get("solution"):
            continue
        where = " ".join(filter(None, [part, f"({meta['grade_id']})" if meta.get("grade_id") else None]))
        lines, owner, function = cell.source.split("\n"), None, None
        for index, line in enumerate(lines):
            if found := re.match(r"^class (\w+)", line):
                owner = found.group(1)
            elif found := re.match(r"^(\s*)def (\w+)\(", line):
                if not found.group(1):
                    owner = None
                if not (function and len(found.group(1)) > (4 if owner else 0)):   # not a closure inside it
                    function = f"{owner}.{found.group(2)}" if owner and found.group(1) else found.group(2)
            if line.strip() == "raise NotImplementedError()" and index and lines[index - 1].strip() == "# YOUR CODE HERE":
                message = f"{function or 'this cell'}{', ' + where if where else ''}: your code goes here"
                lines[index] = line.replace("NotImplementedError()", f"NotImplementedError({message!r})")
        cell.source = "\n".join(lines)


def release_notebook(source: Source):
    """A source's notebook as nbgrader releases it: solutions stripped and their stubs named, cells locked,
    checksums recorded."""
    preprocessors = nbgrader_preprocessors()
    from nbgrader.nbgraderformat import ValidationError

    released = read_source(source)
    resources: dict = {}
    for preprocessor in preprocessors:
        if type(preprocessor).__name__ == "ComputeChecksums":
            name_stubs(released)                       # before the checksums, which then match the named stubs
        try:
            released, resources = preprocessor.preprocess(released, resources)
        except (RuntimeError, ValidationError) as error:   # a malformed solution region, or bad metadata
            raise TitoError(f"cannot release {source.relative(source.path)}: {error}") from error
    released.metadata.pop("celltoolbar", None)
    assign_cell_ids(released)
    return released


def _release_files(root: Path, target: Module) -> dict[str, str | Path]:
    """Relative path in the release -> new text, or a file to copy as it is."""
    files: dict[str, str | Path] = {name: root / name for name in WORKSPACE_FILES if (root / name).exists()}
    tooling = Path(__file__).resolve().parent                    # the tito package itself
    files.update({f"tito/{path.name}": path for path in sorted(tooling.glob("*.py"))
                  if path.name not in COURSE_TOOLS})
    for module in discover_modules(root):
        if module.number > target.number:
            continue
        # A module's tests folder, without its subfolders: `course/` holds the reference and what needs it.
        tests = sorted(module.tests.glob("*.py")) + sorted(module.tests.glob("*.npz")) if module.tests.is_dir() else []
        for test in tests:
            files[module.relative(test)] = test
        for source in module.sources:      # provided sources hold no solutions and come out whole
            notebook = notebook_text(release_notebook(source))
            files[source.relative(source.notebook)] = notebook
            # the .py from the notebook as stored (metadata keys sorted), so the pair reads as unedited
            files[source.relative(source.path)] = notebook_to_source(source, notebook)
        if (module.folder / "README.md").exists():
            files[module.relative(module.folder / "README.md")] = module.folder / "README.md"
    files["README.md"] = STUDENT_README.format(module=target.folder_name, name=target.name, number=target.number)
    files[".gitignore"] = STUDENT_GITIGNORE
    return files


# What the install, Jupyter and the tools create in a workspace; a student's own files (.bak copies
# included) stay visible to git.
STUDENT_GITIGNORE = """\
.venv/
*.egg-info/
__pycache__/
.ipynb_checkpoints/
.pytest_cache/
.hypothesis/
tito-output/
"""


STUDENT_README = """\
# TinyTorch workspace: module {module}

Install it once, from this folder (Python 3.10 or newer), in a fresh virtual environment:

    python -m venv .venv
    source .venv/bin/activate        # on Windows: .venv\\Scripts\\activate
    pip install -e ".[dev,lab]"
    jupyter lab

Your work goes in `modules/{module}/{name}_dev.ipynb`, or its paired
`modules/{module}/{name}_dev.py`: replace each `raise NotImplementedError(...)` under
`# YOUR CODE HERE` (its message names the function and its part), and each `YOUR ANSWER HERE`. In JupyterLab, open the `.ipynb`, or right-click
the `.py` and choose Open With > Jupytext Notebook (a double-click opens it as plain text).
Saving either one in JupyterLab writes both. You can also edit the `.py` in any editor.

    tito run {number}                 # run the notebook top to bottom; it stops at the first unfinished part
    tito export {number}              # put your code into tinytorch/core/{name}.py
    tito test {number}                # the tests, one line per part: ok, not done yet, or the first failure
    tito test {number} PART           # one part's tests, e.g. the name of a part in that summary
    tito test {number} -v             # pytest's full output (arguments after -- go to pytest)
    tito grade {number}               # points per part, and what is left to do

`tito test` and `tito grade` export your code first when the `.py` or the notebook changed since
the last export, so they always test what you wrote. A failure points at your own line, as
`modules/{module}/{name}_dev.py:LINE, in FUNCTION`.
"""


def release(root: Path, module: Module, out: Path, force: bool = False) -> list[str]:
    """Write the student workspace for `module` into `out`; returns what was written."""
    out = out.resolve()
    nbgrader_preprocessors()                     # before anything is written: a clear message without nbgrader
    if out == root.resolve():
        raise TitoError(f"--out {out} is the course workspace itself; releasing there would replace the solutions")
    files = _release_files(root, module)
    existing = [relative for relative in files if (out / relative).exists()]
    if existing and not force:
        raise TitoError(f"{out} already holds {len(existing)} of the release's files (e.g. {existing[0]}); "
                        "nothing was written. Choose another --out, or rerun with --force (changed files are "
                        "kept as .bak copies)")
    notes = []
    for relative, content in files.items():
        target = out / relative
        data = content.read_bytes() if isinstance(content, Path) else content.encode("utf-8")
        if target.exists() and target.read_bytes() != data:
            backup = backup_path(target)
            shutil.copy2(target, backup)
            notes.append(f"kept your previous {relative} as {backup.relative_to(out)}")
        write_atomic(target, data)
    released = [m for m in discover_modules(out) if m.number <= module.number]
    plan = export(out, released, force=True)   # a package file edited by hand is kept as a .bak copy
    notes.extend(f"kept your previous {path.rsplit('.bak', 1)[0]} as {path}" for path in plan.notes_backups)
    return [f"wrote {len(files)} files and exported the package into {out}", *notes]

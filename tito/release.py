"""`tito release`: the student version of a module, with every solution replaced by a stub.

The stripping follows nbgrader's ClearSolutions: each code region between `### BEGIN SOLUTION`
and `### END SOLUTION` becomes `# YOUR CODE HERE` and `raise NotImplementedError()` at the
region's indentation; a markdown region becomes "YOUR ANSWER HERE"; a solution cell without a
region is replaced whole. Outputs are cleared; every other cell and all nbgrader metadata are
kept. With the `instructor` extra installed, nbgrader's own preprocessors do the work; without
it, `clear_solutions` below does the same (tests/tooling compares the two).

The release is a complete student workspace: the stripped module, the modules before it, their
tests, the package they export to, the `tito` tools and a manifest. Installed with
`pip install -e ".[dev]"`, it needs nothing from the course repository, which holds the solutions.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from tito.export import assign_cell_ids, backup_path, export, notebook_text, read_source, write_atomic
from tito.workspace import Module, Source, TitoError, discover_modules

BEGIN_SOLUTION, END_SOLUTION = "BEGIN SOLUTION", "END SOLUTION"
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
TEXT_STUB = "YOUR ANSWER HERE"
WORKSPACE_FILES = ["pyproject.toml", "module.yaml", "tinytorch/__init__.py", "tinytorch/core/__init__.py"]
DEFAULT_OUT = Path("release")
# Course tools that stay in the course repository: the benchmark holds its own generation loops and
# attention calls, which a student workspace must not hold beside the functions students write.
COURSE_TOOLS = {"bench.py"}


def is_solution_cell(cell) -> bool:
    return bool(cell.metadata.get("nbgrader", {}).get("solution", False))


def _replace_regions(source: str, stub: str) -> tuple[str, bool]:
    """Replace each solution region of `source` by `stub`, indented like its BEGIN line."""
    kept, inside, replaced = [], False, False
    for line in source.split("\n"):
        if BEGIN_SOLUTION in line:
            if inside:
                raise TitoError(f"nested {BEGIN_SOLUTION} in a cell:\n{source}")
            inside = replaced = True
            indent = line[: len(line) - len(line.lstrip())]
            kept.extend(indent + stub_line for stub_line in stub.split("\n"))
        elif END_SOLUTION in line:
            inside = False
        elif not inside:
            kept.append(line)
    if inside:
        raise TitoError(f"{BEGIN_SOLUTION} without {END_SOLUTION} in a cell:\n{source}")
    return "\n".join(kept), replaced


def clear_solutions(notebook):
    """A copy of `notebook` with solutions stubbed out and outputs cleared (nbgrader's semantics)."""
    released = copy.deepcopy(notebook)
    for cell in released.cells:
        stub = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
        source, replaced = _replace_regions(cell.source, stub)
        if replaced and not is_solution_cell(cell):
            raise TitoError("a solution region lies in a cell that is not marked as a solution cell "
                            f"(nbgrader metadata solution: true):\n{cell.source}")
        cell.source = stub if is_solution_cell(cell) and not replaced else source
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    released.metadata.pop("celltoolbar", None)
    return released


def clear_solutions_with_nbgrader(notebook):
    """The same release made by nbgrader's ClearSolutions and ClearOutput preprocessors."""
    from nbgrader.preprocessors import ClearOutput, ClearSolutions

    released = copy.deepcopy(notebook)
    resources: dict = {}
    released, resources = ClearSolutions().preprocess(released, resources)
    released, resources = ClearOutput().preprocess(released, resources)
    return released


def nbgrader_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nbgrader") is not None


def release_notebook(source: Source, use_nbgrader: bool | None = None):
    """A source's notebook with solutions stripped; nbgrader does it when installed."""
    notebook = read_source(source)
    if use_nbgrader is None:
        use_nbgrader = nbgrader_available()
    try:
        released = clear_solutions_with_nbgrader(notebook) if use_nbgrader else clear_solutions(notebook)
    except RuntimeError as error:  # nbgrader's way of reporting a malformed solution region
        raise TitoError(f"cannot release {source.relative(source.path)}: {error}") from error
    assign_cell_ids(released)
    return released


def _release_files(root: Path, target: Module) -> dict[str, str | Path]:
    """Relative path in the release -> new text, or a file to copy as it is."""
    import jupytext

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
            released = release_notebook(source)
            files[source.relative(source.notebook)] = notebook_text(released)
            files[source.relative(source.path)] = jupytext.writes(released, fmt="py:percent")
        if (module.folder / "README.md").exists():
            files[module.relative(module.folder / "README.md")] = module.folder / "README.md"
    files["README.md"] = STUDENT_README.format(module=target.folder_name, name=target.name, number=target.number)
    return files


STUDENT_README = """\
# TinyTorch workspace: module {module}

Install it once, from this folder (Python 3.10 or newer), in a fresh virtual environment:

    python -m venv .venv
    source .venv/bin/activate        # on Windows: .venv\\Scripts\\activate
    pip install -e ".[dev,lab]"
    jupyter lab

Your work goes in `modules/{module}/{name}_dev.ipynb`, or its paired
`modules/{module}/{name}_dev.py`: replace each `raise NotImplementedError()` under
`# YOUR CODE HERE`, and each `YOUR ANSWER HERE`. In JupyterLab, open the `.ipynb`, or right-click
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

"""`tito export`: each `*_dev.py` becomes its notebook (jupytext), then its package file (nbdev).

Everything here is deterministic: cell ids come from cell contents, so the same source always
gives the same bytes. Nothing a person wrote is overwritten silently:

- The manifest (`.tito/manifest.json`) records the hash of every file the last export wrote,
  and of the source it was written from.
- A package file that no longer matches the manifest was edited by hand: export refuses to
  overwrite it without `--force`, and names the source file to edit instead.
- A notebook edited in Jupyter while its `.py` source was not is copied back into the source
  before anything is regenerated; when both were edited, export refuses without `--force`.
- Every file is written atomically (a temporary file, then a rename), and all checks happen
  before the first write, so a refusal or a failure leaves the previous files intact.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tito.workspace import Module, Source, TitoError, discover_modules

MANIFEST = Path(".tito") / "manifest.json"
MODIDX = Path("tinytorch") / "_modidx.py"
CELL_ID_LENGTH = 8  # hex digits of a content hash: short, and unique within a module


# ----------------------------------------------------------------------------- helpers
def sha256(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` (or bytes, as they are) to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(handle, "wb") if isinstance(text, bytes)
              else os.fdopen(handle, "w", encoding="utf-8", newline="\n")) as stream:
            stream.write(text)
        os.chmod(temporary, path.stat().st_mode & 0o7777 if path.exists() else _default_mode())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _default_mode() -> int:
    """The mode a plain open() would give a new file: 0o666 less the umask (mkstemp uses 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def backup_path(path: Path) -> Path:
    """`name.bak`, or `name.bak2`, `name.bak3`, ... : the first that does not exist yet."""
    candidate, n = path.with_name(path.name + ".bak"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.bak{n}")
    return candidate


def load_manifest(root: Path) -> dict[str, str]:
    text = read_text(root / MANIFEST)
    if text is None:
        return {}
    try:
        return dict(json.loads(text)["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise TitoError(f"{MANIFEST} is corrupted ({error}); restore it from git or delete it") from error


def dump_manifest(files: dict[str, str]) -> str:
    return json.dumps({"files": dict(sorted(files.items()))}, indent=2) + "\n"


# ----------------------------------------------------------------------------- notebooks
def _jupytext():
    try:
        import jupytext
    except ModuleNotFoundError as error:
        raise TitoError('tito export needs jupytext: pip install -e ".[dev]"') from error
    return jupytext


def read_source(source: Source, text: str | None = None):
    """Parse a `*_dev.py` (percent format) into a notebook node."""
    if text is None:
        text = read_text(source.path)
        if text is None:
            raise TitoError(f"missing source file {source.relative(source.path)}")
    try:
        return _jupytext().reads(text, fmt="py:percent")
    except Exception as error:  # jupytext raises many types on malformed input
        raise TitoError(f"cannot parse {source.relative(source.path)}: {error}") from error


def assign_cell_ids(notebook) -> None:
    """Give every cell an id derived from its type and source, so conversions are repeatable."""
    seen: dict[str, int] = {}
    for cell in notebook.cells:
        base = sha256(cell.cell_type + "\0" + cell.source)[:CELL_ID_LENGTH]
        seen[base] = seen.get(base, 0) + 1
        cell["id"] = base if seen[base] == 1 else f"{base}-{seen[base]}"


def notebook_text(notebook) -> str:
    """Serialise a notebook node the way every generated notebook is stored."""
    import nbformat

    notebook.nbformat, notebook.nbformat_minor = 4, 5
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nbformat.writes(notebook, version=4) + "\n"


def source_to_notebook(source: Source, text: str | None = None) -> str:
    notebook = read_source(source, text)
    assign_cell_ids(notebook)
    return notebook_text(notebook)


def notebook_to_source(source: Source, text: str) -> str:
    """The percent-format text of a notebook, as jupytext writes it."""
    jupytext = _jupytext()
    try:
        notebook = jupytext.reads(text, fmt="ipynb")
    except Exception as error:
        raise TitoError(f"{source.relative(source.notebook)} is not a readable notebook: {error}") from error
    return jupytext.writes(notebook, fmt="py:percent")


def normalised_source(source: Source, text: str) -> str:
    """A source text passed once through jupytext, for comparing it with a notebook's text."""
    return _jupytext().writes(read_source(source, text), fmt="py:percent")


# ----------------------------------------------------------------------------- package files
def export_package(root: Path, notebooks: dict[Source, str]) -> dict[str, str]:
    """Run nbdev on the given notebook texts in a scratch copy of the workspace layout.

    Returns the generated package files (relative path -> text): one per source, and
    `tinytorch/_modidx.py` built over the whole package as it will be after the export.
    """
    try:
        from nbdev.doclinks import _build_modidx
        from nbdev.export import nb_export
    except ModuleNotFoundError as error:
        raise TitoError('tito export needs nbdev: pip install -e ".[dev]"') from error

    with tempfile.TemporaryDirectory(prefix="tito-export-") as scratch_name:
        scratch = Path(scratch_name)
        shutil.copy2(root / "pyproject.toml", scratch / "pyproject.toml")
        package = scratch / "tinytorch"
        (package / "core").mkdir(parents=True)
        # The rest of the package as it stands, so that _modidx covers every module.
        for source in all_sources(root):
            if source not in notebooks and source.package_file.exists():
                shutil.copy2(source.package_file, package / "core" / source.package_file.name)
        generated = {}
        for source, text in notebooks.items():
            notebook_path = scratch / source.relative(source.notebook)
            write_atomic(notebook_path, text)
            with _working_directory(scratch):
                try:
                    nb_export(notebook_path, lib_path=package)
                except Exception as error:
                    raise TitoError(f"nbdev could not export {source.relative(source.notebook)}: {error}") from error
            exported = package / "core" / source.package_file.name
            if not exported.exists():
                raise TitoError(
                    f"{source.relative(source.path)} exported nothing: its first code cell must be "
                    f"'#| default_exp core.{source.name}'"
                )
            text = exported.read_text(encoding="utf-8")
            try:
                compile(text, "<exported package file>", "exec")
            except SyntaxError as error:                # code that Python cannot parse: say where, write nothing
                lines = text.splitlines()
                line = lines[error.lineno - 1].strip() if error.lineno and error.lineno <= len(lines) else ""
                raise TitoError(f"{source.relative(source.path)} does not parse as Python ({error.msg}) at:\n    "
                                f"{line}\nnothing was written; fix that line and export again") from error
            generated[source.relative(source.package_file)] = text
        with _working_directory(scratch):
            _build_modidx(dest=package, nbs_path=scratch / "modules")
        generated[MODIDX.as_posix()] = (package / "_modidx.py").read_text(encoding="utf-8")
        return generated


def all_sources(root: Path, modules: list[Module] | None = None) -> list[Source]:
    """Every source of the given modules (all modules by default), in course order."""
    return [source for module in (discover_modules(root) if modules is None else modules) for source in module.sources]


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


# ----------------------------------------------------------------------------- the plan
@dataclass
class ExportPlan:
    """What an export will write, decided before anything is written."""

    writes: dict[str, str] = field(default_factory=dict)   # relative path -> new text
    sources: dict[str, str] = field(default_factory=dict)  # relative source path -> text exported
    notes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)        # files that --force overwrites: kept as .bak
    notes_backups: list[str] = field(default_factory=list)  # the .bak copies written


def edited_notebook(source: Source, source_text: str, manifest: dict[str, str]) -> str | None:
    """The notebook's cells as percent-format source, when the notebook was saved since the last
    export and its cells differ from `source_text`; None otherwise (Jupyter also saves outputs and
    metadata, which change nothing)."""
    notebook = read_text(source.notebook)
    if notebook is None or sha256(notebook) == manifest.get(source.relative(source.notebook)):
        return None
    notebook_as_source = notebook_to_source(source, notebook)
    return None if notebook_as_source == normalised_source(source, source_text) else notebook_as_source


def _plan_source(source: Source, manifest: dict[str, str], plan: ExportPlan) -> str:
    """Decide the text to export for `source`; returns it."""
    source_text = read_text(source.path)
    if source_text is None:
        raise TitoError(f"missing source file {source.relative(source.path)}")
    source_key, notebook_key = source.relative(source.path), source.relative(source.notebook)
    notebook_as_source = edited_notebook(source, source_text, manifest)
    if notebook_as_source is not None:
        if sha256(source_text) == manifest.get(source_key):
            plan.writes[source_key] = notebook_as_source
            plan.notes.append(f"{source_key}: updated from the edits made in {notebook_key}")
            source_text = notebook_as_source
        else:
            plan.edited.append(notebook_key)
            plan.conflicts.append(
                f"{notebook_key} and {source_key} were both edited since the last export; "
                f"merge your notebook edits into {source_key} (or rerun with --force to let "
                f"{source_key} replace the notebook, which is kept as a .bak copy)"
            )
    plan.sources[source_key] = source_text
    return source_text


def current_source(module: Module) -> tuple[str, str]:
    """The text a module runs as now, and the file it comes from: the .py, or the notebook when it
    was edited in Jupyter since the last export and the .py was not."""
    plan = ExportPlan()
    text = _plan_source(module.main, load_manifest(module.root), plan)
    if plan.conflicts:
        raise TitoError(plan.conflicts[0])
    return text, module.relative(module.notebook if plan.writes else module.source)


def plan_export(root: Path, modules: list[Module], force: bool = False) -> ExportPlan:
    manifest = load_manifest(root)
    plan = ExportPlan()
    notebooks = {}
    for source in all_sources(root, modules):
        source_text = _plan_source(source, manifest, plan)
        notebooks[source] = source_to_notebook(source, source_text)
        plan.writes[source.relative(source.notebook)] = notebooks[source]

    for relative, text in export_package(root, notebooks).items():
        on_disk = read_text(root / relative)
        if on_disk is not None and on_disk != text and sha256(on_disk) != manifest.get(relative):
            owner = next((s for s in notebooks if s.relative(s.package_file) == relative), None)
            edit_instead = f"edit {owner.relative(owner.path)} instead" if owner else "it is generated"
            plan.edited.append(relative)
            plan.conflicts.append(
                f"{relative} was edited by hand since the last export; {edit_instead}, "
                f"then run tito export (or rerun with --force to replace it; your version is kept as a .bak copy)"
            )
        plan.writes[relative] = text

    if plan.conflicts and not force:
        raise TitoError("nothing was written:\n  " + "\n  ".join(plan.conflicts))
    return plan


def apply_export(root: Path, plan: ExportPlan) -> list[str]:
    """Write what changed and update the manifest; returns the paths written."""
    manifest = load_manifest(root)
    written = []
    for relative in plan.edited:
        backup = backup_path(root / relative)
        shutil.copy2(root / relative, backup)
        plan.notes_backups.append(backup.relative_to(root).as_posix())
    for relative, text in plan.writes.items():
        if read_text(root / relative) != text:
            write_atomic(root / relative, text)
            written.append(relative)
        if not relative.endswith("_dev.py"):
            manifest[relative] = sha256(text)
    for relative, text in plan.sources.items():
        manifest[relative] = sha256(text)
    new_manifest = dump_manifest(manifest)
    if read_text(root / MANIFEST) != new_manifest:
        write_atomic(root / MANIFEST, new_manifest)
        written.append(MANIFEST.as_posix())
    return written


def export(root: Path, modules: list[Module], force: bool = False) -> ExportPlan:
    plan = plan_export(root, modules, force=force)
    written = apply_export(root, plan)
    plan.notes.extend(f"kept the edited {path.rsplit('.bak', 1)[0]} as {path}" for path in plan.notes_backups)
    plan.notes.extend(f"wrote {path}" for path in written)
    return plan


def stale_files(root: Path, modules: list[Module]) -> list[str]:
    """Generated files whose committed bytes differ from a fresh export of their sources."""
    notebooks = {source: source_to_notebook(source) for source in all_sources(root, modules)}
    expected = {source.relative(source.notebook): text for source, text in notebooks.items()}
    expected.update(export_package(root, notebooks))
    return sorted(path for path, text in expected.items() if read_text(root / path) != text)

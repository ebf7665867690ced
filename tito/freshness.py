"""Never test or grade stale code: export first when a module changed since the last export.

`.tito/manifest.json` holds the hash of every source the last export read and every file it
wrote. A source whose hash differs was edited since; a notebook whose hash differs was saved
since, and counts as a change only when its cells differ from the source's (Jupyter also saves
outputs and metadata, which change nothing in the package); a package file whose hash differs was
edited by hand, and `tito export` then refuses with a message that names the file to edit.

`tito test` and `tito grade` call `export_if_changed`: it exports the changed modules, the same
as `tito export` would, and says so in one line. Exporting rather than refusing means a student
always tests the code in front of them, and the export itself never overwrites anyone's work.
"""
from __future__ import annotations

from pathlib import Path

from tito.export import edited_notebook, export, load_manifest, read_text, sha256
from tito.workspace import Module, TitoError, discover_modules


def changes_since_export(root: Path) -> dict[Module, list[str]]:
    """The modules whose sources, notebooks or package files differ from the last export."""
    manifest = load_manifest(root)
    changed: dict[Module, list[str]] = {}
    for module in discover_modules(root):
        for source in module.sources:
            text = read_text(source.path)
            if text is None:                        # a module given only as a notebook: export reports it
                continue
            found = []
            if sha256(text) != manifest.get(source.relative(source.path)):
                found.append(source.relative(source.path))
            if edited_notebook(source, text, manifest) is not None:
                found.append(source.relative(source.notebook))
            package = read_text(source.package_file)
            if package is None or sha256(package) != manifest.get(source.relative(source.package_file)):
                found.append(source.relative(source.package_file))
            if found:
                changed.setdefault(module, []).extend(found)
    return changed


def export_if_changed(root: Path, command: str, force: bool = False) -> list[str]:
    """Export every module changed since the last export (with `force`, as `tito export --force` does);
    returns the line to print (or nothing)."""
    changed = changes_since_export(root)
    if not changed:
        return []
    paths = [path for found in changed.values() for path in found]
    numbers = " ".join(module.number for module in changed)
    described = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    try:
        export(root, list(changed), force=force)
    except TitoError as error:
        raise TitoError(f"{described} changed since the last export, and exporting it failed, so nothing "
                        f"was {'graded' if command == 'grade' else 'tested'}:\n{error}\n"
                        f"(`tito {command} {numbers} --force` exports as `tito export {numbers} --force` does, "
                        f"then {'grades' if command == 'grade' else 'tests'})") from error
    return [f"tito {command}: {described} changed since the last export; "
            f"exported first, as `tito export {numbers}` does"]

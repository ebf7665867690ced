"""Map a line of an exported package file back to the line a student wrote in `*_dev.py`.

nbdev starts each exported cell with a header naming the notebook and the cell's id:

    # %% ../../modules/13_attention/attention_dev.ipynb #d2ad22ce

`tito export` derives cell ids from cell contents, so the source `attention_dev.py`, read with
jupytext and given ids the same way, has a cell with that id: its position is the notebook cell,
and its `# %%` marker in the `.py` gives the line. nbdev drops the `#|` directive lines at the top
of a cell, which the mapping puts back. Every step checks the text of the line it lands on, so a
source edited since the export yields no location rather than a wrong one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CELL_HEADER = re.compile(r"^# %% (?P<notebook>\S+\.ipynb) #(?P<cell_id>\S+)\s*$")
DIRECTIVE = re.compile(r"^\s*#\s*\|")
PERCENT_MARKER = "# %%"


@dataclass(frozen=True)
class Location:
    source: Path        # the *_dev.py the line was written in
    line: int           # 1-based line in `source`
    cell: int           # 1-based position of the cell in the notebook


@lru_cache(maxsize=32)
def _lines(path: Path) -> tuple[str, ...] | None:
    try:
        return tuple(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        return None


@lru_cache(maxsize=8)
def _source_cells(source: Path) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    """(cell id, source lines) of each cell of a percent-format source, as `tito export` numbers them."""
    import jupytext

    from tito.export import assign_cell_ids

    lines = _lines(source)
    if lines is None:
        return None
    try:
        notebook = jupytext.reads("\n".join(lines) + "\n", fmt="py:percent")
    except Exception:  # an unparsable source simply cannot be mapped
        return None
    assign_cell_ids(notebook)
    return tuple((cell["id"], tuple(cell.source.splitlines())) for cell in notebook.cells)


def _nearest(lines: tuple[str, ...], text: str, guess: int) -> int | None:
    """Index of the line equal to `text` (ignoring trailing spaces) closest to `guess`."""
    matches = [index for index, line in enumerate(lines) if line.rstrip() == text.rstrip()]
    return min(matches, key=lambda index: (abs(index - guess), index)) if matches else None


def locate(package_file: Path, line: int) -> Location | None:
    """Where line `line` of the exported `package_file` comes from, or None when unknown."""
    package_lines = _lines(package_file)
    if package_lines is None or not 1 <= line <= len(package_lines):
        return None
    header_index = next((index for index in range(line - 1, -1, -1) if CELL_HEADER.match(package_lines[index])), None)
    if header_index is None:
        return None
    header = CELL_HEADER.match(package_lines[header_index])
    notebook = (package_file.parent / header["notebook"]).resolve()
    source = notebook.with_suffix(".py")
    cells = _source_cells(source)
    if cells is None:
        return None
    position = next((index for index, (cell_id, _) in enumerate(cells) if cell_id == header["cell_id"]), None)
    if position is None:
        return None
    cell_lines = cells[position][1]
    directives = next((index for index, text in enumerate(cell_lines) if not DIRECTIVE.match(text)), len(cell_lines))
    in_cell = _nearest(cell_lines, package_lines[line - 1], directives + line - header_index - 2)
    if in_cell is None:
        return None
    source_lines = _lines(source)
    markers = [index for index, text in enumerate(source_lines) if text.startswith(PERCENT_MARKER)]
    if len(markers) != len(cells):  # cells that jupytext found without a marker: no reliable line
        return None
    start, end = markers[position] + 1, (markers + [len(source_lines)])[position + 1]
    in_source = _nearest(source_lines[start:end], cell_lines[in_cell], in_cell)
    if in_source is None:
        return None
    return Location(source, start + in_source + 1, position + 1)

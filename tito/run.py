"""`tito run`: execute a module's notebook cell by cell in a real Jupyter kernel."""
from __future__ import annotations

import base64
import os
import re
import sys
import time
from pathlib import Path

from tito.export import current_source, read_source
from tito.workspace import Module, TitoError, check_prerequisites, module_metadata

OUTPUT_ROOT = Path("tito-output")  # where plots land unless --figures says otherwise
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    """Tracebacks from the kernel carry terminal colours; keep them only for a terminal."""
    return text if sys.stdout.isatty() else ANSI_ESCAPE.sub("", text)


SECTION_HEADING = re.compile(r"^##\s+(Part \d+|[^:\n]+)", re.M)   # "## Part 3: ..." is "Part 3", else the title
IPYTHON_PLACE = re.compile(r"Cell In\[(\d+)\], line (\d+)")


def _places(notebook, source_name: str) -> list[tuple[str, str]]:
    """For each cell: where it starts in the percent source ("attention_dev.py:173") and its part."""
    import jupytext

    lines = jupytext.writes(notebook, fmt="py:percent").splitlines()
    markers = [index + 1 for index, line in enumerate(lines) if line.startswith("# %%")]
    places, part = [], "introduction"
    for cell, marker in zip(notebook.cells, markers):
        if cell.cell_type == "markdown" and (heading := SECTION_HEADING.search(cell.source)):
            part = heading.group(1).strip()
        places.append((f"{source_name}:{marker + 1}", part))
    return places


def _cell_label(cell, place: tuple[str, str]) -> str:
    grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
    lines = [line for line in cell.source.splitlines() if line.strip()]
    # A cell of directives alone ("#| default_exp ...") is named by its first directive.
    first_line = next((line for line in lines if not line.startswith("#|")), lines[0] if lines else "")
    return f"{place[0]} ({place[1]}) {grade_id or first_line[:50]}"


def _traceback_only(text: str) -> str:
    """nbclient's error text without the copy of the cell's source it starts with (printed lines above)."""
    separator = "-" * 18 + "\n"
    parts = text.split(separator)
    return parts[2].lstrip("\n") if len(parts) >= 3 and text.startswith("An error occurred") else text


def _in_source_terms(text: str, starts: dict[int, str]) -> str:
    """IPython's "Cell In[7], line 3" as the source line it is: "attention_dev.py:176"."""
    def source_line(match):
        start = starts.get(int(match.group(1)))
        if start is None:
            return match.group(0)
        name, line = start.rsplit(":", 1)
        return f"{name}:{int(line) + int(match.group(2)) - 1}"
    return IPYTHON_PLACE.sub(source_line, text)


def _print_outputs(cell, figures_dir: Path, figure_name: str) -> list[Path]:
    """Print the text a cell produced and save its images; returns the image paths."""
    saved = []
    for output_index, output in enumerate(cell.get("outputs", [])):
        kind = output.get("output_type")
        if kind == "stream":
            text = output.get("text", "")
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            if "image/png" in data:
                figures_dir.mkdir(parents=True, exist_ok=True)
                path = figures_dir / f"{figure_name}_{output_index}.png"
                path.write_bytes(base64.b64decode(data["image/png"]))
                saved.append(path)
                text = f"[figure saved to {path}]\n"
            else:
                text = data.get("text/plain", "") + "\n"
        else:
            continue
        for line in text.rstrip("\n").splitlines():
            print(f"      {line}")
    return saved


def _write_timings(path: Path | None, module: Module, timings: list[dict], total: float, passed: bool) -> None:
    """Save each executed cell's wall time as JSON (`tito run --json`)."""
    if path is None:
        return
    import json

    report = {"module": module.folder_name, "passed": passed, "total_seconds": round(total, 3), "cells": timings}
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise TitoError(f"cannot write --json {path}: {error}") from error


def run_module(module: Module, figures_dir: Path | None = None, timeout: int = 900,
               json_path: Path | None = None) -> int:
    """Run the notebook built from the module's source; returns 0 when every cell succeeds.

    `json_path` receives every executed cell's wall time, for checking nbgrader's per-cell limits."""
    try:
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ModuleNotFoundError as error:
        raise TitoError('tito run needs nbclient and ipykernel: pip install -e ".[dev]"') from error

    figures_dir = (figures_dir or module.root / OUTPUT_ROOT / module.folder_name).resolve()
    check_prerequisites(module)
    metadata = module_metadata(module)
    if metadata:
        print(f"Module {module.number}: {metadata['title']} (about {metadata['estimated_time']}; "
              f"builds on {', '.join(metadata['prerequisites'])}; next: {metadata['next_module']})")
    text, origin = current_source(module)
    notebook = read_source(module.main, text)
    code_cells = [(index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    places = _places(notebook, module.main.path.name)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(module.folder)}},
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no start-up chatter from the kernel
    )
    print(f"tito run {module.folder_name}: executing {origin} ({len(code_cells)} code cells) in a python3 kernel")
    started = time.perf_counter()
    saved: list[Path] = []
    timings: list[dict] = []
    for stale in figures_dir.glob("*.png") if figures_dir.is_dir() else []:
        stale.unlink()                                   # figures of an earlier run
    # The kernel imports this workspace's tinytorch, whatever else is installed.
    kernel_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(module.root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        with client.setup_kernel(env=kernel_env):
            starts: dict[int, str] = {}                  # IPython's execution count -> where the cell starts
            for index, cell in code_cells:
                label = _cell_label(cell, places[index])
                figure_name = places[index][0].replace(".py:", "_line")
                cell_started = time.perf_counter()
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    starts[cell.get("execution_count") or -1] = places[index][0]
                    _print_outputs(cell, figures_dir, figure_name)
                    print(f"{label}  FAILED")
                    print(_in_source_terms(_plain(_traceback_only(str(error))), starts))
                    _write_timings(json_path, module, timings, time.perf_counter() - started, passed=False)
                    return 1
                starts[cell.get("execution_count") or -1] = places[index][0]
                seconds = time.perf_counter() - cell_started
                timings.append({"cell": index + 1, "place": places[index][0], "label": label,
                                "seconds": round(seconds, 3)})
                print(f"{label}  ok ({seconds:.2f}s)")
                saved.extend(_print_outputs(cell, figures_dir, figure_name))
    except Exception as error:  # the kernel itself failed to start or died
        raise TitoError(f"the Jupyter kernel failed: {type(error).__name__}: {error}") from error
    total = time.perf_counter() - started
    print(f"tito run {module.folder_name}: all {len(code_cells)} code cells passed in {total:.1f}s")
    if timings:
        slowest = max(timings, key=lambda timing: timing["seconds"])
        print(f"slowest cell: {slowest['label']}, {slowest['seconds']:.2f}s")
    _write_timings(json_path, module, timings, total, passed=True)
    if saved:
        print(f"figures saved to {figures_dir}")
    return 0

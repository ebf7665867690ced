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


def _cell_label(cell, index: int, total: int) -> str:
    grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
    first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
    name = grade_id or first_line[:60]
    return f"[{index:>3}/{total}] {name}"


def _print_outputs(cell, figures_dir: Path, cell_index: int) -> list[Path]:
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
                path = figures_dir / f"cell{cell_index:03d}_{output_index}.png"
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


def run_module(module: Module, figures_dir: Path | None = None, timeout: int = 900) -> int:
    """Run the notebook built from the module's source; returns 0 when every cell succeeds."""
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
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(module.folder)}},
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # no start-up chatter from the kernel
    )
    print(f"tito run {module.folder_name}: executing {origin} ({len(code_cells)} code cells) in a python3 kernel")
    started = time.perf_counter()
    saved: list[Path] = []
    for stale in figures_dir.glob("cell*.png") if figures_dir.is_dir() else []:
        stale.unlink()                                   # figures of an earlier run
    # The kernel imports this workspace's tinytorch, whatever else is installed.
    kernel_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(module.root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    try:
        with client.setup_kernel(env=kernel_env):
            for position, (index, cell) in enumerate(code_cells, start=1):
                label = _cell_label(cell, position, len(code_cells))
                cell_started = time.perf_counter()
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    _print_outputs(cell, figures_dir, index)
                    print(f"{label}  FAILED")
                    print(_plain(str(error)))
                    return 1
                print(f"{label}  ok ({time.perf_counter() - cell_started:.2f}s)")
                saved.extend(_print_outputs(cell, figures_dir, index))
    except Exception as error:  # the kernel itself failed to start or died
        raise TitoError(f"the Jupyter kernel failed: {type(error).__name__}: {error}") from error
    print(f"tito run {module.folder_name}: all {len(code_cells)} code cells passed "
          f"in {time.perf_counter() - started:.1f}s")
    if saved:
        print(f"figures saved to {figures_dir}")
    return 0

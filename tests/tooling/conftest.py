"""A scratch copy of the workspace for tests that run tito's commands."""
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKSPACE_FILES = ["pyproject.toml", "module.yaml", "modules", "tinytorch", ".tito"]


def copy_workspace(destination: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    for name in WORKSPACE_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        else:
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A copy of the repository's workspace, made the current directory."""
    (tmp_path / "workspace").mkdir()
    root = copy_workspace(tmp_path / "workspace")
    monkeypatch.chdir(root)
    return root


def _save_with_outputs(notebook_path: Path, printed: str) -> dict:
    """Give the notebook's first code cell an output and an execution count, as Jupyter does when it saves a run.

    Returns the notebook as saved.
    """
    notebook = json.loads(notebook_path.read_text())
    code = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": [printed]}]
    code["execution_count"] = 1
    notebook_path.write_text(json.dumps(notebook, indent=1))
    return notebook


@pytest.fixture
def save_with_outputs():
    """save_with_outputs(notebook_path, printed): the notebook as Jupyter saves it after a run, its code unchanged."""
    return _save_with_outputs

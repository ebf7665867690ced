"""A scratch copy of the workspace for tests that run tito's commands."""
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

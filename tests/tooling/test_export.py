"""`tito export`: deterministic output, and nothing a person wrote is ever overwritten silently."""
import hashlib
import os
from pathlib import Path

import pytest

from tito import export as export_module
from tito.cli import main

GENERATED = ["modules/13_attention/attention_dev.ipynb", "tinytorch/core/attention.py", "tinytorch/_modidx.py",
             ".tito/manifest.json"]
HAND_WRITTEN = ["pyproject.toml", "tinytorch/__init__.py", "tinytorch/core/__init__.py"]


def snapshot(root: Path) -> dict[str, str]:
    """Hash of every file under root, by relative path."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


def test_export_twice_changes_no_byte(workspace):
    before = snapshot(workspace)
    assert main(["export"]) == 0
    assert main(["export"]) == 0
    assert snapshot(workspace) == before


def test_export_regenerates_identical_files_from_scratch(workspace):
    committed = {path: (workspace / path).read_bytes() for path in GENERATED + HAND_WRITTEN}
    for path in GENERATED:
        (workspace / path).unlink()
    assert main(["export"]) == 0
    for path, data in committed.items():
        assert (workspace / path).read_bytes() == data, path


def test_export_of_an_edited_source_updates_notebook_and_package(workspace, capsys):
    source = workspace / "modules/13_attention/attention_dev.py"
    source.write_text(source.read_text().replace("def math_attention(", "def math_attention(  "))
    assert main(["export", "13"]) == 0
    assert "wrote tinytorch/core/attention.py" in capsys.readouterr().out
    assert "def math_attention(  " in (workspace / "tinytorch/core/attention.py").read_text()
    assert main(["export", "13"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_hand_edited_package_file_is_not_overwritten(workspace, capsys):
    package_file = workspace / "tinytorch/core/attention.py"
    package_file.write_text(package_file.read_text() + "\n# my fix\n")
    source = workspace / "modules/13_attention/attention_dev.py"
    source.write_text(source.read_text() + "\n# %%\nprint('changed')\n")
    before = snapshot(workspace)
    assert main(["export", "13"]) == 1
    error = capsys.readouterr().err
    assert "tinytorch/core/attention.py was edited by hand" in error
    assert "edit modules/13_attention/attention_dev.py instead" in error
    assert snapshot(workspace) == before                                    # nothing written

    assert main(["export", "13", "--force"]) == 0
    assert "# my fix" not in package_file.read_text()


def test_notebook_edits_flow_back_into_the_source(workspace, capsys):
    import jupytext

    notebook_path = workspace / "modules/13_attention/attention_dev.ipynb"
    notebook = jupytext.read(notebook_path)
    notebook.cells.append(jupytext.reads("# %%\nstudent_note = 'written in Jupyter'\n", fmt="py:percent").cells[0])
    jupytext.write(notebook, notebook_path)
    assert main(["export", "13"]) == 0
    assert "updated from the edits made in" in capsys.readouterr().out
    source = (workspace / "modules/13_attention/attention_dev.py").read_text()
    assert "student_note = 'written in Jupyter'" in source
    assert main(["export", "13"]) == 0                                      # and now it is stable
    assert "up to date" in capsys.readouterr().out


def test_notebook_and_source_both_edited_is_refused(workspace, capsys):
    import jupytext

    notebook_path = workspace / "modules/13_attention/attention_dev.ipynb"
    notebook = jupytext.read(notebook_path)
    notebook.cells[0].source += "\n\nNotebook edit."
    jupytext.write(notebook, notebook_path)
    source = workspace / "modules/13_attention/attention_dev.py"
    source.write_text(source.read_text() + "\n# %%\nsource_edit = 1\n")
    before = snapshot(workspace)
    assert main(["export", "13"]) == 1
    assert "were both edited since the last export" in capsys.readouterr().err
    assert snapshot(workspace) == before


def test_notebook_outputs_alone_do_not_count_as_edits(workspace, save_with_outputs):
    notebook_path = workspace / "modules/13_attention/attention_dev.ipynb"
    save_with_outputs(notebook_path, "ran it\n")
    source_before = (workspace / "modules/13_attention/attention_dev.py").read_bytes()
    assert main(["export", "13"]) == 0
    assert (workspace / "modules/13_attention/attention_dev.py").read_bytes() == source_before
    assert "ran it" not in notebook_path.read_text()


def test_corrupted_notebook_is_a_clear_error_and_writes_nothing(workspace, capsys):
    (workspace / "modules/13_attention/attention_dev.ipynb").write_text("{ not json")
    before = snapshot(workspace)
    assert main(["export", "13"]) == 1
    assert "attention_dev.ipynb is not a readable notebook" in capsys.readouterr().err
    assert snapshot(workspace) == before


def test_missing_source_is_a_clear_error_and_writes_nothing(workspace, capsys):
    (workspace / "modules/12_embeddings/embeddings_dev.py").unlink()
    before = snapshot(workspace)
    assert main(["export"]) == 1
    assert "missing source file modules/12_embeddings/embeddings_dev.py" in capsys.readouterr().err
    assert snapshot(workspace) == before


def test_unknown_module_lists_the_known_ones(workspace, capsys):
    assert main(["export", "99"]) == 2
    error = capsys.readouterr().err
    assert "unknown module '99'" in error and "02_tensor, 12_embeddings, 13_attention" in error


def test_a_failure_midway_leaves_the_previous_package_intact(workspace, monkeypatch):
    source = workspace / "modules/13_attention/attention_dev.py"
    source.write_text(source.read_text() + "\n# %%\n#| export\nNEW_CONSTANT = 1\n")
    package_before = (workspace / "tinytorch/core/attention.py").read_bytes()
    real_replace = os.replace

    def crash_on_package(src, dst):
        if str(dst).endswith("attention.py"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(export_module.os, "replace", crash_on_package)
    with pytest.raises(OSError, match="disk full"):
        main(["export", "13"])
    assert (workspace / "tinytorch/core/attention.py").read_bytes() == package_before
    leftovers = [p.name for p in (workspace / "tinytorch/core").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_source_that_does_not_parse_is_a_clear_error(workspace, capsys):
    source = workspace / "modules/13_attention/attention_dev.py"
    source.write_text(source.read_text().replace("#| default_exp core.attention", "#| default_exp core.renamed"))
    assert main(["export", "13"]) == 1
    assert "first code cell must be '#| default_exp core.attention'" in capsys.readouterr().err


def test_code_with_a_syntax_error_is_a_clear_error_and_writes_nothing(workspace, capsys):
    source = workspace / "modules/13_attention/attention_dev.py"
    source.write_text(source.read_text().replace("group = num_heads // x.shape[1]", "group = num_heads // (x.shape[1]"))
    before = snapshot(workspace)
    assert main(["export", "13"]) == 1
    error = capsys.readouterr().err
    assert "modules/13_attention/attention_dev.py does not parse as Python ('(' was never closed) at:" in error
    assert "group = num_heads // (x.shape[1]" in error and "nothing was written" in error
    assert snapshot(workspace) == before

"""The `tito` command line: help, module names, and honest exit codes."""
import subprocess
import sys
import textwrap
import time

import pytest

from tito.bench import _busy_core
from tito.cli import main
from tito.workspace import TitoError, resolve_module

SUBCOMMANDS = ["export", "test", "run", "release", "grade", "mutate", "bench"]


def tito(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tito.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: tito {command}" in capsys.readouterr().out


@pytest.mark.parametrize("spec", ["13", "13_attention", "attention", " Attention "])
def test_module_names_resolve(repo_root, spec):
    assert resolve_module(repo_root, spec).folder_name == "13_attention"


@pytest.mark.parametrize("command", ["export", "test", "run", "mutate"])
def test_unknown_module_exits_2_and_lists_known_ones(repo_root, command):
    result = tito(command, "transformers", cwd=repo_root)
    assert result.returncode == 2
    assert "unknown module 'transformers'; known modules: 02_tensor, 12_embeddings, 13_attention" in result.stderr


def test_outside_a_workspace_is_a_clear_error(tmp_path):
    result = tito("export", cwd=tmp_path)
    assert result.returncode == 1
    assert "no TinyTorch workspace" in result.stderr


def test_tito_test_runs_the_module_tests_and_passes_on_exit_code(repo_root):
    result = tito("test", "02", "--", "-q", "-k", "repr", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_tito_run_executes_the_notebook_in_a_kernel(repo_root):
    result = tito("run", "12", cwd=repo_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all" in result.stdout and "code cells passed" in result.stdout


def test_every_cell_of_module_13_stays_within_nbgrader_time_limits(repo_root, tmp_path):
    """nbgrader's autograde allows 30 s per cell by default, and courses often set 10 s: the
    solution notebook must leave room for a slower, busier machine than this one."""
    import json

    report = tmp_path / "times.json"
    result = tito("run", "13", "--json", str(report), "--figures", str(tmp_path / "figures"), cwd=repo_root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    timings = json.loads(report.read_text())
    slow = [(cell["cell"], cell["label"], cell["seconds"]) for cell in timings["cells"] if cell["seconds"] >= 10]
    assert not slow, f"cells taking 10 s or more: {slow}"
    assert timings["total_seconds"] < 60
    untitled = [cell["label"] for cell in timings["cells"] if not cell["label"].split(") ", 1)[1].strip()]
    assert not untitled, f"cells labelled without a title: {untitled}"


def test_tito_run_reports_a_failing_cell_and_exits_nonzero(workspace):
    module = workspace / "modules/98_broken"
    module.mkdir()
    (module / "broken_dev.py").write_text(textwrap.dedent("""\
        # %%
        #| default_exp core.broken

        # %%
        print("before the failure")

        # %%
        raise RuntimeError("this cell fails on purpose")

        # %%
        print("never reached")
        """))
    result = tito("run", "98", cwd=workspace)
    assert result.returncode == 1
    assert "before the failure" in result.stdout
    assert "FAILED" in result.stdout and "this cell fails on purpose" in result.stdout
    assert "never reached" not in result.stdout


def test_titoerror_carries_its_exit_code():
    assert TitoError("x", exit_code=2).exit_code == 2


def test_module_yaml_describes_module_13_only(repo_root):
    from tito.workspace import module_metadata

    assert module_metadata(resolve_module(repo_root, "13"))["title"] == "Attention"
    assert module_metadata(resolve_module(repo_root, "12")) == {}


def test_tito_run_needs_the_prerequisites_of_module_yaml_exported(workspace):
    (workspace / "tinytorch/core/embeddings.py").unlink()
    result = tito("run", "13", cwd=workspace)
    assert result.returncode == 1
    assert "module 13_attention needs 12_embeddings exported first: run `tito export 12`" in result.stderr


def test_the_profiler_checks_busy_process_stops_when_its_stdin_closes():
    """It spins until the pipe from `tito bench --profiler-check` closes, as it does when that process dies."""
    busy = _busy_core()
    try:
        time.sleep(0.3)
        assert busy.poll() is None, "the busy process should spin while the check runs"
        busy.stdin.close()
        assert busy.wait(timeout=10) == 0
    finally:
        busy.kill()
        busy.wait()

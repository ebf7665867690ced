"""The release carries no answer key: no reference, and no provided function that computes what a student writes."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tito.release import _release_files, release
from tito.workspace import resolve_module

PROBE = Path(__file__).with_name("answer_key_probe.py")
STUDENT_PACKAGE = "tinytorch/core/attention.py"


def provided_python_files(repo_root) -> list[str]:
    """The Python files a release of module 13 ships beside the student's code: its tools and tests, and the
    package files exported from the provided sources (every `*_dev.py` but the student's lesson)."""
    files = _release_files(repo_root, resolve_module(repo_root, "13"))
    exported = {f"tinytorch/core/{Path(name).name.removesuffix('_dev.py')}.py" for name in files
                if name.startswith("modules/") and name.endswith("_dev.py")}
    return sorted(name for name in set(files) | exported
                  if name.endswith(".py") and not name.startswith("modules/") and name != STUDENT_PACKAGE)


@pytest.fixture(scope="module")
def probe_workspace(tmp_path_factory):
    """A release holding the solution's package: the probe calls provided code there, never in the course."""
    repo_root = Path(__file__).resolve().parents[2]
    workspace = tmp_path_factory.mktemp("probe") / "release"
    release(repo_root, resolve_module(repo_root, "13"), workspace)
    shutil.copy2(repo_root / STUDENT_PACKAGE, workspace / STUDENT_PACKAGE)
    return workspace


def run_probe(workspace, files) -> dict:
    listing = workspace.parent / "files.json"
    listing.write_text(json.dumps(files))
    result = subprocess.run([sys.executable, str(PROBE), str(listing)], capture_output=True, text=True,
                            cwd=workspace, env={**os.environ, "PYTHONPATH": str(workspace)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_release_ships_no_reference_and_no_course_tools(repo_root):
    files = _release_files(repo_root, resolve_module(repo_root, "13"))
    assert "tests/13_attention/expected_values.npz" in files
    leaked = [name for name in files if "course/" in name or name.endswith(("reference.py", "bench.py", ".toml"))
              and name != "pyproject.toml"]
    assert not leaked, f"the release would ship {leaked}"


def test_no_provided_function_reproduces_a_student_function(repo_root, probe_workspace):
    files = provided_python_files(repo_root)
    assert {"tinytorch/core/_attention_checks.py", "tinytorch/core/_attention_bases.py",
            "tinytorch/core/_attention_backend.py", "tinytorch/core/_attention_figures.py", "tinytorch/core/tensor.py",
            "tinytorch/core/embeddings.py", "tito/grade.py", "tests/13_attention/expected.py",
            "tests/13_attention/test_masked_softmax.py"} <= set(files)
    report = run_probe(probe_workspace, files)
    # only the comparison with PyTorch may stay unprobed, and only where PyTorch is not installed
    torch_tests = {"tests/13_attention/test_against_pytorch.py"}
    expected_skips = set() if importlib.util.find_spec("torch") else torch_tests
    assert set(report["skipped"]) == expected_skips, f"files the probe could not load: {report['skipped']}"
    assert len(report["callables"]) > 150 and report["calls"] > 3000, "the probe must call every provided function"
    assert not report["leaks"], "provided functions reproduce student functions:\n" + "\n".join(
        f"  {leak['provided']} computes {leak['student']}" for leak in report["leaks"])


@pytest.mark.parametrize("twin, student", [
    ("def softmax(scores, keep=None):\n    e = np.exp(scores - scores.max(-1, keepdims=True))\n"
     "    return e / e.sum(-1, keepdims=True)\n", "masked_softmax"),
    ("def mask(n, m=None):\n    m = n if m is None else m\n    return np.tri(n, m, k=m - n)\n", "create_causal_mask"),
    ("def slope(x, y):\n    return np.polyfit(np.log(x), np.log(y), 1)[0]\n", "fit_exponent"),
])
def test_the_probe_finds_a_planted_twin(probe_workspace, tmp_path, twin, student):
    planted = tmp_path / "planted.py"
    planted.write_text("import numpy as np\n\n\n" + twin)
    report = run_probe(probe_workspace, [str(planted)])
    assert {leak["student"] for leak in report["leaks"]} == {student}


# What a student could try instead of writing a part: hand it to a provided kernel, or read the stored
# expected values. Each replaces the stub of the function named, in a blank release.
REF = "__import__('sys').modules['expected'].ref"
KERNEL = "__import__('tinytorch.core._attention_backend', fromlist=['backend'])"
CHEATS = {
    "create_causal_mask": f"return {REF}.causal_mask(seq_len, key_len)",
    "create_padding_mask": f"return {REF}.padding_mask(lengths, key_len)",
    "masked_softmax": f"return {REF}.masked_softmax(scores, mask)",
    "math_attention": f"return tuple(r.data for r in {KERNEL}.fast_attention(query, key, value, mask, scale))",
    "attention_with_dropout": f"return {KERNEL}.tuned_attention(query, key, value, mask, scale, None, True)",
    "split_heads": f"return {REF}.split_heads(x, num_heads)",
    "merge_heads": f"return {REF}.merge_heads(x)",
    "repeat_kv_heads": f"return {REF}.repeat_kv_heads(x, num_heads)",
    "blocked_attention": f"return {KERNEL}.fast_attention(query, key, value, mask, scale, need_weights=False)[0].data",
}


# The same calls made from a thread the student's function starts, where a context variable set by the
# grading fixture would not reach: the refusal is process-wide, so these earn nothing either.
TUNED_KERNEL = "__import__('tinytorch.core._attention_kernel', fromlist=['kernel'])"
IN_A_THREAD = ("box = []; worker = __import__('threading').Thread(target=lambda: box.append({call})); "
               "worker.start(); worker.join(); return box[0]")
THREAD_CHEATS = {
    "math_attention": IN_A_THREAD.format(call=f"{KERNEL}.tuned_attention(query, key, value, mask, scale, True)"),
    "blocked_attention": IN_A_THREAD.format(call=f"{TUNED_KERNEL}.attention(query, key, value, mask, scale)[0]"),
    "attention_with_dropout": ("return __import__('concurrent.futures', fromlist=['futures']).ThreadPoolExecutor(1)"
                               f".submit(lambda: tuple(r.data for r in {KERNEL}.fast_attention(query, key, value, "
                               "mask, scale))).result()"),
}


def cheat(source: str, cheats: dict = CHEATS) -> tuple[str, set[str]]:
    """`source` with the stub of every function named in `cheats` replaced by its cheat; and the names replaced."""
    lines, replaced, function, depth = source.split("\n"), set(), None, 0
    for index, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("class "):
            function = None
        elif stripped.startswith("def ") and (function is None or indent <= depth):   # not a closure inside it
            function, depth = stripped[4:].split("(")[0], indent
        if stripped == "# YOUR CODE HERE" and function in cheats and lines[index + 1].strip().startswith("raise NotImplementedError("):
            lines[index + 1] = line[: len(line) - len(line.lstrip())] + cheats[function]
            replaced.add(function)
    return "\n".join(lines), replaced


@pytest.mark.parametrize("cheats", [CHEATS, THREAD_CHEATS], ids=["called directly", "called from a thread"])
def test_a_release_filled_by_calls_into_provided_code_scores_nothing(tmp_path, repo_root, cheats):
    out = tmp_path / "student"
    released = subprocess.run([sys.executable, "-m", "tito.cli", "release", "13", "--out", str(out)],
                              capture_output=True, text=True, cwd=repo_root)
    assert released.returncode == 0, released.stderr
    source = out / "modules/13_attention/attention_dev.py"
    text, replaced = cheat(source.read_text(), cheats)
    assert replaced == set(cheats), f"cheats not placed: {set(cheats) - replaced}"
    source.write_text(text)
    graded = subprocess.run([sys.executable, "-m", "tito.cli", "grade", "13", "--json", "-"], capture_output=True,
                            text=True, cwd=out)
    report = json.loads(graded.stdout)
    earned = {part["grade_id"]: part["earned"] for part in report["parts"] if not part["manual"]}
    assert report["earned"] == 0, f"calls into provided code earned points: {earned}"
    refusals = " ".join(failure["traceback"] for part in report["parts"] for failure in part["failures"])
    assert "switched off while grading" in refusals
    if cheats is CHEATS:
        assert "not to be its answer" in refusals

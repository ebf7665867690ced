"""`tito mutate`: the course's mutation table is valid, a bug costs its part points, and a missed one fails the run."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tito.mutate import apply_mutation, load_mutations, solution_regions
from tito.workspace import resolve_module

TILED = "repeat kv heads: tiled [a, b, a, b] instead of grouped [a, a, b, b]"


def tito(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tito.cli", *args], capture_output=True, text=True, cwd=cwd)


def toml_string(text: str) -> str:
    """`text` as a TOML literal string (the table's own quoting); it holds no triple quote."""
    assert "'''" not in text
    return "'''" + ("\n" if text.startswith("\n") else "") + text + "'''"


def table(*mutations: dict) -> str:
    return "".join("\n[[mutation]]\n" + "".join(f"{key} = {toml_string(value)}\n" for key, value in mutation.items())
                   for mutation in mutations)


def test_the_course_table_is_valid_and_covers_every_code_region(repo_root):
    module = resolve_module(repo_root, "13")
    source = module.source.read_text()
    mutations = load_mutations(module)
    assert len(mutations) >= 50
    hit = set()
    for mutation in mutations:
        mutated = apply_mutation(mutation, source, "attention_dev.py")
        assert mutated != source
        start = source.index(mutation.find)
        hit.update(region for region in solution_regions(source) if region[0] <= start < region[1])
    code_regions = [region for region in solution_regions(source)
                    if not source[region[0]:region[1]].lstrip().startswith("#")]   # not the written answers
    assert len(code_regions) == 29
    missed = [source[start:end].strip().splitlines()[0] for start, end in code_regions if (start, end) not in hit]
    assert not missed, f"solution regions without a mutation: {missed}"


def test_mutate_reports_the_points_a_mutation_keeps_and_fails_when_one_keeps_half(workspace, tmp_path, repo_root):
    """One real bug from the table, a change that alters nothing but a comment, and one that does not parse:
    the run fails on the last two."""
    shutil.copytree(repo_root / "tests/13_attention", workspace / "tests/13_attention")
    module = resolve_module(workspace, "13")
    tiled = next(mutation for mutation in load_mutations(module) if mutation.name == TILED)
    comment = {"name": "a comment reworded", "part": "test-repeat-kv-heads",
               "find": "# G query heads per kv head", "replace": "# query heads that share a kv head"}
    broken = {"name": "an unclosed parenthesis", "part": "test-repeat-kv-heads",
              "find": "group = num_heads // x.shape[1]", "replace": "group = num_heads // (x.shape[1]"}
    (module.folder / "mutations.toml").write_text(table(vars(tiled), comment, broken))
    report = tmp_path / "mutate.json"
    result = tito("mutate", "13", "--json", str(report), cwd=workspace)
    assert result.returncode == 1, result.stdout + result.stderr
    found = {mutation["name"]: mutation for mutation in json.loads(report.read_text())["mutations"]}
    assert found[TILED]["possible"] == 4 and found[TILED]["kept"] < 2 and found[TILED]["caught"]   # points lost
    assert found[TILED]["tests_passed"] < found[TILED]["tests"] / 2
    assert found["a comment reworded"]["kept"] == 4 and found["a comment reworded"]["percent_kept"] == 100.0
    assert not found["a comment reworded"]["caught"]
    assert f"caught   {TILED}" in result.stdout and "MISSED   a comment reworded" in result.stdout
    assert found["an unclosed parenthesis"]["broken"] and not found["an unclosed parenthesis"]["caught"]
    assert "does not parse as Python" in found["an unclosed parenthesis"]["problems"][0]
    assert "1 of 3 mutations caught" in result.stdout
    assert "broken: 'an unclosed parenthesis' makes the package fail to import" in result.stdout
    assert "strengthen the tests of test-repeat-kv-heads" in result.stdout
    assert "np.repeat(x, group, axis=1)" in module.source.read_text()            # the workspace's source is untouched


@pytest.mark.parametrize("entry, message", [
    ({"find": "this text is nowhere"}, "its find text does not occur in modules/13_attention/attention_dev.py"),
    ({"find": "# (B, H, T, hd)"}, "occurs 2 times"),
    ({"find": "def create_causal_mask("}, "its find text lies outside every solution region"),
    ({"part": "test-nothing"}, "part 'test-nothing' is not an auto-graded part"),
    ({"part": "reflection-memory"}, "part 'reflection-memory' is not an auto-graded part"),
    ({"replace": None}, "expected the strings name, part, find, replace"),
])
def test_a_bad_table_is_refused_before_anything_runs(workspace, entry, message):
    mutation = {"name": "bad", "part": "test-masks", "find": "offset = key_len - seq_len ", "replace": "offset = 0 "}
    mutation.update(entry)
    mutation = {key: value for key, value in mutation.items() if value is not None}
    (workspace / "modules/13_attention/mutations.toml").write_text(table(mutation))
    result = tito("mutate", "13", cwd=workspace)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "tito mutate:" not in result.stdout                                    # no mutation was run


def test_mutations_with_one_name_or_a_filter_that_selects_none_are_refused(workspace):
    mutation = {"name": "twice", "part": "test-masks", "find": "offset = key_len - seq_len ", "replace": "offset = 0 "}
    path = workspace / "modules/13_attention/mutations.toml"
    path.write_text(table(mutation, mutation))
    result = tito("mutate", "13", cwd=workspace)
    assert result.returncode == 1 and "two mutations are named 'twice'" in result.stderr
    path.write_text(table(mutation))
    result = tito("mutate", "13", "--only", "nothing like it", cwd=workspace)
    assert result.returncode == 2
    assert "no mutation in modules/13_attention/mutations.toml has 'nothing like it'" in result.stderr
    result = tito("mutate", "13", cwd=workspace)                               # the workspace copy has no tests
    assert result.returncode == 1
    assert "no grading tests for 13_attention: expected them in tests/13_attention" in result.stderr
    path.unlink()
    result = tito("mutate", "13", cwd=workspace)
    assert result.returncode == 1 and "modules/13_attention/mutations.toml does not exist" in result.stderr

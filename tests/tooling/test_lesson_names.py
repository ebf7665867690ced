"""Every name the lesson's prose puts in backticks exists in the code the student sees.

A backticked span that reads as a name (`KVCache`, `cache.set_batch`, `get_memory_usage()`,
`np.broadcast_to`) is split at its dots, and each part must be a name the student can meet: a
word of the lesson's code cells outside the solutions (which a release removes), or a name the
provided modules beside it and the package they build on offer: a function, class, parameter,
attribute, module-level name, or a string that is a name (dict keys such as `total_mb`). Local
variables inside the provided code do not count: a student never sees them. Names under `np.`, and the
standard-library modules the lesson names, are looked up on the module itself. Spans that are
expressions or shapes (`causal * padding`, `[pos:pos+T]`) are not names and are skipped, and
so are file names and the PyTorch names the lesson compares with.
"""
import ast
import builtins
import importlib
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "modules" / "13_attention"
LESSON = MODULE / "attention_dev.py"
PROVIDED = sorted(path for path in MODULE.glob("_attention_*_dev.py"))
PACKAGE = [REPO / "tinytorch" / "core" / name for name in ("tensor.py", "embeddings.py")]
LIBRARIES = {"np": np, "numpy": np, "math": None, "time": None, "tracemalloc": None}
PYTORCH = {"nn.MultiheadAttention", "scaled_dot_product_attention"}   # what the lesson compares with, by name
FILE = re.compile(r"\.(py|ipynb|json|toml|md)$")

BACKTICKED = re.compile(r"`([^`\n]+)`")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\([^()]*\))?$")
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def split_cells(text: str) -> tuple[str, str]:
    """The lesson's (markdown, code): its `# %% [markdown]` cells without the leading '# ', and the code
    cells without their solution regions."""
    markdown, code, in_markdown, in_solution = [], [], False, False
    for line in text.splitlines():
        if line.startswith("# %%"):
            in_markdown = line.startswith("# %% [markdown]")
            continue
        if line.strip() in ("### BEGIN SOLUTION", "### END SOLUTION"):
            in_solution = line.strip() == "### BEGIN SOLUTION"
        elif in_markdown:
            markdown.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif not in_solution:
            code.append(line)
    return "\n".join(markdown), "\n".join(code)


def offered_names(source: str) -> set[str]:
    """What a module offers by name: definitions, parameters, attributes, module-level names, name strings."""
    tree, names = ast.parse(source), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and WORD.fullmatch(node.value):
            names.add(node.value)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    for statement in tree.body:                                  # module-level assignments
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, (ast.AnnAssign, ast.AugAssign)) else []
        names.update(node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name))
    return names


def names_in(markdown: str) -> set[str]:
    """The backticked spans that are names, without a call's parentheses; file names and PyTorch's left out."""
    spans = (span.split("(")[0] for span in BACKTICKED.findall(markdown) if NAME.match(span))
    return {span for span in spans if not FILE.search(span) and span not in PYTORCH}


def missing(name: str, words: set[str]) -> str | None:
    """What of `name` the code does not hold, or None."""
    head, *rest = name.split(".")
    if not rest and hasattr(builtins, head):                        # `ValueError`, `len`
        return None
    if head in LIBRARIES:
        owner = LIBRARIES[head] or importlib.import_module(head)
        for part in rest:
            if not hasattr(owner, part):
                return f"{head}.{'.'.join(rest)}"
            owner = getattr(owner, part)
        return None
    absent = [part for part in name.split(".") if part not in words]
    return ", ".join(absent) or None


def test_the_lesson_names_only_what_the_code_holds():
    markdown, lesson_code = split_cells(LESSON.read_text(encoding="utf-8"))
    words = set(WORD.findall(lesson_code))
    for path in PROVIDED + PACKAGE:
        words |= offered_names(path.read_text(encoding="utf-8"))
    names = names_in(markdown)
    assert len(names) > 100, f"found only {len(names)} backticked names in the lesson's prose"
    unknown = {name: part for name in sorted(names) if (part := missing(name, words))}
    assert not unknown, ("the lesson's prose names what no code holds (name: the missing part): "
                         + "; ".join(f"`{name}`: {part}" for name, part in unknown.items()))


def test_a_local_variable_of_provided_code_is_not_a_name_the_student_meets():
    offered = offered_names("def f(x, *, block_size=2):\n    last_key = x + 1\n    return {'total_mb': last_key}\n")
    assert {"f", "x", "block_size", "total_mb"} <= offered and "last_key" not in offered
    markdown, code = split_cells("# %% [markdown]\n# Use `keep`.\n\n# %%\ndef g(mask):\n    ### BEGIN SOLUTION\n"
                                 "    keep = mask\n    ### END SOLUTION\n")
    assert "keep" in names_in(markdown) and "keep" not in WORD.findall(code)


def test_the_check_finds_a_name_the_code_lacks():
    markdown = ("Read `cache.total_bytes`, then `last_key(i1)`, `np.broadcast_to` and `causal * padding` "
                "in `_attention_checks_dev.py`.")
    names = names_in(markdown)
    assert names == {"cache.total_bytes", "last_key", "np.broadcast_to"}
    words = {"cache", "total_bytes"}
    assert [name for name in sorted(names) if missing(name, words)] == ["last_key"]
    assert missing("np.no_such_function", words) == "np.no_such_function"

"""The public boundary a maintainer reads (checks of provided code, not graded): each public name's checks
are a named function, every registered name is in use, and a registered method a class lacks is an error."""
import ast
from pathlib import Path

import pytest

import tinytorch.core.attention  # noqa: F401 - importing the lesson applies every registered name
from tinytorch.core import _attention_checks as boundary

PROVIDED = ["_attention_checks", "_attention_bases", "_attention_backend", "_attention_kernel", "_attention_figures",
            "_attention_training"]


def test_every_registered_name_is_applied_to_a_student_function():
    assert set(boundary.ENTRY_POINTS) == boundary.APPLIED, \
        f"registered but matching nothing: {sorted(set(boundary.ENTRY_POINTS) - boundary.APPLIED)}"


@pytest.mark.parametrize("name", sorted(boundary.ENTRY_POINTS))
def test_each_public_names_checks_are_a_named_function_that_says_so(name):
    entry = boundary.ENTRY_POINTS[name]
    assert entry.check.__name__.startswith("check_"), f"{name}: checked by {entry.check.__name__}"
    assert entry.complete is None or entry.complete.__name__.startswith("complete_"), entry.complete.__name__
    assert entry.around is None or entry.around.__name__ not in ("_", "<lambda>"), entry.around.__name__
    assert entry.check.__module__ == boundary.__name__


def test_a_name_registered_for_a_method_the_class_lacks_is_an_error():
    boundary.entry_point("Mistyped.forwrad")(boundary.check_nothing)
    try:
        class Mistyped:
            def forward(self):
                return 1

        with pytest.raises(ValueError, match=r"checks are registered for Mistyped\.forwrad, but Mistyped has no "
                                             r"method forwrad"):
            boundary.checked(Mistyped)
    finally:
        del boundary.ENTRY_POINTS["Mistyped.forwrad"]


def test_a_check_without_a_name_and_a_function_without_checks_are_refused():
    with pytest.raises(ValueError, match="the checks of Nameless.call need a function with a name, got <lambda>"):
        boundary.entry_point("Nameless.call")(lambda arguments: None)
    assert "Nameless.call" not in boundary.ENTRY_POINTS

    def never_registered(x):
        return x

    with pytest.raises(ValueError, match="no checks are registered for .*never_registered"):
        boundary.checked(never_registered)


def test_no_provided_file_imports_the_students_module():
    package = Path(boundary.__file__).parent
    for name in PROVIDED:
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {module for module in imported if module.endswith("attention") or module == "."}, \
            f"{name}.py imports {sorted(imported)}"

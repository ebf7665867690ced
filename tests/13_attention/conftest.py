"""Grading setup for module 13.

Every test here runs with the "math" attention backend, so the student's own `math_attention`
is what the layers execute; tests of the provided fast kernel switch to "fast" explicitly.
A test marked `@pytest.mark.grades("<grade_id>")` grades the notebook part with that nbgrader
grade_id; `tito grade` adds up its points from the notebook's metadata.

The float64 reference in `reference.py` is the one every test compares with: the `ref` fixture,
or `import attention_reference` in a module-level helper.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

from tinytorch.core.attention import attention_backend


def _load_reference():
    """reference.py as a module object (test files are imported by path, so it is loaded by path too)."""
    spec = importlib.util.spec_from_file_location("attention_reference", Path(__file__).with_name("reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = sys.modules.setdefault("attention_reference", _load_reference())  # `import attention_reference`


@pytest.fixture(scope="session")
def ref():
    """The float64 reference: softmax, attention, masks, heads, multi-head attention, cache contents."""
    return REFERENCE


@pytest.fixture(autouse=True)
def _grade_the_student_path():
    with attention_backend("math"):
        yield

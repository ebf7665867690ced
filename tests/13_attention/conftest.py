"""Grading setup for module 13.

Every test here runs with the "math" attention backend, so the student's own `math_attention`
is what the layers execute; tests of the provided fast kernel switch to "fast" explicitly.
A test marked `@pytest.mark.grades("<grade_id>")` grades the notebook part with that nbgrader
grade_id; `tito grade` adds up its points from the notebook's metadata.
"""
import pytest

from tinytorch.core.attention import attention_backend


@pytest.fixture(autouse=True)
def _grade_the_student_path():
    with attention_backend("math"):
        yield

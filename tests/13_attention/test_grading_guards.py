"""What keeps grading honest (checks of provided code, not graded): while a graded test runs, the provided
kernel refuses to serve, and the expected values refuse to answer the code under test."""
import numpy as np
import pytest
from expected import GRADED_PACKAGE, ref

from tinytorch.core._attention_kernel import provided_kernels_refused
from tinytorch.core.attention import (ScaledDotProductAttention, attention_backend, fast_attention,
                                      get_attention_backend, math_attention)


def inputs():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 6, 3))


def test_the_default_backend_is_the_students_math_path():
    assert get_attention_backend() == "math"


def test_the_tuned_kernel_refuses_while_grading_and_runs_otherwise():
    q, k, v = inputs()
    with provided_kernels_refused():
        with pytest.raises(RuntimeError, match="provided tuned attention kernel is switched off while grading"):
            fast_attention(q, k, v)
        with attention_backend("fast"), pytest.raises(RuntimeError, match="switched off while grading"):
            ScaledDotProductAttention()(q, k, v)
        np.testing.assert_allclose(ScaledDotProductAttention()(q, k, v).data, math_attention(q, k, v)[0].data)
    np.testing.assert_allclose(fast_attention(q, k, v)[0].data, math_attention(q, k, v)[0].data, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call", ["fast_attention", "tuned_attention", "kernel attention"])
@pytest.mark.parametrize("start", ["threading.Thread", "ThreadPoolExecutor"])
def test_the_refusal_holds_in_a_thread_the_student_starts(call, start):
    """A thread started inside the graded block, the way a student function could, is refused too."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tinytorch.core import _attention_backend as backend
    from tinytorch.core import _attention_kernel as kernel

    q, k, v = (x.astype(np.float32) for x in inputs())
    run = {"fast_attention": lambda: fast_attention(q, k, v),
           "tuned_attention": lambda: backend.tuned_attention(q, k, v, None, 0.5, True),
           "kernel attention": lambda: kernel.attention(q, k, v, None, 0.5)}[call]
    outcome = []

    def in_thread():
        try:
            outcome.append(run())
        except RuntimeError as error:
            outcome.append(error)

    with provided_kernels_refused():
        if start == "threading.Thread":
            worker = threading.Thread(target=in_thread)
            worker.start()
            worker.join()
        else:
            with ThreadPoolExecutor(1) as pool:
                pool.submit(in_thread).result()
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), f"{call} in a thread gave {outcome}"
    assert "switched off while grading" in str(outcome[0])
    in_thread()                                                   # after the block, the kernel runs again
    assert not isinstance(outcome[1], RuntimeError)


def test_expected_values_refuse_the_code_under_test():
    scores = np.random.default_rng(1).normal(size=(3, 4))
    package_namespace = {"__name__": GRADED_PACKAGE, "ref": ref, "scores": scores}
    exec("def asked_by_the_package():\n    return ref.masked_softmax(scores)\n", package_namespace)
    with pytest.raises(RuntimeError, match="expected values are there to check your code, not to be its answer"):
        package_namespace["asked_by_the_package"]()
    np.testing.assert_allclose(ref.masked_softmax(scores).sum(axis=-1), 1.0)      # the tests themselves may ask


# ---------------------------------------------------------------- the public boundary checks once
def count_conversions(monkeypatch):
    """Record the name of every argument the boundary's checks convert to a float32 array."""
    from tinytorch.core import _attention_checks as checks

    converted, convert = [], checks.as_float32

    def counting(x, name, finite=True):
        converted.append(name)
        return convert(x, name, finite)

    monkeypatch.setattr(checks, "as_float32", counting)
    return converted


def test_a_multihead_forward_converts_each_input_once(monkeypatch):
    from tinytorch.core.attention import KVCache, MultiHeadAttention, create_causal_mask

    layer = MultiHeadAttention(16, 4, num_kv_heads=2, seed=0)
    x, memory = np.random.default_rng(2).normal(size=(2, 5, 16)), np.random.default_rng(3).normal(size=(2, 7, 16))
    converted = count_conversions(monkeypatch)
    layer(x, mask=create_causal_mask(5))
    assert converted == ["query"], converted                       # key and value default to the same array
    converted.clear()
    layer(x, memory, memory)
    assert converted == ["query", "key", "value"], converted
    cache = KVCache(2, 8, 2, 4)
    converted.clear()
    layer(x[:, :3], kv_cache=cache)                                # prefill: the cache's own checks read no array
    layer(x[:, 3:4], kv_cache=cache)                               # one decoding step
    assert converted == ["query", "query"], converted

"""Looks for an answer key by behaviour: does any provided function compute what a student function computes?

Run as a script in a throwaway copy of a release whose package holds the course's solution:
`python answer_key_probe.py FILES.json`, with that copy as the current folder and first on
PYTHONPATH. FILES.json lists the Python files (relative to that folder, or absolute) that the release
ships beside the student's code. For every student function, the solution is run on a few cases;
then every function and class those files define is called with the same arguments, and a result
equal to the solution's is a leak. The script prints a JSON report: the leaks, and how many calls
it made. Provided functions are called with arguments they were not written for, and some of them
write files, which is why the probe runs in a copy.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path.cwd()                 # the copy of the release the probe runs in

# Provided functions that may compute what a student function computes, and why each may ship.
ALLOWED = {
    "tinytorch.core._attention_backend.fast_attention":
        "the tuned kernel, a different, tiled algorithm; it refuses to run while a graded test runs",
    "tinytorch.core._attention_backend.tuned_attention":
        "the tuned kernel on checked arrays; it refuses to run while a graded test runs",
    "tinytorch.core._attention_kernel.attention":
        "the tuned kernel itself; it refuses to run while a graded test runs",
    "provided_13_attention_test_against_pytorch.torch_sdpa":
        "PyTorch's own scaled_dot_product_attention, the reference those tests compare with",
    "provided_13_attention_test_against_pytorch.torch_sdpa_gradients":
        "PyTorch's autograd through its own scaled_dot_product_attention, the reference those tests compare with",
}


def student_cases() -> dict[str, list[tuple[tuple, object]]]:
    """Student function -> [(arguments, the solution's result)], from the course's solution package."""
    from tinytorch.core.attention import (AttentionProfiler, KVCache, MultiHeadAttention, attention_backward,
                                          blocked_attention, blocked_attention_backward, create_causal_mask,
                                          create_padding_mask, masked_softmax, math_attention, merge_heads,
                                          repeat_kv_heads, repeat_kv_heads_backward, split_heads)

    rng = np.random.default_rng(1234)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    keep = rng.random((2, 3, 5)) < 0.6                                  # (B, T, S)
    scores = rng.standard_normal((3, 4, 5)) * 3
    x = rng.standard_normal((2, 3, 8))
    heads = rng.standard_normal((2, 4, 3, 2))
    kv = rng.standard_normal((2, 2, 5, 3))
    layer = MultiHeadAttention(8, 4, num_kv_heads=2, seed=5)
    weights = [w.data for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]
    sizes, costs = [64, 128, 256, 512], [1.3, 4.1, 17.2, 70.9]
    d_out = rng.standard_normal((2, 3, 3))                              # the gradient of an output (B, T, d_v)
    attention_weights = math_attention(q, k, v, keep, 0.5)[1].data
    blocked_out, lse = (r.data for r in blocked_attention(q, k, v, keep, 0.5, 2, True))
    d_heads = rng.standard_normal((2, 4, 5, 3))

    def cache_after(lengths, new_len):
        cache = KVCache(len(lengths), 8, 1, 2)
        for b, length in enumerate(lengths):
            cache.update(b, np.ones((1, length, 2)), np.ones((1, length, 2)))
        return cache

    cases = {
        "create_causal_mask": [((3,), None), ((2, 5), None), ((4, 2), None)],
        "create_padding_mask": [((np.array([2, 3]), 4), None), (([1, 0, 3], 3), None)],
        "masked_softmax": [((scores,), None), ((scores, rng.random((3, 4, 5)) < 0.6), None)],
        "math_attention": [((q, k, v), None), ((q, k, v, keep), None), ((q, k, v, keep, 0.5), None)],
        "blocked_attention": [((q, k, v, keep, 0.5, 2), None), ((q, k, v, None, None, 3), None),
                              ((q, k, v, keep, 0.5, 2, True), None)],
        "attention_backward": [((d_out, q, k, v, attention_weights, keep, 0.5), None),
                               ((d_out, q, k, v, attention_weights), None)],
        "repeat_kv_heads_backward": [((d_heads, 2), None), ((d_heads, 1), None)],
        "blocked_attention_backward": [((d_out, q, k, v, blocked_out, lse, keep, 0.5, 2), None)],
        "split_heads": [((x, 2), None), ((x, 4), None)],
        "merge_heads": [((heads,), None)],
        "repeat_kv_heads": [((kv, 4), None), ((kv, 6), None)],
        "fit_exponent": [((sizes, costs), None)],
        "MultiHeadAttention.forward": [((layer, x), None), ((x, layer), None), ((weights, 4, 2, x), None),
                                       ((x, *weights), None), ((layer, x, x, None), None), ((layer, x, None), None),
                                       ((layer, x, x), None)],
        "MultiHeadAttention.get_memory_usage": [((layer,), None)],
        "KVCache.get_memory_usage": [((cache_after([3, 1], 0),), None)],
        "KVCache.append": [(([5, 3], 2, 5), None), ((np.array([5, 3]), 2, 5), None)],
    }
    solutions = {
        "create_causal_mask": create_causal_mask, "create_padding_mask": create_padding_mask,
        "masked_softmax": masked_softmax, "math_attention": math_attention, "blocked_attention": blocked_attention,
        "attention_backward": attention_backward, "repeat_kv_heads_backward": repeat_kv_heads_backward,
        "blocked_attention_backward": blocked_attention_backward,
        "split_heads": split_heads, "merge_heads": merge_heads, "repeat_kv_heads": repeat_kv_heads,
        "fit_exponent": AttentionProfiler.fit_exponent,
        "MultiHeadAttention.forward": lambda *args: layer(x),
        "MultiHeadAttention.get_memory_usage": lambda *args: layer.get_memory_usage(),
        "KVCache.get_memory_usage": lambda cache: cache.get_memory_usage(),
        "KVCache.append": lambda *args: cache_after([3, 1], 0).append(np.zeros((2, 1, 2, 2)), np.zeros((2, 1, 2, 2)))[2],
    }
    return {name: [(args, solutions[name](*args)) for args, _ in calls] for name, calls in cases.items()}


def arrays_of(result) -> list[np.ndarray]:
    """The numbers a result holds: arrays (a Tensor's data), each item of a tuple, a float; dicts separately."""
    if isinstance(result, (tuple, list)) and not all(isinstance(item, (int, float)) for item in result):
        return [array for item in result for array in arrays_of(item)]
    data = result if isinstance(result, (np.ndarray, np.generic)) else getattr(result, "data", result)   # a Tensor's array
    if isinstance(data, np.ndarray) or isinstance(data, (int, float, np.generic)) and not isinstance(data, bool):
        array = np.asarray(data)
        if array.dtype.kind in "biuf":
            return [array.astype(np.float64)]
    return []


def same(result, expected) -> bool:
    if isinstance(expected, dict):
        if not isinstance(result, dict):
            return False
        numbers = {key: value for key, value in expected.items() if isinstance(value, (int, float, np.generic))}
        return bool(numbers) and all(key in result and result[key] == value for key, value in numbers.items())
    for target in arrays_of(expected):
        for candidate in arrays_of(result):
            if candidate.shape == target.shape and target.size and np.allclose(candidate, target, rtol=1e-4, atol=1e-6):
                return True
    return False


def load_provided(relative: str):
    """A provided file as a module: package files by their import name, others by path, under a name of their own."""
    if relative.startswith(("tinytorch/", "tito/")):
        return importlib.import_module(relative[:-3].replace("/", "."))
    path = ROOT / relative                                            # an absolute path stays as it is
    name = f"provided_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def provided_callables(module) -> dict[str, object]:
    """Functions and classes a module defines, with the static and class methods of its classes."""
    found = {}
    for name, value in vars(module).items():
        if getattr(value, "__module__", None) != module.__name__ or name.startswith("test_"):
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            found[f"{module.__name__}.{name}"] = value
        if inspect.isclass(value):
            for attribute, raw in vars(value).items():
                if isinstance(raw, (staticmethod, classmethod)):
                    found[f"{module.__name__}.{name}.{attribute}"] = getattr(value, attribute)
    return found


def probe(files: list[str]) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "13_attention"))          # `from expected import ref` in the tests
    cases = student_cases()
    callables, skipped = {}, {}
    for relative in files:
        try:
            module = load_provided(relative)
        except pytest.skip.Exception as reason:   # a test file of an optional dependency (PyTorch) that is absent
            skipped[relative] = str(reason)
            continue
        callables.update(provided_callables(module))
    leaks, calls = [], 0
    for student, runs in cases.items():
        for args, expected in runs:
            for name, function in callables.items():
                calls += 1
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = function(*args)
                except BaseException:             # a provided function that cannot take these inputs is no leak
                    continue
                if same(result, expected) and name not in ALLOWED:
                    leaks.append({"student": student, "provided": name, "arguments": len(args)})
    return {"leaks": leaks, "calls": calls, "callables": sorted(callables), "skipped": skipped}


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(Path(sys.argv[1]).read_text()))))

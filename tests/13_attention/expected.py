"""Expected values for the tests, stored, so that no reference implementation ships to students.

The tests ask for an expected value the way they would call a reference function:
`ref.attention(q, k, v, keep)`. What answers depends on where the tests run:

- In the course repository, `course/reference.py` (a float64 reference written independently
  of the module, never released) computes the value, and the answer is also checked against the
  stored copy, so every run there proves that the stored values are the reference's.
- In a student workspace, made by `tito release`, only `expected_values.npz` exists: the value
  is looked up by a hash of the function's name and its inputs.

After a change to the tests or the reference, rewrite the store from the course repository with
`TITO_RECORD_EXPECTED=1 pytest tests/13_attention` (the whole folder: the store keeps exactly the
values that run asks for).
"""
from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

STORE_FILE = Path(__file__).with_name("expected_values.npz")
FIXED_DATE = (1980, 1, 1, 0, 0, 0)      # zip entries carry no time of writing: the store is byte-stable


def _feed(digest, value) -> None:
    """Hash a value by its content: arrays by dtype, shape and bytes; containers item by item."""
    if not isinstance(value, (np.ndarray, np.generic)):
        value = getattr(value, "data", value)                  # a Tensor (or CausalMask) by its array
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.ascontiguousarray(value)
        digest.update(f"array {array.dtype.str} {array.shape};".encode())
        digest.update(array.tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for name in sorted(value):
            digest.update(f"{name}=".encode())
            _feed(digest, value[name])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(f"{type(value).__name__} {value!r};".encode())
    else:
        raise TypeError(f"cannot key an expected value by an input of type {type(value).__name__}")


def case_key(function: str, args: tuple, kwargs: dict) -> str:
    digest = hashlib.sha256(function.encode())
    _feed(digest, list(args))
    _feed(digest, {name: kwargs[name] for name in sorted(kwargs)})
    return f"{function}-{digest.hexdigest()[:24]}"


def _flatten(key: str, value, into: dict) -> None:
    """A value as named arrays: an array under `key`, a tuple or list item by item."""
    if isinstance(value, (tuple, list)):
        into[f"{key}.len"] = np.array(len(value))
        for index, item in enumerate(value):
            _flatten(f"{key}.{index}", item, into)
    else:
        into[key] = np.array(value)          # a copy: a test may change the array it was handed


def _unflatten(key: str, arrays: dict):
    if f"{key}.len" in arrays:
        return tuple(_unflatten(f"{key}.{index}", arrays) for index in range(int(arrays[f"{key}.len"])))
    return arrays[key]


def read_store(path: Path = STORE_FILE) -> dict:
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def write_store(arrays: dict, path: Path = STORE_FILE) -> None:
    """Write the arrays in sorted order with fixed dates, so the same values give the same bytes.

    The archive is built in memory and replaces the store in one rename: a failed write leaves it as it was.
    """
    archive_bytes = io.BytesIO()
    with zipfile.ZipFile(archive_bytes, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(archive_bytes.getvalue())
    partial.replace(path)


GRADED_PACKAGE = "tinytorch.core.attention"


def _refuse_inside_the_package(function: str) -> None:
    """Expected values answer the tests only: code under test that asks for one gets an error."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == GRADED_PACKAGE:
            raise RuntimeError(f"{GRADED_PACKAGE} asked for the expected value of {function}: expected values "
                               "are there to check your code, not to be its answer")
        frame = frame.f_back


class ExpectedValues:
    """`expected.NAME(*inputs)`: the reference's NAME on these inputs, computed or looked up.

    Args:
        stored: the store's arrays by name.
        reference: the reference module (course repository only), or None in a student workspace.
        record: collect every value asked for, to rewrite the store (course repository only).
    """

    def __init__(self, stored: dict, reference=None, record: bool = False):
        self._stored, self._reference, self._record = stored, reference, record
        self.asked: dict = {}                 # what this run asked for, flattened: the next store

    def __getattr__(self, function: str):
        if function.startswith("_"):
            raise AttributeError(function)

        def expected(*args, **kwargs):
            _refuse_inside_the_package(function)
            key = case_key(function, args, kwargs)
            if self._reference is None:
                return self._look_up(key, function)
            value = getattr(self._reference, function)(*args, **kwargs)
            flat: dict = {}
            _flatten(key, value, flat)
            self.asked.update(flat)
            if not self._record:
                self._check_stored(key, function, flat)
            return value

        return expected

    def _look_up(self, key: str, function: str):
        if f"{key}.len" not in self._stored and key not in self._stored:
            raise LookupError(
                f"no stored expected value of {function} for these inputs. The inputs of this case differ from "
                f"the ones the course's tests use: they are drawn from seeded random numbers, or computed by "
                f"the test, so an input that depends on your code's output (for example a layer's weights) "
                f"means your code changed it")
        return _unflatten(key, self._stored)

    def _check_stored(self, key: str, function: str, flat: dict) -> None:
        for name, array in flat.items():
            if name not in self._stored or not np.array_equal(self._stored[name], array, equal_nan=True):
                raise AssertionError(
                    f"expected_values.npz is stale: the reference's {function} is not stored as computed for this "
                    f"case; rewrite it with TITO_RECORD_EXPECTED=1 pytest tests/13_attention")


def weights_of(layer) -> list:
    """[w_q, w_k, w_v, w_o] of a MultiHeadAttention as arrays: the inputs of `ref.multihead`."""
    return [np.asarray(weight.data) for weight in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)]


def with_weights(layer, seed: int):
    """Give a MultiHeadAttention the weights `ref.init_weights(seed, ...)` holds, and return the layer.

    How a layer initialises its weights is the student's decision, so a test that compares outputs
    sets the weights itself; what it expects then does not depend on that decision.
    """
    weights = ref.init_weights(seed, layer.embed_dim, layer.num_heads, layer.num_kv_heads)
    for tensor, values in zip((layer.w_q, layer.w_k, layer.w_v, layer.w_o), weights):
        if tensor.data.shape != values.shape:
            raise AssertionError(f"a weight of shape {tensor.data.shape} where {values.shape} was expected")
        tensor.data[...] = values
    return layer
